"""kd_loss: per-row KL(teacher || student) at a softmax temperature, DistilBERT's loss_ce.

    loss[i] = T^2 * sum_v p[i, v] * (log p[i, v] - log q[i, v])        (T^2 when scale_t2)
    p = softmax(teacher_logits / T),  q = softmax(student_logits / T)    # (N, V), never materialised
    d loss[i] / d student_logits[i, v] = T * (q[i, v] - p[i, v])         (= T^2 * (q - p) / T)

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
from fastdistil.ops._common import check_mask, check_pair, check_reduction, check_temperature, reduce_rows

try:  # needs `triton`; absent on CPU-only installs
    from fastdistil.kernels import kd_loss as triton_kd_loss
except ImportError:
    triton_kd_loss = None


# -----------------------------------------------------------------------------
# 1. Reference. Plain PyTorch. Tests, benchmarks and the no-_C fallback import these.


def kd_loss_fwd_ref(student_logits, teacher_logits, temperature, row_mask=None, compute_dtype=None):
    """Same outputs as fastdistil::kd_loss_fwd: (loss, student_lse, teacher_lse), each (N,), all 0 on
    rows where row_mask is False. loss is KL(p || q) without the T^2 factor.

    compute_dtype=None: fp32 math (fp64 for fp64 inputs), the op's output dtypes. Tests pass
    torch.float64 for the oracle and the input dtype for "what PyTorch gets in low precision".
    """
    acc = compute_dtype or torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(acc) / temperature
    t = teacher_logits.to(acc) / temperature
    s_lse, t_lse = s.logsumexp(-1), t.logsumexp(-1)  # (N,), (N,)
    log_q, log_p = s - s_lse[:, None], t - t_lse[:, None]  # (N, V)
    p = log_p.exp()
    # p == 0 (teacher logit -inf) contributes 0: where() keeps -inf - -inf = NaN out of value and gradient.
    loss = (torch.where(p > 0, log_p - log_q, 0.0) * p).sum(-1)
    if row_mask is not None:
        loss, s_lse, t_lse = (torch.where(row_mask, x, 0.0) for x in (loss, s_lse, t_lse))
    return loss, s_lse, t_lse


def kd_loss_bwd_ref(grad_loss, student_logits, teacher_logits, student_lse, teacher_lse, temperature, row_mask=None):
    """d (sum_i grad_loss[i] * loss[i]) / d student_logits, (N, V), in student_logits.dtype."""
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    q = (student_logits.to(acc) / temperature - student_lse.to(acc)[:, None]).exp()
    p = (teacher_logits.to(acc) / temperature - teacher_lse.to(acc)[:, None]).exp()
    grad = grad_loss.to(acc)[:, None] / temperature * (q - p)
    if row_mask is not None:
        grad = torch.where(row_mask[:, None], grad, 0.0)
    return grad.to(student_logits.dtype)


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


# -----------------------------------------------------------------------------
# 2. Schemas: the public ops, and one private op per native kernel with the same signature.
#    C++ only implements these names (TORCH_LIBRARY_IMPL); the dispatcher checks its signatures.

FWD_SCHEMA = "(Tensor student_logits, Tensor teacher_logits, float temperature, Tensor? row_mask=None) -> (Tensor, Tensor, Tensor)"
BWD_SCHEMA = (
    "(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, Tensor student_lse, Tensor teacher_lse, "
    "float temperature, Tensor? row_mask=None) -> Tensor"
)
for _name in ("kd_loss_fwd", "_kd_loss_fwd_cpu", "_kd_loss_fwd_cuda"):
    torch.library.define(f"fastdistil::{_name}", FWD_SCHEMA)
for _name in ("kd_loss_bwd", "_kd_loss_bwd_cpu", "_kd_loss_bwd_cuda"):
    torch.library.define(f"fastdistil::{_name}", BWD_SCHEMA)


# -----------------------------------------------------------------------------
# 3. Fakes: output metadata without computing, for torch.compile and opcheck.


def _fwd_fake(student_logits, teacher_logits, temperature, row_mask=None):
    torch._check(student_logits.shape == teacher_logits.shape, lambda: "student/teacher shapes differ")
    torch._check(student_logits.dim() == 2, lambda: "expected (N, V) logits")
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    n = student_logits.shape[0]
    return tuple(student_logits.new_empty((n,), dtype=acc) for _ in range(3))


def _bwd_fake(grad_loss, student_logits, teacher_logits, student_lse, teacher_lse, temperature, row_mask=None):
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


for _name in ("kd_loss_fwd", "_kd_loss_fwd_cpu", "_kd_loss_fwd_cuda"):
    torch.library.register_fake(f"fastdistil::{_name}")(_fwd_fake)
for _name in ("kd_loss_bwd", "_kd_loss_bwd_cpu", "_kd_loss_bwd_cuda"):
    torch.library.register_fake(f"fastdistil::{_name}")(_bwd_fake)


# -----------------------------------------------------------------------------
# 4. Autograd on the public forward op; the backward is itself a custom op (any device, compile).


def _setup_context(ctx, inputs, output):
    student_logits, teacher_logits, temperature, row_mask = inputs
    _, student_lse, teacher_lse = output
    ctx.save_for_backward(student_logits, teacher_logits, student_lse, teacher_lse, row_mask)
    ctx.temperature = temperature


def _backward(ctx, grad_loss, _grad_student_lse, _grad_teacher_lse):
    # The lse outputs are auxiliary (saved for backward); their gradients are ignored.
    student_logits, teacher_logits, student_lse, teacher_lse, row_mask = ctx.saved_tensors
    grad = torch.ops.fastdistil.kd_loss_bwd(
        grad_loss, student_logits, teacher_logits, student_lse, teacher_lse, ctx.temperature, row_mask
    )
    return grad, None, None, None  # the teacher is a constant: kd_loss() detaches it


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
    row_mask = None if mask is None else mask.reshape(-1)
    loss, _, _ = torch.ops.fastdistil.kd_loss_fwd(
        student_logits.reshape(-1, V), teacher_logits.detach().reshape(-1, V), temperature, row_mask
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

backend.CUDA_PREFERENCE["kd_loss"] = ("cuda_triton", "cuda_cpp")
_CPU = backend.cpu_impl("kd_loss", FWD_IMPLS)  # "cpu_cpp", or "reference" (warned) when _C is missing


def _cuda_name() -> str:
    return backend.cuda_impl("kd_loss", FWD_IMPLS)


def _fwd_cuda(*args):
    return FWD_IMPLS[_cuda_name()](*args)


def _bwd_cuda(*args):
    return BWD_IMPLS[_cuda_name()](*args)


backend.register(
    "fastdistil::kd_loss_fwd", cpu=FWD_IMPLS[_CPU], cuda=_fwd_cuda, cpu_name=lambda: _CPU, cuda_name=_cuda_name
)
backend.register(
    "fastdistil::kd_loss_bwd", cpu=BWD_IMPLS[_CPU], cuda=_bwd_cuda, cpu_name=lambda: _CPU, cuda_name=_cuda_name
)
