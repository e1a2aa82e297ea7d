"""Input validation and reductions shared by the loss ops.

Every public op validates its arguments here BEFORE any kernel runs, so bad input gets one clear
ValueError / TypeError naming the argument and the shapes, never a traceback from inside torch.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import Tensor

REDUCTIONS = ("batchmean", "mean", "sum", "none")
KERNELS = ("fused", "reference")
_kernels = "fused"


@contextlib.contextmanager
def use_kernels(mode: str):
    """Within the block the public loss ops (kd_loss, cosine_loss, fused_distill_head) run their fused kernels
    ("fused", the default) or their pure-PyTorch references ("reference": the distiller's formulation, full
    logits, autograd): one switch for everything built on the ops, instead of a branch in each caller."""
    global _kernels
    if mode not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {mode!r}")
    previous, _kernels = _kernels, mode
    try:
        yield
    finally:
        _kernels = previous


def reference_kernels() -> bool:
    """True inside use_kernels("reference")."""
    return _kernels == "reference"


def check_pair(name_a: str, a, name_b: str, b, *, last_dim: str) -> None:
    """Two floating-point tensors of the same shape (..., last_dim), dtype and device; last dim non-empty."""
    for name, x in ((name_a, a), (name_b, b)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16), got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have shape (..., {last_dim}), got a 0-d tensor")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.shape[-1] == 0:
        raise ValueError(f"{name_a} has an empty last dimension ({last_dim} = 0): shape {tuple(a.shape)}")


def check_mask(mask, leading_shape: torch.Size, device: torch.device, what: str) -> None:
    """mask: None, or a bool tensor of the leading shape of the inputs (one entry per row)."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must have dtype torch.bool (True = the row counts; e.g. attention_mask.bool()), got {mask.dtype}"
        )
    if mask.shape != leading_shape:
        raise ValueError(f"mask must have the leading shape of {what}, {tuple(leading_shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on {device} like {what}, got {mask.device}")


# Beyond this temperature softmax(logits / T) is flat to within fp32 rounding and the T^2-scaled KL loses its
# digits (measured: 4e-4 relative error at T = 100, 4% at 1e3, 100% at 1e5 against float64).
MAX_TEMPERATURE = 100.0


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if t > MAX_TEMPERATURE:
        raise ValueError(
            f"temperature {temperature} is above {MAX_TEMPERATURE:g}: there softmax(logits / T) is uniform to within "
            "fp32 rounding and the T^2-scaled KL is not computed accurately"
        )
    return t


def check_softmax_scale(name: str, scale, head_dim: int) -> float:
    """The scale of attention-style scores q.k: a finite number > 0, or None for 1 / sqrt(head dimension)."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be a finite number > 0 or None (1 / sqrt(head dimension)), got {scale!r}")
    return float(scale)


def check_reduction(reduction: str, allowed=REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")


def reduce_rows(per_row: Tensor, row_mask: Tensor | None, reduction: str, leading_shape: torch.Size) -> Tensor:
    """Reduce per-row losses that are already 0 on unselected rows.

    "batchmean"/"mean": sum / number of selected rows, 0 when none is selected (a clamp, computed on the
    device: no host sync). "sum": the sum. "none": the per-row losses in the leading shape.
    """
    if reduction == "none":
        return per_row.reshape(leading_shape)
    total = per_row.sum()
    if reduction == "sum":
        return total
    if row_mask is None:
        return total / max(per_row.shape[0], 1)
    return total / row_mask.sum().clamp_min(1).to(total.dtype)


def is_eager(t: Tensor) -> bool:
    """True for a plain tensor outside any tracing (torch.compile, opcheck, fake tensors): where a backward may
    mutate saved buffers or read a value on the host."""
    return type(t) is Tensor and torch._C._len_torch_dispatch_stack() == 0


def unit_stride(x: Tensor) -> Tensor:
    """x itself when its last stride is 1 (the kernels read rows of contiguous elements), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()
