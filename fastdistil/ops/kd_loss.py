"""kd_loss: per-row KL(teacher || student) at a softmax temperature, DistilBERT's loss_ce.

    loss[i] = T^2 * sum_v p[i, v] * (log p[i, v] - log q[i, v])        (T^2 when scale_t2)
    p = softmax(teacher_logits / T),  q = softmax(student_logits / T)    # (N, V), never materialised
    d loss[i] / d student_logits[i, v] = T * (q[i, v] - p[i, v])         (= T^2 * (q - p) / T)

The forward computes the per-row KL and, when the student needs a gradient, (q - p) / T in the same
sweep; the backward scales that buffer in place. See section 1.

Where each piece lives:
    reference (the spec) ...... kd_loss_fwd_ref / kd_loss_bwd_ref / kd_loss_ref below
    C++, cpu .................. csrc/cpu/kd_loss.cpp   -> torch.ops.fastdistil._kd_loss_{fwd,bwd}_cpu
    CUDA C++, cuda ............ csrc/cuda/kd_loss.cu   -> torch.ops.fastdistil._kd_loss_{fwd,bwd}_cuda
    shared per-row math ....... csrc/common/fd_math.h
    Triton, cuda .............. kernels/kd_loss.py     (fastdistil.kernels.kd_loss)
    tests ..................... tests/ops/test_kd_loss.py
    benchmark ................. benchmarks/bench_kd_loss.py
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistil import backend
from fastdistil.ops._common import (
    check_mask,
    check_pair,
    check_reduction,
    check_temperature,
    is_eager,
    reduce_rows,
    reference_kernels,
)

try:  # needs `triton`; absent on CPU-only installs
    from fastdistil.kernels import kd_loss as triton_kd_loss
except ImportError:
    triton_kd_loss = None


# -----------------------------------------------------------------------------
# 1. Reference. Plain PyTorch. Tests, benchmarks and the no-_C fallback import these.
#
# The op is split so that the forward does all the work: fastdistil::kd_loss_fwd returns the per-row
# KL and, when asked (with_grad, i.e. the student needs a gradient), d KL / d student_logits in the same
# sweep over the logits; fastdistil::kd_loss_bwd only scales that buffer by grad_loss, IN PLACE, so a
# training step holds one (N, V) buffer, never two, and reads the logits once.


def kd_loss_fwd_ref(student_logits, teacher_logits, temperature, row_mask=None, with_grad=False, compute_dtype=None):
    """Same outputs as fastdistil::kd_loss_fwd: (loss (N,), grad (N, V) or (0,)).

    loss[i] = KL(p_i || q_i) without the T^2 factor, 0 where row_mask is False.
    grad = (q - p) / T in student_logits.dtype (0 on unselected rows) when with_grad, else an empty tensor.
    compute_dtype=None: fp32 math (fp64 for fp64 inputs), the op's output dtypes. Tests pass
    torch.float64 for the oracle and the input dtype for "what PyTorch gets in low precision".
    """
    acc = compute_dtype or torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(acc) / temperature
    t = teacher_logits.to(acc) / temperature
    log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)  # (N, V)
    p = log_p.exp()
    # p == 0 (teacher logit -inf) contributes 0: where() keeps -inf - -inf = NaN out of value and gradient.
    loss = (torch.where(p > 0, log_p - log_q, 0.0) * p).sum(-1)
    if row_mask is not None:
        loss = torch.where(row_mask, loss, 0.0)
    if not with_grad:
        return loss, student_logits.new_empty((0,))
    grad = (log_q.exp() - p) / temperature
    if row_mask is not None:
        grad = torch.where(row_mask[:, None], grad, 0.0)
    return loss, grad.to(student_logits.dtype)


def kd_loss_bwd_ref(grad_loss, grad_logits):
    """grad_logits[i, :] *= grad_loss[i], in place (fp32 math)."""
    acc = torch.promote_types(grad_logits.dtype, torch.float32)
    grad_logits.copy_(grad_logits.to(acc) * grad_loss.to(acc)[:, None])


def kd_loss_ref(student_logits, teacher_logits, temperature=2.0, mask=None, reduction="batchmean", scale_t2=True):
    """The DistilBERT distiller's formulation, differentiable by autograd: masked_select the rows,
    log_softmax / softmax at temperature, nn.KLDivLoss(reduction="batchmean"), times T^2. The benchmarks'
    eager baseline and an independent oracle for kd_loss() (it shares no code with the kernels).
    Supports reduction "batchmean" and "sum" (what KLDivLoss offers)."""
    V = student_logits.shape[-1]
    t = teacher_logits.detach()
    if mask is not None:
        sel = mask.unsqueeze(-1).expand_as(student_logits)
        s_sel, t_sel = torch.masked_select(student_logits, sel).view(-1, V), torch.masked_select(t, sel).view(-1, V)
    else:
        s_sel, t_sel = student_logits.reshape(-1, V), t.reshape(-1, V)
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(s_sel / temperature, dim=-1),
        torch.softmax(t_sel / temperature, dim=-1),
        reduction="sum",
    )
    if reduction == "batchmean":
        kl = kl / max(s_sel.shape[0], 1)  # KLDivLoss(batchmean) divides by rows (here: NaN-free when empty)
    return kl * temperature**2 if scale_t2 else kl


def _kd_rows_autograd(student_logits, teacher_logits, temperature, mask, scale_t2):
    """Per-row KL (reduction "none") in plain autograd math, for use_kernels("reference")."""
    T = temperature
    log_q = torch.log_softmax(student_logits.float() / T, dim=-1)
    log_p = torch.log_softmax(teacher_logits.detach().float() / T, dim=-1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # 0 * log 0 = 0
    kl = kl * (T * T) if scale_t2 else kl
    return kl if mask is None else torch.where(mask, kl, 0.0)


# -----------------------------------------------------------------------------
# 2. Schemas: the public ops, and one private op per native kernel with the same signature.
#    C++ only implements these names (TORCH_LIBRARY_IMPL); the dispatcher checks its signatures.

FWD_SCHEMA = (
    "(Tensor student_logits, Tensor teacher_logits, float temperature, Tensor? row_mask=None, "
    "bool with_grad=False) -> (Tensor, Tensor)"
)
BWD_SCHEMA = "(Tensor grad_loss, Tensor(a!) grad_logits) -> ()"  # mutates grad_logits in place
for _name in ("kd_loss_fwd", "_kd_loss_fwd_cpu", "_kd_loss_fwd_cuda"):
    torch.library.define(f"fastdistil::{_name}", FWD_SCHEMA)
for _name in ("kd_loss_bwd", "_kd_loss_bwd_cpu", "_kd_loss_bwd_cuda"):
    torch.library.define(f"fastdistil::{_name}", BWD_SCHEMA)


# -----------------------------------------------------------------------------
# 3. Fakes: output metadata without computing, for torch.compile and opcheck.


def _fwd_fake(student_logits, teacher_logits, temperature, row_mask=None, with_grad=False):
    torch._check(student_logits.shape == teacher_logits.shape, lambda: "student/teacher shapes differ")
    torch._check(student_logits.dim() == 2, lambda: "expected (N, V) logits")
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    loss = student_logits.new_empty((student_logits.shape[0],), dtype=acc)
    grad = student_logits.new_empty(student_logits.shape if with_grad else (0,))
    return loss, grad


def _bwd_fake(grad_loss, grad_logits):
    return None


for _name in ("kd_loss_fwd", "_kd_loss_fwd_cpu", "_kd_loss_fwd_cuda"):
    torch.library.register_fake(f"fastdistil::{_name}")(_fwd_fake)
for _name in ("kd_loss_bwd", "_kd_loss_bwd_cpu", "_kd_loss_bwd_cuda"):
    torch.library.register_fake(f"fastdistil::{_name}")(_bwd_fake)


# -----------------------------------------------------------------------------
# 4. Autograd on the public forward op. The forward already computed d loss / d student_logits; the
#    backward scales that buffer by grad_loss IN PLACE in eager mode (no second (N, V) buffer). A second
#    backward through the same graph (retain_graph=True) therefore raises autograd's "modified by an
#    inplace operation" error instead of returning a wrong gradient. Under tracing (torch.compile,
#    opcheck's AOT checks), where mutating a saved forward output is not supported, it scales out of
#    place and the compiler plans the memory.


def _setup_context(ctx, inputs, output):
    ctx.with_grad = inputs[4]
    ctx.save_for_backward(output[1])
    # The gradient buffer output is auxiliary: never materialise a (N, V) zero tensor for its gradient.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_of_grad_output):
    if not ctx.with_grad:
        raise RuntimeError(
            "fastdistil::kd_loss_fwd was called with with_grad=False, so it cannot backpropagate; "
            "use fastdistil.ops.kd_loss(), which sets it"
        )
    (grad_logits,) = ctx.saved_tensors
    if is_eager(grad_logits):
        torch.ops.fastdistil.kd_loss_bwd(grad_loss, grad_logits)
        # The dispatcher does not bump version counters for ops defined with torch.library.define: do it,
        # so that reusing this saved buffer (a second backward) fails loudly.
        torch.autograd.graph.increment_version(grad_logits)
    else:
        acc = torch.promote_types(grad_logits.dtype, torch.float32)
        grad_logits = (grad_logits.to(acc) * grad_loss.to(acc)[:, None]).to(grad_logits.dtype)
    return grad_logits, None, None, None, None  # the teacher is a constant: kd_loss() detaches it


torch.library.register_autograd("fastdistil::kd_loss_fwd", _backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# 5. Public API.


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
    scale_t2: bool = True,
) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) per row, times T^2 when scale_t2 (DistilBERT's loss_ce).

    student_logits: (..., V) float32 / bfloat16 / float16; receives gradients.
    teacher_logits: (..., V), same dtype and device; a constant (detached).
    temperature:    a finite number > 0.
    mask:           bool (...), the leading shape; True selects a row (e.g. the attention mask). None: all rows.
                    Unselected rows are never read: they may hold anything, and get exactly 0 gradient.
    reduction:      "batchmean" (sum over selected rows / their number; 0 when none is selected; "mean" is
                    the same), "sum", or "none" (per-row losses in the leading shape, 0 for unselected rows).
    Returns float32 (float64 for float64 inputs). NaN in a selected row propagates to the loss; -inf logits
    are legal (masked vocabulary entries) and give finite results wherever the KL is finite.
    """
    check_pair("student_logits", student_logits, "teacher_logits", teacher_logits, last_dim="V")
    temperature = check_temperature(temperature)
    check_reduction(reduction)
    leading = student_logits.shape[:-1]
    check_mask(mask, leading, student_logits.device, "the logits")
    V = student_logits.shape[-1]
    if reference_kernels():
        if reduction == "none":
            return _kd_rows_autograd(student_logits, teacher_logits, temperature, mask, scale_t2)
        return kd_loss_ref(student_logits, teacher_logits, temperature, mask, reduction, scale_t2)
    row_mask = None if mask is None else mask.reshape(-1)
    with_grad = student_logits.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.fastdistil.kd_loss_fwd(
        student_logits.reshape(-1, V), teacher_logits.detach().reshape(-1, V), temperature, row_mask, with_grad
    )
    if scale_t2:
        loss = loss * (temperature * temperature)
    return reduce_rows(loss, row_mask, reduction, leading)


# -----------------------------------------------------------------------------
# 6. Implementations and wiring. FWD_IMPLS / BWD_IMPLS list every implementation (tests and
#    benchmarks loop over them); the block below is the ONLY place that decides what fills each
#    device slot of the public ops.

FWD_IMPLS = {
    "reference": kd_loss_fwd_ref,  # any device
    "cpu_cpp": torch.ops.fastdistil._kd_loss_fwd_cpu,  # csrc/cpu/kd_loss.cpp
    "cuda_cpp": torch.ops.fastdistil._kd_loss_fwd_cuda,  # csrc/cuda/kd_loss.cu
}
BWD_IMPLS = {
    "reference": kd_loss_bwd_ref,
    "cpu_cpp": torch.ops.fastdistil._kd_loss_bwd_cpu,
    "cuda_cpp": torch.ops.fastdistil._kd_loss_bwd_cuda,
}
if triton_kd_loss is not None:
    FWD_IMPLS["cuda_triton"] = triton_kd_loss.kd_loss_fwd  # kernels/kd_loss.py
    BWD_IMPLS["cuda_triton"] = triton_kd_loss.kd_loss_bwd

# CPU: the C++ kernel ("reference", warned, when _C is missing). CUDA: Triton first, then CUDA C++.
backend.wire(
    "kd_loss", {"kd_loss_fwd": FWD_IMPLS, "kd_loss_bwd": BWD_IMPLS}, cuda_preference=("cuda_triton", "cuda_cpp")
)
