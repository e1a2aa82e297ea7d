"""fused_distill_head: DistilBERT's loss_ce and loss_mlm straight from hidden states, never holding
(tokens x vocabulary) logits.

Both models end in a biased projection onto the vocabulary: logits = hidden @ weight.T + bias. With
p = softmax(teacher_logits / T), q = softmax(student_logits / T), R_kl the KL rows, R_mlm the labelled rows:

    loss_ce  = T^2 / |R_kl| * sum_{R_kl} KL(p || q)                       (0 when R_kl is empty)
    loss_mlm = 1 / |R_mlm| * sum_{R_mlm} (logsumexp(s) - s[label])        (0 when R_mlm is empty)
    d (alpha_ce loss_ce + alpha_mlm loss_mlm) / d s
        = alpha_ce T / |R_kl| (q - p) + alpha_mlm / |R_mlm| (softmax(s) - onehot)

The rows of R_kl u R_mlm are processed in chunks of C rows: per chunk, two GEMMs (platform BLAS / cuBLAS)
give the teacher and student logits (C, V); the fused epilogue (fastdistil::distill_epilogue: C++ on
CPU, CUDA C++ or Triton on GPU) computes both losses per row and overwrites the student logits with the
gradient of the weighted objective in the same sweep; two more GEMMs push that gradient to the hidden
states and (accumulated in fp32) to the weight, and a column sum to the bias. Peak extra memory is two
(C, V) buffers plus the (V, H) fp32 weight-gradient accumulator, independent of N.

The gradient is computed in the FORWARD, for alpha_ce * loss_ce + alpha_mlm * loss_mlm; the backward
scales it by the incoming gradients (which must therefore be proportional to (alpha_ce, alpha_mlm), as
they are when the total loss is that weighted sum times any factor: gradient accumulation, GradScaler).
Anything else is refused with a clear error on CPU; on CUDA, where checking would need a host sync, the
gradients come out NaN instead of wrong.

Where each piece lives:
    reference (the spec) ...... distill_epilogue_ref / distill_head_ref below
    chunk loop ................ _head_forward below (device-generic PyTorch: GEMMs + the epilogue op)
    epilogue, C++ cpu ......... csrc/cpu/distill_head.cpp  -> torch.ops.fastdistil._distill_epilogue_cpu
    epilogue, CUDA C++ ........ csrc/cuda/distill_head.cu  -> torch.ops.fastdistil._distill_epilogue_cuda
    shared per-row math ....... csrc/common/fd_math.h (head_grad, ce_row_loss, the kd_loss functions)
    epilogue, Triton .......... kernels/distill_head.py
    tests ..................... tests/ops/test_distill_head.py
    benchmark ................. benchmarks/bench_distill_head.py
"""

from __future__ import annotations

import math
import numbers
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdistil import backend
from fastdistil.ops._common import check_mask, check_temperature, is_eager, reference_kernels

try:  # needs `triton`; absent on CPU-only installs
    from fastdistil.kernels import distill_head as triton_distill_head
except ImportError:
    triton_distill_head = None

IGNORE_INDEX = -100
DEFAULT_BUDGET_MB = 256  # chunk logits; override with FASTDISTIL_HEAD_BUDGET_MB


# -----------------------------------------------------------------------------
# 1. References. Plain PyTorch.


def distill_epilogue_math(
    student_logits, teacher_logits, kl_rows, labels, kl_coef, mlm_coef, temperature, compute_dtype=None
):
    """(kl (C,), ce (C,), grad (C, V)) of one chunk, functionally: the spec of the epilogue kernels.

    kl[i] = KL(p_i || q_i) on KL rows (kl_rows None = all rows), else 0; ce[i] = cross-entropy of s_i at T = 1
    against labels[i] where labels[i] != -100, else 0; grad = kl_c (q - p) + mlm_c (softmax(s) - onehot) with
    kl_c = kl_coef on KL rows, mlm_c = mlm_coef on labelled rows (0 elsewhere). Math in fp32 (compute_dtype:
    what tests ask for, float64 for the oracle)."""
    acc = compute_dtype or torch.promote_types(student_logits.dtype, torch.float32)
    s, t = student_logits.to(acc), teacher_logits.to(acc)
    C, V = s.shape
    in_kl = torch.ones(C, dtype=torch.bool, device=s.device) if kl_rows is None else kl_rows
    lab = torch.full((C,), IGNORE_INDEX, dtype=torch.long, device=s.device) if labels is None else labels
    has_label = lab != IGNORE_INDEX
    log_q, log_p = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    p = log_p.exp()
    kl = (torch.where(p > 0, log_p - log_q, 0.0) * p).sum(-1)
    kl = torch.where(in_kl, kl, 0.0)
    log_r = s.log_softmax(-1)
    safe = torch.where(has_label, lab, 0)
    ce = torch.where(has_label, -log_r.gather(1, safe[:, None]).squeeze(1), 0.0)
    kl_c = torch.where(in_kl, kl_coef.to(acc), 0.0)[:, None]
    mlm_c = torch.where(has_label, mlm_coef.to(acc), 0.0)[:, None]
    onehot = F.one_hot(safe, V).to(acc)
    grad = kl_c * (log_q.exp() - p) + mlm_c * (log_r.exp() - onehot)
    return kl, ce, grad


def distill_epilogue_ref(student_logits, teacher_logits, kl_rows, labels, kl_coef, mlm_coef, temperature, with_grad):
    """Same contract as fastdistil::distill_epilogue: returns (kl, ce) and, with_grad, overwrites the student
    logits with the gradient."""
    kl, ce, grad = distill_epilogue_math(
        student_logits, teacher_logits, kl_rows, labels, kl_coef, mlm_coef, temperature
    )
    if with_grad:
        student_logits.copy_(grad)
    return kl.float() if kl.dtype != torch.float64 else kl, ce.float() if ce.dtype != torch.float64 else ce


def distill_head_ref(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    *,
    temperature=2.0,
    kl_mask=None,
    mlm_labels=None,
):
    """The DistilBERT distiller's formulation, differentiable by autograd: full logits from both heads,
    masked_select of the KL rows, KLDivLoss(batchmean) * T^2 at temperature, CrossEntropyLoss(ignore_index=-100).
    The benchmarks' eager baseline and the tests' oracle (run it on float64 copies). Empty row sets give 0
    (the distiller would divide by zero)."""
    t_logits = F.linear(
        teacher_hidden.detach(), teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()
    )
    s_logits = F.linear(student_hidden, student_weight, student_bias)
    V = s_logits.shape[-1]
    if kl_mask is not None:
        sel = kl_mask.unsqueeze(-1).expand_as(s_logits)
        s_sel, t_sel = torch.masked_select(s_logits, sel).view(-1, V), torch.masked_select(t_logits, sel).view(-1, V)
    else:
        s_sel, t_sel = s_logits.reshape(-1, V), t_logits.reshape(-1, V)
    kl = F.kl_div(torch.log_softmax(s_sel / temperature, -1), torch.softmax(t_sel / temperature, -1), reduction="sum")
    loss_ce = kl / max(s_sel.shape[0], 1) * temperature**2
    if mlm_labels is None:
        loss_mlm = s_logits.new_zeros(())
    else:
        labels = mlm_labels.reshape(-1)
        ce = F.cross_entropy(s_logits.reshape(-1, V), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        loss_mlm = ce / (labels != IGNORE_INDEX).sum().clamp_min(1)
    return loss_ce, loss_mlm


# -----------------------------------------------------------------------------
# 2. Schemas. The epilogue: public op (wired per device) and one private op per native kernel. The head:
#    one device-generic op (the chunk loop in PyTorch) with a fake and autograd, so torch.compile sees one
#    opaque node and never traces the loop.

EPILOGUE_SCHEMA = (
    "(Tensor(a!) student_logits, Tensor teacher_logits, Tensor? kl_rows, Tensor? labels, Tensor kl_coef, "
    "Tensor mlm_coef, float temperature, bool with_grad) -> (Tensor, Tensor)"
)
for _name in ("distill_epilogue", "_distill_epilogue_cpu", "_distill_epilogue_cuda"):
    torch.library.define(f"fastdistil::{_name}", EPILOGUE_SCHEMA)

torch.library.define(
    "fastdistil::distill_head_fwd",
    "(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor teacher_hidden, "
    "Tensor teacher_weight, Tensor? teacher_bias, Tensor? kl_mask, Tensor? labels, float temperature, "
    "float alpha_ce, float alpha_mlm, int chunk_size, ScalarType compute_dtype, bool with_grad) "
    "-> (Tensor loss_ce, Tensor loss_mlm, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
)


# -----------------------------------------------------------------------------
# 3. Fakes.


def _epilogue_fake(student_logits, teacher_logits, kl_rows, labels, kl_coef, mlm_coef, temperature, with_grad):
    n = student_logits.shape[0]
    return student_logits.new_empty((n,), dtype=torch.float32), student_logits.new_empty((n,), dtype=torch.float32)


for _name in ("distill_epilogue", "_distill_epilogue_cpu", "_distill_epilogue_cuda"):
    torch.library.register_fake(f"fastdistil::{_name}")(_epilogue_fake)


def _loss_dtype(compute_dtype):
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastdistil::distill_head_fwd")
def _head_fake(
    sh, sw, sb, th, tw, tb, kl_mask, labels, temperature, alpha_ce, alpha_mlm, chunk_size, compute_dtype, with_grad
):
    acc = _loss_dtype(compute_dtype)
    grads = (
        (sh.new_empty(sh.shape), sw.new_empty(sw.shape), sw.new_empty(sb.shape if sb is not None else (0,)))
        if with_grad
        else (sh.new_empty((0,)), sw.new_empty((0,)), sw.new_empty((0,)))
    )
    return (sh.new_empty((), dtype=acc), sh.new_empty((), dtype=acc), *grads)


# -----------------------------------------------------------------------------
# 4. The chunk loop (every device) and its autograd.


def choose_chunk_size(
    n_rows: int, hidden_sizes: tuple[int, ...], vocab: int, itemsize: int, budget_bytes: int | None = None
) -> int:
    """Rows per chunk: as many as fit two (C, V) logit buffers and the gathered hidden rows in the budget
    (FASTDISTIL_HEAD_BUDGET_MB, default 256 MiB), a multiple of 64 (GEMM tiles), at least 1, at most n_rows."""
    if budget_bytes is None:
        budget_bytes = int(float(os.environ.get("FASTDISTIL_HEAD_BUDGET_MB", DEFAULT_BUDGET_MB)) * 2**20)
    per_row = (2 * vocab + sum(hidden_sizes)) * itemsize
    chunk = max(1, budget_bytes // per_row)
    if chunk >= 128:
        chunk -= chunk % 64
    return max(1, min(chunk, n_rows))


def _epilogue(zs, zt, kl_rows, labels, kl_coef, mlm_coef, temperature, with_grad):
    if zs.dtype == torch.float64:  # the native kernels stop at fp32; fp64 runs (tests) use the reference
        return distill_epilogue_ref(zs, zt, kl_rows, labels, kl_coef, mlm_coef, temperature, with_grad)
    return torch.ops.fastdistil.distill_epilogue(zs, zt, kl_rows, labels, kl_coef, mlm_coef, temperature, with_grad)


def _project(hidden, weight, bias):
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


def _head_forward(*args):
    """The CPU and CUDA kernel of fastdistil::distill_head_fwd (arguments as in its schema)."""
    with torch.autocast(args[0].device.type, enabled=False):  # the dtypes are chosen explicitly (compute_dtype)
        return _head_loop(*args)


def _row_sets(kl_mask, labels, N, V, device):
    """(labels, has_label, n_kl, n_mlm, bad_labels) on the device. A label outside [0, V) other than -100 is a
    clear error on CPU (checking is free there); on a GPU, where checking needs a host sync, such rows leave the
    MLM set and `bad_labels` makes loss_mlm NaN (the trainer's NaN guard names it)."""
    bad = None
    if labels is not None and device.type == "cpu":
        check_label_values(labels, V)
    elif labels is not None:
        wrong = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
        bad, labels = wrong.any(), torch.where(wrong, IGNORE_INDEX, labels)
    has_label = None if labels is None else labels != IGNORE_INDEX
    n_kl = kl_mask.sum() if kl_mask is not None else torch.full((), N, device=device)  # no host-to-device copy
    n_mlm = has_label.sum() if has_label is not None else torch.zeros((), dtype=torch.long, device=device)
    return labels, has_label, n_kl, n_mlm, bad


def _active_rows(kl_mask, has_label, N):
    """Compact row list: the rows in either set, in order. Only a mask needs it (None = every row is a KL row,
    and chunks are plain slices). The row count is the one host read of the call, outside the loop: it sizes
    the chunk loop (without it every chunk of padding rows would cost its GEMMs)."""
    if kl_mask is None:
        return None, N
    active = kl_mask if has_label is None else kl_mask | has_label
    n_active = int(active.sum())
    return torch.argsort((~active).to(torch.uint8), stable=True)[:n_active], n_active


def _fp16_gradient_scale(kl_coef, mlm_coef):
    """fp16 chunks store the logits' gradient (alpha T / |R|)(q - p) in fp16, where most of it would underflow
    (|R| in the thousands, q - p ~ 1/V). The kernels get coefficients times this power of two, which brings the
    larger one into [1, 2) (entries of at most ~2, no overflow in the GEMMs after), and the fp32 accumulators
    divide it out exactly. A device scalar: no host sync."""
    larger = torch.maximum(kl_coef, mlm_coef).clamp_min(2.0**-100)
    return torch.exp2(-torch.floor(torch.log2(larger)))


class _Grads:
    """The gradients of student hidden states, weight and bias, accumulated chunk by chunk in fp32."""

    def __init__(self, sh, sw, sb, acc, scale):
        self.h = torch.zeros_like(sh)
        self.w = torch.zeros(sw.shape, dtype=acc, device=sh.device)  # fp32 accumulator over chunks
        self.b = torch.zeros(sw.shape[0], dtype=acc, device=sh.device) if sb is not None else None
        self.acc, self.scale = acc, scale

    def _unscaled(self, x):
        x = x.to(self.acc)
        return x if self.scale is None else x / self.scale

    def add(self, zs, hs, swc, idx, start, stop):
        """zs: d objective / d student logits of the chunk (times `scale` for fp16); hs its hidden states."""
        gh = self._unscaled(zs @ swc).to(self.h.dtype)
        if idx is None:
            self.h[start:stop] = gh
        else:
            self.h.index_copy_(0, idx, gh)
        if zs.dtype == self.acc:
            self.w.addmm_(zs.t(), hs)
        else:  # bf16/fp16 GEMM, accumulated in fp32 across chunks
            self.w += self._unscaled(zs.t() @ hs)
        if self.b is not None:
            self.b += self._unscaled(zs.sum(0, dtype=self.acc))

    def result(self, sw, sb):
        grad_b = self.b.to(sb.dtype) if self.b is not None else sw.new_empty((0,))
        return self.h, self.w.to(sw.dtype), grad_b


def _head_loop(sh, sw, sb, th, tw, tb, kl_mask, labels, temperature, alpha_ce, alpha_mlm, chunk_size, cd, with_grad):
    N, V, device, acc = sh.shape[0], sw.shape[0], sh.device, _loss_dtype(cd)
    # Row sets and their sizes stay on the device: the coefficients are 0-d tensors, no host sync.
    labels, has_label, n_kl, n_mlm, bad_labels = _row_sets(kl_mask, labels, N, V, device)
    kl_den, mlm_den = n_kl.clamp_min(1).to(acc), n_mlm.clamp_min(1).to(acc)
    kl_coef = alpha_ce * temperature / kl_den  # fp32 (fp64 for fp64 runs); the kernels read them as fp32
    mlm_coef = alpha_mlm / mlm_den
    scale = _fp16_gradient_scale(kl_coef, mlm_coef) if with_grad and cd == torch.float16 else None
    if scale is not None:
        kl_coef, mlm_coef = kl_coef * scale, mlm_coef * scale
    rows, n_active = _active_rows(kl_mask, has_label, N)
    swc, twc = sw.to(cd), tw.to(cd)
    sbc = None if sb is None else sb.to(cd)
    tbc = None if tb is None else tb.to(cd)
    kl_sum = torch.zeros((), dtype=acc, device=device)
    ce_sum = torch.zeros((), dtype=acc, device=device)
    grads = _Grads(sh, sw, sb, acc, scale) if with_grad else None
    for start in range(0, n_active, chunk_size):
        stop = min(start + chunk_size, n_active)
        idx = None if rows is None else rows[start:stop]
        if idx is None:
            hs, ht = sh[start:stop], th[start:stop]
            kl_rows, lab = None, None if labels is None else labels[start:stop]
        else:
            hs, ht = sh.index_select(0, idx), th.index_select(0, idx)
            kl_rows, lab = kl_mask.index_select(0, idx), None if labels is None else labels.index_select(0, idx)
        hs = hs.to(cd)
        zt = _project(ht.to(cd), twc, tbc)
        zs = _project(hs, swc, sbc)
        del ht
        kl, ce = _epilogue(zs, zt, kl_rows, lab, kl_coef, mlm_coef, temperature, with_grad)
        del zt
        kl_sum += kl.sum(dtype=acc)
        ce_sum += ce.sum(dtype=acc)
        if grads is not None:  # zs now holds d objective / d student logits
            grads.add(zs, hs, swc, idx, start, stop)
        del zs, hs
    loss_ce = kl_sum * (temperature * temperature) / kl_den
    loss_mlm = ce_sum / mlm_den
    if bad_labels is not None:
        loss_mlm = torch.where(bad_labels, torch.nan, loss_mlm)
    if grads is None:
        empty = sh.new_empty((0,))
        return loss_ce, loss_mlm, empty, sw.new_empty((0,)), sw.new_empty((0,))
    return loss_ce, loss_mlm, *grads.result(sw, sb)


torch.library.register_kernel("fastdistil::distill_head_fwd", ("cpu", "cuda"), _head_forward)


def _setup_context(ctx, inputs, output):
    ctx.alphas = (inputs[9], inputs[10])
    ctx.with_grad = inputs[13]
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[2:])
    ctx.set_materialize_grads(False)


def _grad_scale(g_ce, g_mlm, alpha_ce, alpha_mlm, like):
    """The factor s with (g_ce, g_mlm) = s * (alpha_ce, alpha_mlm), as a 0-d tensor; NaN where no such s exists
    (after raising in eager mode on CPU, where reading the check costs nothing)."""
    zero = like.new_zeros((), dtype=torch.float32)
    g_ce = zero if g_ce is None else g_ce.float()
    g_mlm = zero if g_mlm is None else g_mlm.float()
    if alpha_ce != 0:
        scale = g_ce / alpha_ce
        ok = torch.isclose(g_mlm, scale * alpha_mlm, rtol=1e-5, atol=0.0)
    elif alpha_mlm != 0:
        scale = g_mlm / alpha_mlm
        ok = g_ce == 0
    else:
        scale = zero
        ok = (g_ce == 0) & (g_mlm == 0)
    # Non-finite incoming gradients are not a contract violation: they propagate (a NaN guard upstream sees them).
    ok = ok | ~torch.isfinite(g_ce) | ~torch.isfinite(g_mlm)
    if like.device.type == "cpu" and is_eager(ok) and not bool(ok):
        raise RuntimeError(
            "fused_distill_head computes its gradient in the forward for alpha_ce * loss_ce + alpha_mlm * loss_mlm "
            f"(alpha_ce={alpha_ce}, alpha_mlm={alpha_mlm}), but the backward received gradients "
            f"({g_ce.item():g}, {g_mlm.item():g}) for (loss_ce, loss_mlm), which are not proportional to them. "
            "Pass the alphas you weight the losses with (e.g. backpropagate alpha_ce * loss_ce + alpha_mlm * loss_mlm)."
        )
    return torch.where(ok, scale, float("nan"))


def _backward(ctx, g_ce, g_mlm, *_grads_of_grads):
    if not ctx.with_grad:
        raise RuntimeError("fastdistil::distill_head_fwd was called with with_grad=False; use fused_distill_head()")
    grad_h, grad_w, grad_b = ctx.saved_tensors
    scale = _grad_scale(g_ce, g_mlm, *ctx.alphas, like=grad_h)
    grad_h = (grad_h * scale).to(grad_h.dtype)
    grad_w = (grad_w * scale).to(grad_w.dtype)
    grad_b = (grad_b * scale).to(grad_b.dtype) if ctx.has_bias else None
    return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastdistil::distill_head_fwd", _backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# 5. Public API.


def _check_tensor(name, x, dims=None, floating=True):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16), got {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")


def _check_side(side, hidden, weight, bias):
    _check_tensor(f"{side}_hidden", hidden)
    _check_tensor(f"{side}_weight", weight, dims=2)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{side}_hidden must have shape (..., H) with H = {side}_weight.shape[1] = {weight.shape[1]} "
            f"({side}_weight is (V, H)), got {tuple(hidden.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{side}_weight has an empty dimension: {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor(f"{side}_bias", bias, dims=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{side}_bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, x in ((f"{side}_weight", weight), (f"{side}_bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {side}_hidden is on {hidden.device}")


def _check_alpha(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_labels(labels, leading, V, device):
    """labels: None or an integer tensor of the leading shape (values: check_label_values)."""
    if labels is None:
        return
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or labels.dtype == torch.bool
        or labels.is_complex()
    ):
        raise TypeError(
            f"mlm_labels must be an integer tensor (-100 = no label), got {getattr(labels, 'dtype', type(labels))}"
        )
    if labels.shape != leading:
        raise ValueError(
            f"mlm_labels must have the leading shape of the hidden states, {tuple(leading)}, got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"mlm_labels must be on {device} like the hidden states, got {labels.device}")


def check_label_values(labels, V):
    """Every label is -100 or in [0, V). Reads one bool on the host, so it runs inside the op (where the data is
    real, also under torch.compile), before any GEMM."""
    if labels is None:
        return
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        value = labels[bad].flatten()[0].item()
        raise ValueError(f"mlm_labels holds {value}, outside [0, {V}) (the vocabulary) and not -100 (no label)")


def _check_head_args(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
    temperature, kl_mask, mlm_labels, alpha_ce, alpha_mlm, chunk_size,
):  # fmt: skip
    """Every argument check of fused_distill_head, before any GEMM; returns the checked scalars."""
    _check_side("student", student_hidden, student_weight, student_bias)
    _check_side("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher and student vocabularies differ: teacher_weight has V = {teacher_weight.shape[0]}, "
            f"student_weight has V = {student_weight.shape[0]}"
        )
    leading = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading:
        raise ValueError(
            f"teacher_hidden must have the leading shape of student_hidden, {tuple(leading)}, "
            f"got {tuple(teacher_hidden.shape[:-1])}"
        )
    device = student_hidden.device
    if teacher_hidden.device != device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {device}")
    temperature = check_temperature(temperature)
    alpha_ce, alpha_mlm = _check_alpha("alpha_ce", alpha_ce), _check_alpha("alpha_mlm", alpha_mlm)
    check_mask(kl_mask, leading, device, "the hidden states")
    V = student_weight.shape[0]
    check_labels(mlm_labels, leading, V, device)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return temperature, alpha_ce, alpha_mlm


def fused_distill_head(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    *,
    temperature: float = 2.0,
    kl_mask: Tensor | None = None,
    mlm_labels: Tensor | None = None,
    alpha_ce: float = 1.0,
    alpha_mlm: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss_ce, loss_mlm) of DistilBERT from the hidden states before both vocabulary projections.

    student_hidden: (..., H_s), student_weight: (V, H_s), student_bias: (V,) or None; gradients flow to all three.
    teacher_hidden: (..., H_t) with the same leading shape, teacher_weight: (V, H_t), teacher_bias: (V,) or None;
        constants (H_t may differ from H_s: each side has its own projection).
    kl_mask:     bool (...), the rows of loss_ce (e.g. the attention mask); None = every row.
    mlm_labels:  integer (...), the label of each row for loss_mlm, -100 = none; None = no MLM loss (0). A label
                 outside [0, V) is a ValueError on CPU; on a GPU (where checking would need a host sync) it
                 makes loss_mlm NaN.
    alpha_ce, alpha_mlm: the weights the caller gives the two losses. The gradient is computed in the forward
        for alpha_ce * loss_ce + alpha_mlm * loss_mlm; backpropagate that sum (times any factor).
    chunk_size:  rows per chunk; None chooses it from a memory budget (see choose_chunk_size).
    fp32 / bf16 / fp16 inputs, and autocast (the GEMMs run in the autocast dtype); softmax math in fp32.
    Returns two fp32 scalars (fp64 for fp64 inputs); each is 0 when its row set is empty.
    """
    temperature, alpha_ce, alpha_mlm = _check_head_args(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        temperature, kl_mask, mlm_labels, alpha_ce, alpha_mlm, chunk_size,
    )  # fmt: skip
    leading, device, V = student_hidden.shape[:-1], student_hidden.device, student_weight.shape[0]
    if reference_kernels():
        student = (student_hidden, student_weight, student_bias)
        teacher = (teacher_hidden, teacher_weight, teacher_bias)
        return distill_head_ref(*student, *teacher, temperature=temperature, kl_mask=kl_mask, mlm_labels=mlm_labels)
    if torch.is_autocast_enabled(device.type):
        compute_dtype = torch.get_autocast_dtype(device.type)
    else:
        compute_dtype = student_hidden.dtype
        for x in (student_weight, student_bias):
            if x is not None:
                compute_dtype = torch.promote_types(compute_dtype, x.dtype)
    N = math.prod(leading)
    sh = student_hidden.reshape(N, student_hidden.shape[-1])
    th = teacher_hidden.detach().reshape(N, teacher_hidden.shape[-1])
    if chunk_size is None:
        itemsize = torch.finfo(compute_dtype).bits // 8
        chunk_size = choose_chunk_size(N, (sh.shape[1], th.shape[1]), V, itemsize)
    labels = None if mlm_labels is None else mlm_labels.reshape(N).to(torch.long)
    with_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)
    )
    loss_ce, loss_mlm, *_ = torch.ops.fastdistil.distill_head_fwd(
        sh,
        student_weight,
        student_bias,
        th,
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        None if kl_mask is None else kl_mask.reshape(N),
        labels,
        temperature,
        alpha_ce,
        alpha_mlm,
        chunk_size,
        compute_dtype,
        with_grad,
    )
    return loss_ce, loss_mlm


# -----------------------------------------------------------------------------
# 6. Epilogue implementations and wiring (the head itself is device-generic PyTorch around the epilogue).

EPILOGUE_IMPLS = {
    "reference": distill_epilogue_ref,  # any device
    "cpu_cpp": torch.ops.fastdistil._distill_epilogue_cpu,  # csrc/cpu/distill_head.cpp
    "cuda_cpp": torch.ops.fastdistil._distill_epilogue_cuda,  # csrc/cuda/distill_head.cu
}
if triton_distill_head is not None:
    EPILOGUE_IMPLS["cuda_triton"] = triton_distill_head.distill_epilogue  # kernels/distill_head.py

# CPU: the C++ kernel ("reference", warned, when _C is missing). CUDA: Triton first, then CUDA C++.
backend.wire("distill_head", {"distill_epilogue": EPILOGUE_IMPLS}, cuda_preference=("cuda_triton", "cuda_cpp"))
