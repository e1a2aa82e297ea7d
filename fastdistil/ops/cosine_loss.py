"""cosine_loss: 1 - cos(student_hidden, teacher_hidden) per row, DistilBERT's loss_cos.

    cos[i] = <s_i, t_i> / sqrt((|s_i|^2 + 1e-12) (|t_i|^2 + 1e-12))      (torch's cosine_embedding_loss)
    d (1 - cos) / d s = -(t * r - s * cos / (|s|^2 + 1e-12)),   r = 1 / sqrt(...)      (and symmetrically)

Where each piece lives:
    reference (the spec) ...... cosine_loss_fwd_ref / cosine_loss_bwd_ref / cosine_loss_ref below
    C++, cpu .................. csrc/cpu/cosine_loss.cpp  -> torch.ops.fastdistil._cosine_loss_{fwd,bwd}_cpu
    CUDA C++, cuda ............ csrc/cuda/cosine_loss.cu  -> torch.ops.fastdistil._cosine_loss_{fwd,bwd}_cuda
    shared per-row math ....... csrc/common/fd_math.h
    Triton, cuda .............. kernels/cosine_loss.py    (fastdistil.kernels.cosine_loss)
    tests ..................... tests/ops/test_cosine_loss.py
    benchmark ................. benchmarks/bench_cosine_loss.py
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistil import backend
from fastdistil.ops._common import check_mask, check_pair, check_reduction, reduce_rows, reference_kernels

try:
    from fastdistil.kernels import cosine_loss as triton_cosine_loss
except ImportError:
    triton_cosine_loss = None

EPS = 1e-12  # inside the sqrt, as torch's cosine_embedding_loss


# -----------------------------------------------------------------------------
# 1. Reference.


def cosine_loss_fwd_ref(student_hidden, teacher_hidden, row_mask=None, compute_dtype=None):
    """Same outputs as fastdistil::cosine_loss_fwd: (loss (N,), stats (N, 3) = (<s,t>, |s|^2, |t|^2)),
    zeros on rows where row_mask is False."""
    acc = compute_dtype or torch.promote_types(student_hidden.dtype, torch.float32)
    s, t = student_hidden.to(acc), teacher_hidden.to(acc)
    stats = torch.stack(((s * t).sum(-1), (s * s).sum(-1), (t * t).sum(-1)), dim=-1)  # (N, 3)
    loss = 1 - stats[:, 0] / ((stats[:, 1] + EPS) * (stats[:, 2] + EPS)).sqrt()
    if row_mask is not None:
        loss = torch.where(row_mask, loss, 0.0)
        stats = torch.where(row_mask[:, None], stats, 0.0)
    return loss, stats


def cosine_loss_bwd_ref(
    grad_loss, student_hidden, teacher_hidden, stats, row_mask=None, student_grad=True, teacher_grad=True
):
    """(d/d student_hidden, d/d teacher_hidden) of sum_i grad_loss[i] * loss[i], in the inputs' dtype; an
    empty (0,) tensor for a side whose flag is False."""
    acc = torch.promote_types(student_hidden.dtype, torch.float32)
    s, t, st, g = student_hidden.to(acc), teacher_hidden.to(acc), stats.to(acc), grad_loss.to(acc)
    dot, ss, tt = st[:, 0:1], st[:, 1:2], st[:, 2:3]
    rinv = ((ss + EPS) * (tt + EPS)).rsqrt()
    cos = dot * rinv
    grad_s = g[:, None] * (s * cos / (ss + EPS) - t * rinv)
    grad_t = g[:, None] * (t * cos / (tt + EPS) - s * rinv)
    if row_mask is not None:
        grad_s, grad_t = (torch.where(row_mask[:, None], x, 0.0) for x in (grad_s, grad_t))
    grad_s = grad_s.to(student_hidden.dtype) if student_grad else student_hidden.new_empty((0,))
    grad_t = grad_t.to(teacher_hidden.dtype) if teacher_grad else teacher_hidden.new_empty((0,))
    return grad_s, grad_t


def cosine_loss_ref(student_hidden, teacher_hidden, mask=None):
    """The DistilBERT distiller's formulation (masked_select + nn.CosineEmbeddingLoss, target 1), mean
    over selected rows; differentiable by autograd. Baseline for the benchmarks and an oracle for tests."""
    H = student_hidden.shape[-1]
    if mask is not None:
        sel = mask.unsqueeze(-1).expand_as(student_hidden)
        s = torch.masked_select(student_hidden, sel).view(-1, H)
        t = torch.masked_select(teacher_hidden, sel).view(-1, H)
    else:
        s, t = student_hidden.reshape(-1, H), teacher_hidden.reshape(-1, H)
    target = s.new_ones(s.shape[0])
    return torch.nn.functional.cosine_embedding_loss(s, t, target, reduction="mean")


# -----------------------------------------------------------------------------
# 2. Schemas.

FWD_SCHEMA = "(Tensor student_hidden, Tensor teacher_hidden, Tensor? row_mask=None) -> (Tensor, Tensor)"
BWD_SCHEMA = (
    "(Tensor grad_loss, Tensor student_hidden, Tensor teacher_hidden, Tensor stats, Tensor? row_mask=None, "
    "bool student_grad=True, bool teacher_grad=True) -> (Tensor, Tensor)"
)
for _name in ("cosine_loss_fwd", "_cosine_loss_fwd_cpu", "_cosine_loss_fwd_cuda"):
    torch.library.define(f"fastdistil::{_name}", FWD_SCHEMA)
for _name in ("cosine_loss_bwd", "_cosine_loss_bwd_cpu", "_cosine_loss_bwd_cuda"):
    torch.library.define(f"fastdistil::{_name}", BWD_SCHEMA)


# -----------------------------------------------------------------------------
# 3. Fakes.


def _fwd_fake(student_hidden, teacher_hidden, row_mask=None):
    torch._check(student_hidden.shape == teacher_hidden.shape, lambda: "student/teacher shapes differ")
    torch._check(student_hidden.dim() == 2, lambda: "expected (N, H) hidden states")
    acc = torch.promote_types(student_hidden.dtype, torch.float32)
    n = student_hidden.shape[0]
    return student_hidden.new_empty((n,), dtype=acc), student_hidden.new_empty((n, 3), dtype=acc)


def _bwd_fake(grad_loss, student_hidden, teacher_hidden, stats, row_mask=None, student_grad=True, teacher_grad=True):
    return (
        student_hidden.new_empty(student_hidden.shape if student_grad else (0,)),
        teacher_hidden.new_empty(teacher_hidden.shape if teacher_grad else (0,)),
    )


for _name in ("cosine_loss_fwd", "_cosine_loss_fwd_cpu", "_cosine_loss_fwd_cuda"):
    torch.library.register_fake(f"fastdistil::{_name}")(_fwd_fake)
for _name in ("cosine_loss_bwd", "_cosine_loss_bwd_cpu", "_cosine_loss_bwd_cuda"):
    torch.library.register_fake(f"fastdistil::{_name}")(_bwd_fake)


# -----------------------------------------------------------------------------
# 4. Autograd.


def _setup_context(ctx, inputs, output):
    student_hidden, teacher_hidden, row_mask = inputs
    _, stats = output
    ctx.save_for_backward(student_hidden, teacher_hidden, stats, row_mask)


def _backward(ctx, grad_loss, _grad_stats):
    student_hidden, teacher_hidden, stats, row_mask = ctx.saved_tensors
    needs_s, needs_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_s, grad_t = torch.ops.fastdistil.cosine_loss_bwd(
        grad_loss, student_hidden, teacher_hidden, stats, row_mask, needs_s, needs_t
    )
    return (grad_s if needs_s else None), (grad_t if needs_t else None), None


torch.library.register_autograd("fastdistil::cosine_loss_fwd", _backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# 5. Public API.


def cosine_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """1 - cos(student_hidden, teacher_hidden) over the last dim (DistilBERT's loss_cos).

    student_hidden, teacher_hidden: (..., H), same shape, dtype (float32 / bfloat16 / float16) and device.
        Gradients flow to each one that requires grad (the teacher's usually does not).
    mask:      bool (...), True selects a row (the attention mask). None: all rows. Unselected rows are never
               read and get exactly 0 gradient.
    reduction: "mean" (over selected rows; 0 when none is selected), "sum", or "none" (per row, 0 unselected).
    Returns float32 (float64 for float64 inputs). cos uses eps = 1e-12 inside the sqrt, as torch does.
    """
    check_pair("student_hidden", student_hidden, "teacher_hidden", teacher_hidden, last_dim="H")
    check_reduction(reduction, ("mean", "sum", "none"))
    leading = student_hidden.shape[:-1]
    check_mask(mask, leading, student_hidden.device, "the hidden states")
    H = student_hidden.shape[-1]
    row_mask = None if mask is None else mask.reshape(-1)
    if reference_kernels():
        if reduction == "mean":
            return cosine_loss_ref(student_hidden, teacher_hidden, mask)
        loss, _ = cosine_loss_fwd_ref(student_hidden.reshape(-1, H), teacher_hidden.reshape(-1, H), row_mask)
        return reduce_rows(loss, row_mask, reduction, leading)
    loss, _ = torch.ops.fastdistil.cosine_loss_fwd(
        student_hidden.reshape(-1, H), teacher_hidden.reshape(-1, H), row_mask
    )
    return reduce_rows(loss, row_mask, reduction, leading)


# -----------------------------------------------------------------------------
# 6. Implementations and wiring (the only place that decides what fills each device slot).

FWD_IMPLS = {
    "reference": cosine_loss_fwd_ref,
    "cpu_cpp": torch.ops.fastdistil._cosine_loss_fwd_cpu,  # csrc/cpu/cosine_loss.cpp
    "cuda_cpp": torch.ops.fastdistil._cosine_loss_fwd_cuda,  # csrc/cuda/cosine_loss.cu
}
BWD_IMPLS = {
    "reference": cosine_loss_bwd_ref,
    "cpu_cpp": torch.ops.fastdistil._cosine_loss_bwd_cpu,
    "cuda_cpp": torch.ops.fastdistil._cosine_loss_bwd_cuda,
}
if triton_cosine_loss is not None:
    FWD_IMPLS["cuda_triton"] = triton_cosine_loss.cosine_loss_fwd  # kernels/cosine_loss.py
    BWD_IMPLS["cuda_triton"] = triton_cosine_loss.cosine_loss_bwd

# CPU: the C++ kernel ("reference", warned, when _C is missing). CUDA: Triton first, then CUDA C++.
backend.wire(
    "cosine_loss",
    {"cosine_loss_fwd": FWD_IMPLS, "cosine_loss_bwd": BWD_IMPLS},
    cuda_preference=("cuda_triton", "cuda_cpp"),
)
