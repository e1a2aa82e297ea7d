"""relation_kl: KL between two models' attention-style distributions, per head and real query row, with no L x L
matrix of either model ever stored. One op serves TinyBERT's attention maps (left = Q, right = K) and MiniLMv2's
self-attention relations (left = right = Q, or K, or V, split into R relation heads).

    S[b, r, i, j] = student_scale * <sl[b, r, i], sr[b, r, j]>,   T[b, r, i, j] = teacher_scale * <tl[.., i], tr[.., j]>
    q = softmax_j(S), p = softmax_j(T) over the real keys j (key_padding_mask[b, j] True)
    kl[b, r, i] = sum_j p (log p - log q) = sum_j p (T - S) - lse_T + lse_S       (0 on padding rows i)
    d kl / d S[b, r, i, j] = q - p, so with g_i = d loss / d kl_i:
    d sl_i = scale_s sum_j g_i (q - p)_ij sr_j,    d sr_j = scale_s sum_i g_i (q - p)_ij sl_i

The forward keeps only the row statistics lse_S and lse_T (B, R, L); the backward recomputes S and T tile by tile
from them (FlashAttention's structure). The teacher's operands are constants. The two sides may have different
head sizes (Ds, Dt): a narrow student is compared with a wide teacher through their distributions, not their widths.

Where each piece lives:
    reference (the spec) ...... relation_kl_fwd_ref / relation_kl_bwd_ref / relation_kl_ref below (L x L matrices)
    cpu ....................... relation_kl_fwd_cpu / relation_kl_bwd_cpu below: blocks of query rows over every
                                key, so the working set is a fixed number of (rows, L) tiles whatever B and R are
    Triton, cuda .............. kernels/relation_kl.py (online softmax over key tiles, two backward kernels)
    tests ..................... tests/ops/test_relation_kl.py
    benchmark ................. benchmarks/bench_relation_kl.py
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastdistil import backend
from fastdistil.ops._common import check_reduction, check_softmax_scale, reference_kernels, unit_stride

try:  # needs `triton`; absent on CPU-only installs
    from fastdistil.kernels import relation_kl as triton_relation_kl
except ImportError:
    triton_relation_kl = None


# -----------------------------------------------------------------------------
# 1. Reference: both (L, L) score matrices, plain PyTorch. The spec and the tests' oracle (compute_dtype=float64).


def _real(x, key_padding_mask, acc):
    """x in the compute dtype, zero at padding positions (whatever padding holds never reaches a real row)."""
    x = x.to(acc)
    return x if key_padding_mask is None else torch.where(key_padding_mask[:, None, :, None], x, 0.0)


def _scores(left, right, scale, key_padding_mask, acc):
    s = (_real(left, key_padding_mask, acc) @ _real(right, key_padding_mask, acc).transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
    return s


def _row_mask(key_padding_mask, like):
    """(B, 1, L) bool: the real query rows (every row without a mask)."""
    if key_padding_mask is None:
        return torch.ones(like.shape[0], 1, like.shape[2], dtype=torch.bool, device=like.device)
    return key_padding_mask[:, None, :]


def relation_kl_fwd_ref(sl, sr, tl, tr, key_padding_mask=None, student_scale=1.0, teacher_scale=1.0,
                        compute_dtype=None):  # fmt: skip
    """Same outputs as fastdistil::relation_kl_fwd: (kl, lse_s, lse_t), each (B, R, L) float32 (float64 for
    float64 inputs). kl is 0 and both lse +inf on padding rows (so that recomputed probabilities there are 0).
    compute_dtype=None: fp32 math; tests pass float64 for the oracle and the input dtype for "what PyTorch gets in
    low precision"."""
    acc = compute_dtype or torch.promote_types(sl.dtype, torch.float32)
    s = _scores(sl, sr, student_scale, key_padding_mask, acc)
    t = _scores(tl, tr, teacher_scale, key_padding_mask, acc)
    lse_s, lse_t = s.logsumexp(-1), t.logsumexp(-1)
    p = torch.exp(t - lse_t[..., None])
    # Masked keys have p = 0: where() keeps (-inf) - (-inf) = NaN out.
    kl = torch.where(p > 0, p * (t - s), 0.0).sum(-1) - lse_t + lse_s
    rows = _row_mask(key_padding_mask, sl)
    out = torch.promote_types(sl.dtype, torch.float32)
    kl = torch.where(rows, kl, 0.0).to(out)
    return kl, lse_s.masked_fill(~rows, math.inf).to(out), lse_t.masked_fill(~rows, math.inf).to(out)


def relation_kl_bwd_ref(grad_kl, sl, sr, tl, tr, lse_s, lse_t, key_padding_mask=None, student_scale=1.0,
                        teacher_scale=1.0, compute_dtype=None):  # fmt: skip
    """Same outputs as fastdistil::relation_kl_bwd: (d sl, d sr) in the student's dtype."""
    acc = compute_dtype or torch.promote_types(sl.dtype, torch.float32)
    s = _scores(sl, sr, student_scale, key_padding_mask, acc)
    t = _scores(tl, tr, teacher_scale, key_padding_mask, acc)
    q, p = torch.exp(s - lse_s.to(acc)[..., None]), torch.exp(t - lse_t.to(acc)[..., None])
    ds = (q - p) * (grad_kl.to(acc) * student_scale)[..., None]
    ds = torch.where(_row_mask(key_padding_mask, sl)[..., None], ds, 0.0)
    sl_, sr_ = _real(sl, key_padding_mask, acc), _real(sr, key_padding_mask, acc)
    return (ds @ sr_).to(sl.dtype), (ds.transpose(-1, -2) @ sl_).to(sr.dtype)


def relation_kl_ref(sl, sr, tl, tr, key_padding_mask=None, student_scale=None, teacher_scale=None):
    """The eager formulation the tools that distil attention use (both models' maps materialised: matmul, mask,
    log_softmax, softmax, kl_div), differentiable by autograd; mean over (batch, head, real query rows). The
    benchmarks' eager baseline and an oracle sharing no code with the op."""
    student_scale = sl.shape[-1] ** -0.5 if student_scale is None else student_scale
    teacher_scale = tl.shape[-1] ** -0.5 if teacher_scale is None else teacher_scale
    s = torch.matmul(sl, sr.transpose(-1, -2)) * student_scale
    with torch.no_grad():
        t = torch.matmul(tl, tr.transpose(-1, -2)) * teacher_scale
    if key_padding_mask is not None:  # transformers' eager mask: the dtype's minimum (-inf would give 0 * inf)
        keys = ~key_padding_mask[:, None, None, :]
        s = s.float().masked_fill(keys, torch.finfo(torch.float32).min)
        t = t.float().masked_fill(keys, torch.finfo(torch.float32).min)
    log_q = torch.log_softmax(s.float(), -1)
    p = torch.softmax(t.float(), -1)
    kl = torch.nn.functional.kl_div(log_q, p, reduction="none").sum(-1)  # (B, R, L); 0 * log 0 = 0 in kl_div
    rows = _row_mask(key_padding_mask, sl).expand_as(kl)
    return kl[rows].sum() / rows.sum().clamp_min(1)


# -----------------------------------------------------------------------------
# 2. CPU implementation: per sequence, blocks of (heads, query rows) against every key of that sequence. A block is
#    small (about TILE_ELEMENTS scores per side), so the working set stays in cache and memory is O(B R L) (the
#    outputs) plus a few tiles, whatever B, R and L are. Each sequence is cut at its last real token (right padding
#    costs nothing); holes before it get MASKED, a finite -inf, as the key's score, so that differences of two
#    masked scores are 0, not NaN, and zeros as the operand rows (whatever padding holds, NaN included, never
#    reaches a real row).

TILE_ELEMENTS = 1 << 18
MASKED = -1e30
# exp's arguments are clamped here first: ATen's vectorised exp falls back to a scalar path on lanes whose result is
# denormal or 0 (measured on these CPUs: 35x slower between -87 and -104, 13x below). exp(-80) = 1.8e-35 stands
# in for anything smaller; on padding keys q and p both get it, so their difference is still exactly 0.
EXP_FLOOR = -80.0


def _sequences(key_padding_mask, B: int, L: int) -> list[tuple[int, bool]]:
    """Per batch row: (n = one past its last real token, whether padding lies before n)."""
    if key_padding_mask is None:
        return [(L, False)] * B
    n = (key_padding_mask * torch.arange(1, L + 1)).amax(-1)
    holes = key_padding_mask.sum(-1) < n
    return list(zip(n.tolist(), holes.tolist()))


def _blocks(R: int, n: int):
    """(head slice, row slice) pairs covering (R, n) query rows of one sequence, about TILE_ELEMENTS scores each."""
    rows = max(1, min(n, TILE_ELEMENTS // max(n, 1)))
    heads = max(1, min(R, TILE_ELEMENTS // max(rows * n, 1))) if rows == n else 1
    for h0 in range(0, R, heads):
        for r0 in range(0, n, rows):
            yield slice(h0, min(h0 + heads, R)), slice(r0, min(r0 + rows, n))


class _Side:
    """One model's operands: score tiles scale * left[b, heads, rows] right[b, heads, :n]^T in fp32."""

    def __init__(self, left, right, scale, key_padding_mask):
        self.left, self.right, self.scale, self.mask = left, right, scale, key_padding_mask

    def rows(self, x: Tensor, b: int, heads: slice, rows: slice, holes: bool) -> Tensor:
        part = x[b, heads, rows].float()
        return torch.where(self.mask[b, rows, None], part, 0.0) if holes else part

    def scores(self, b: int, heads: slice, rows: slice, n: int, holes: bool) -> Tensor:
        a = self.rows(self.left, b, heads, rows, holes)
        k = self.rows(self.right, b, heads, slice(0, n), holes).transpose(1, 2)
        if not holes:
            return torch.bmm(a, k).mul_(self.scale)
        bias = torch.zeros(n).masked_fill_(~self.mask[b, :n], MASKED)
        return torch.baddbmm(bias, a, k, alpha=self.scale)


def _lse_and_exp(x: Tensor) -> tuple[Tensor, Tensor]:
    """(log-sum-exp of each row, exp(x - row max)), overwriting x."""
    m = x.amax(-1, keepdim=True)
    e = x.sub_(m).clamp_(min=EXP_FLOOR).exp_()
    return m.squeeze(-1) + e.sum(-1).log(), e


def relation_kl_fwd_cpu(sl, sr, tl, tr, key_padding_mask, student_scale, teacher_scale):
    if sl.dtype == torch.float64:
        return relation_kl_fwd_ref(sl, sr, tl, tr, key_padding_mask, student_scale, teacher_scale)
    B, R, L, _ = sl.shape
    student, teacher = _Side(sl, sr, student_scale, key_padding_mask), _Side(tl, tr, teacher_scale, key_padding_mask)
    kl = torch.zeros(B, R, L)
    lse_s, lse_t = torch.full((B, R, L), math.inf), torch.full((B, R, L), math.inf)
    for b, (n, holes) in enumerate(_sequences(key_padding_mask, B, L)):
        for heads, rows in _blocks(R, n):
            s, t = student.scores(b, heads, rows, n, holes), teacher.scores(b, heads, rows, n, holes)
            diff = t - s  # 0 on padding keys (MASKED - MASKED)
            ls, _ = _lse_and_exp(s)
            lt, e = _lse_and_exp(t)  # e = exp(t - max t)
            kl[b, heads, rows] = torch.linalg.vecdot(e, diff) / e.sum(-1) - lt + ls  # sum p (t - s) - lse_t + lse_s
            lse_s[b, heads, rows], lse_t[b, heads, rows] = ls, lt
    return _padding_rows(kl, lse_s, lse_t, key_padding_mask)


def relation_kl_bwd_cpu(grad_kl, sl, sr, tl, tr, lse_s, lse_t, key_padding_mask, student_scale, teacher_scale):
    if sl.dtype == torch.float64:
        return relation_kl_bwd_ref(grad_kl, sl, sr, tl, tr, lse_s, lse_t, key_padding_mask, student_scale,
                                   teacher_scale)  # fmt: skip
    B, R, L, _ = sl.shape
    student, teacher = _Side(sl, sr, student_scale, key_padding_mask), _Side(tl, tr, teacher_scale, key_padding_mask)
    g = grad_kl.float() * student_scale
    dsl, dsr = torch.zeros(sl.shape), torch.zeros(sr.shape)
    for b, (n, holes) in enumerate(_sequences(key_padding_mask, B, L)):
        for heads, rows in _blocks(R, n):
            q = student.scores(b, heads, rows, n, holes).sub_(lse_s[b, heads, rows, None])
            p = teacher.scores(b, heads, rows, n, holes).sub_(lse_t[b, heads, rows, None])
            q, p = q.clamp_(min=EXP_FLOOR).exp_(), p.clamp_(min=EXP_FLOOR).exp_()
            ds = q.sub_(p).mul_(g[b, heads, rows, None])  # g * scale * (q - p); 0 on padding rows (lse +inf)
            dsl[b, heads, rows] = torch.bmm(ds, student.rows(sr, b, heads, slice(0, n), holes))
            dsr[b, heads, :n].baddbmm_(ds.transpose(1, 2), student.rows(sl, b, heads, rows, holes))
    return dsl.to(sl.dtype), dsr.to(sr.dtype)


def _padding_rows(kl, lse_s, lse_t, key_padding_mask):
    """The op's contract on padding rows: kl 0, both lse +inf (recomputed probabilities there are 0)."""
    if key_padding_mask is not None:
        pad = ~key_padding_mask[:, None, :]
        kl.masked_fill_(pad, 0.0)
        lse_s.masked_fill_(pad, math.inf)
        lse_t.masked_fill_(pad, math.inf)
    return kl.clamp_min_(0.0), lse_s, lse_t  # KL >= 0 exactly; NaN passes through clamp


# -----------------------------------------------------------------------------
# 3. Schemas and fakes.

FWD_SCHEMA = (
    "(Tensor sl, Tensor sr, Tensor tl, Tensor tr, Tensor? key_padding_mask, float student_scale, "
    "float teacher_scale) -> (Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_kl, Tensor sl, Tensor sr, Tensor tl, Tensor tr, Tensor lse_s, Tensor lse_t, "
    "Tensor? key_padding_mask, float student_scale, float teacher_scale) -> (Tensor, Tensor)"
)
torch.library.define("fastdistil::relation_kl_fwd", FWD_SCHEMA)
torch.library.define("fastdistil::relation_kl_bwd", BWD_SCHEMA)


@torch.library.register_fake("fastdistil::relation_kl_fwd")
def _fwd_fake(sl, sr, tl, tr, key_padding_mask, student_scale, teacher_scale):
    acc = torch.promote_types(sl.dtype, torch.float32)
    return tuple(sl.new_empty(sl.shape[:3], dtype=acc) for _ in range(3))


@torch.library.register_fake("fastdistil::relation_kl_bwd")
def _bwd_fake(grad_kl, sl, sr, tl, tr, lse_s, lse_t, key_padding_mask, student_scale, teacher_scale):
    return sl.new_empty(sl.shape), sr.new_empty(sr.shape)  # contiguous, whatever the operands' layout


# -----------------------------------------------------------------------------
# 4. Autograd: the backward recomputes both score tiles from the saved row statistics; nothing (L, L) is saved.


def _setup_context(ctx, inputs, output):
    sl, sr, tl, tr, key_padding_mask, student_scale, teacher_scale = inputs
    _, lse_s, lse_t = output
    ctx.save_for_backward(sl, sr, tl, tr, lse_s, lse_t, key_padding_mask)
    ctx.scales = (student_scale, teacher_scale)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_kl, _grad_lse_s, _grad_lse_t):
    sl, sr, tl, tr, lse_s, lse_t, key_padding_mask = ctx.saved_tensors
    if grad_kl is None:
        return None, None, None, None, None, None, None
    dsl, dsr = torch.ops.fastdistil.relation_kl_bwd(
        grad_kl.contiguous(), sl, sr, tl, tr, lse_s, lse_t, key_padding_mask, *ctx.scales
    )
    return dsl, dsr, None, None, None, None, None  # the teacher's operands are constants


torch.library.register_autograd("fastdistil::relation_kl_fwd", _backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# 5. Public API.


def _check_side(name: str, left, right) -> None:
    for part, x in (("left", left), ("right", right)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}_{part} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}_{part} must be a floating-point tensor (float32, bfloat16, float16), "
                            f"got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name}_{part} must have shape (B, heads, L, D), got {tuple(x.shape)}")
    if left.shape != right.shape:
        raise ValueError(f"{name}_left and {name}_right must have the same shape, got {tuple(left.shape)} and "
                         f"{tuple(right.shape)}")  # fmt: skip
    if not 1 <= left.shape[-1] <= 256:
        raise ValueError(f"the {name}'s head dimension must be between 1 and 256, got {left.shape[-1]}")


def _check_operands(sl, sr, tl, tr, key_padding_mask) -> None:
    _check_side("student", sl, sr)
    _check_side("teacher", tl, tr)
    if sl.shape[:3] != tl.shape[:3]:
        raise ValueError(
            f"student and teacher operands must agree in (B, heads, L), got {tuple(sl.shape[:3])} and "
            f"{tuple(tl.shape[:3])} (the head dimension may differ)"
        )
    if len({x.dtype for x in (sl, sr, tl, tr)}) != 1:
        raise TypeError(f"all operands must have one dtype, got {[str(x.dtype) for x in (sl, sr, tl, tr)]} "
                        "(cast the teacher's to the student's dtype)")  # fmt: skip
    if len({x.device for x in (sl, sr, tl, tr)}) != 1:
        raise ValueError("all operands must be on one device")
    if key_padding_mask is None:
        return
    B, _, L, _ = sl.shape
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError("key_padding_mask must be a bool tensor (True = real token), e.g. attention_mask.bool()")
    if key_padding_mask.shape != (B, L):
        raise ValueError(f"key_padding_mask must have shape (B, L) = {(B, L)}, got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != sl.device:
        raise ValueError(f"key_padding_mask must be on {sl.device} like the operands, got {key_padding_mask.device}")


def relation_kl(
    student_left: Tensor,
    student_right: Tensor,
    teacher_left: Tensor,
    teacher_right: Tensor,
    key_padding_mask: Tensor | None = None,
    student_scale: float | None = None,
    teacher_scale: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """KL(softmax(teacher_left teacher_right^T * teacher_scale) || softmax(student_left student_right^T *
    student_scale)) per head and real query row, over the real keys, without storing any (L, L) matrix.

    student_left, student_right: (B, heads, L, Ds); receive gradients (pass one tensor twice for Q-Q relations:
                                 autograd adds both halves of its gradient). Any strides with a unit last stride.
    teacher_left, teacher_right: (B, heads, L, Dt), the same B, heads and L, any Dt; constants (detached).
    key_padding_mask:            bool (B, L), True = a real token (a key that counts and a query row that counts).
    student_scale / teacher_scale: multiply the scores; None: 1 / sqrt(Ds) and 1 / sqrt(Dt).
    reduction:                   "mean" over (batch, head, real query rows) (0 when there is none), "sum", or
                                 "none" ((B, heads, L), 0 on padding rows).
    All four operands share one dtype (float32 / bfloat16 / float16); the math is fp32; the result is float32.
    """
    _check_operands(student_left, student_right, teacher_left, teacher_right, key_padding_mask)
    check_reduction(reduction, ("mean", "sum", "none"))
    ss = check_softmax_scale("student_scale", student_scale, student_left.shape[-1])
    ts = check_softmax_scale("teacher_scale", teacher_scale, teacher_left.shape[-1])
    tl, tr = teacher_left.detach(), teacher_right.detach()
    if reference_kernels():  # the spec, differentiated by autograd
        kl, _, _ = relation_kl_fwd_ref(student_left, student_right, tl, tr, key_padding_mask, ss, ts)
    else:
        sl, sr = unit_stride(student_left), unit_stride(student_right)
        kl, _, _ = torch.ops.fastdistil.relation_kl_fwd(sl, sr, unit_stride(tl), unit_stride(tr),
                                                        key_padding_mask, ss, ts)  # fmt: skip
    if reduction == "none":
        return kl
    total = kl.sum()
    if reduction == "sum":
        return total
    B, R, L = kl.shape
    if key_padding_mask is None:
        return total / max(B * R * L, 1)
    return total / (key_padding_mask.sum() * R).clamp_min(1).to(total.dtype)  # on the device: no host sync


# -----------------------------------------------------------------------------
# 6. Implementations and wiring.

FWD_IMPLS = {"reference": relation_kl_fwd_ref, "cpu_blocked": relation_kl_fwd_cpu}
BWD_IMPLS = {"reference": relation_kl_bwd_ref, "cpu_blocked": relation_kl_bwd_cpu}
if triton_relation_kl is not None:
    FWD_IMPLS["cuda_triton"] = triton_relation_kl.relation_kl_fwd  # kernels/relation_kl.py
    BWD_IMPLS["cuda_triton"] = triton_relation_kl.relation_kl_bwd

# CPU: the blocked PyTorch implementation. CUDA: Triton (the reference, warned, without it).
backend.wire(
    "relation_kl", {"relation_kl_fwd": FWD_IMPLS, "relation_kl_bwd": BWD_IMPLS}, cuda_preference=("cuda_triton",)
)
