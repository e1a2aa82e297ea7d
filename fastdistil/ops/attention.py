"""attention: bidirectional (non-causal) scaled-dot-product attention with key padding and dropout.

    out[b, h, i] = sum_j P'[b, h, i, j] * v[b, h, j]
    P = softmax_j(scale * <q_i, k_j>) over the kept keys j (key_padding_mask[b, j] True)
    P' = P * keep / (1 - dropout_p), keep[b*heads + h, i, j] = dropout_keep_ref(seed, ...)   (BERT's order:
         dropout on the normalised probabilities)
A query row whose keys are all masked gets out = 0 and lse = -inf (not NaN), and zero gradients.

Two entry points: attention(q, k, v) on (B, heads, L, D) tensors (any strides with a unit last stride; the
(B, L, heads, D) memory layout that transformers' projections produce is read without a copy), and
attention_varlen(q, k, v, cu_seqlens, max_seqlen) on unpadded (total_tokens, heads, D) tensors, which never
spends work on padding.

Where each piece lives:
    reference (the spec) ...... attention_fwd_ref / attention_bwd_ref / dropout_keep_ref below
    cpu ....................... attention_fwd_cpu / attention_bwd_cpu below: ATen's CPU flash kernel (what SDPA
                                runs) without dropout; the reference with dropout (the mask must be ours so that
                                the backward can regenerate it)
    Triton, cuda .............. kernels/attention.py (FlashAttention-2 style forward and backward)
    tests ..................... tests/ops/test_attention.py
    benchmark ................. benchmarks/bench_attention.py
    transformers models ....... fastdistil/patch.py (patch_model)
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastdistil import backend
from fastdistil.dropout_seed import dropout_threshold, fold_seed  # noqa: F401  (part of the op's spec)
from fastdistil.ops._common import check_softmax_scale, unit_stride

try:  # needs `triton`; absent on CPU-only installs
    from fastdistil.kernels import attention as triton_attention
except ImportError:
    triton_attention = None

# -----------------------------------------------------------------------------
# 1. Reference. Plain PyTorch with the (L, L) matrices: the spec, the tests' oracle (compute_dtype=float64),
#    and the CPU slot's dropout path.

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 tensors holding uint32 values, without int64 overflow (c split in halves)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: Tensor) -> Tensor:
    """The kernels' 32-bit hash (kernels/attention.py: _mix32), bit for bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_ref(seed: int, batch_heads: int, L: int, dropout_p: float, device=None) -> Tensor:
    """(batch_heads, L, L) bool: which attention probabilities survive dropout; row bh = b * heads + h.
    Same hash as the kernels: row key = mix(seed + mix(bh * L + i)), element = mix(row key + j * 0x9E3779B9)."""
    i = torch.arange(batch_heads * L, device=device, dtype=torch.int64)  # bh * L + i, flattened
    row = _mix32((fold_seed(seed) + _mix32(i & _M32)) & _M32).view(batch_heads, L, 1)
    j = _mul32(torch.arange(L, device=device, dtype=torch.int64), 0x9E3779B9)
    x = _mix32((row + j) & _M32)
    return (x >> 8) >= dropout_threshold(dropout_p)


def _varlen_mask(cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """(B, max_seqlen) bool: which positions of each sequence of a varlen batch exist."""
    lengths = cu_seqlens.diff().long()
    return torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < lengths[:, None]


def _padded(x: Tensor, mask: Tensor) -> Tensor:
    """(T, heads, D) -> (B, heads, L, D), zero where mask (B, L) is False."""
    out = x.new_zeros((*mask.shape, *x.shape[1:]))
    out[mask] = x
    return out.transpose(1, 2)


def _unpadded(x: Tensor, mask: Tensor) -> Tensor:
    """(B, heads, L, D) -> (T, heads, D): the rows where mask (B, L) is True."""
    return x.transpose(1, 2)[mask]


def attention_fwd_ref(
    q, k, v, key_padding_mask=None, cu_seqlens=None, max_seqlen=0, dropout_p=0.0, scale=None, seed=0, compute_dtype=None
):
    """Same outputs as fastdistil::attention_fwd: (out in q's dtype, lse float32: (B, heads, L), or (heads, T)
    for varlen). compute_dtype=None: fp32 math (fp64 for fp64 inputs); tests pass float64 for the oracle and
    the input dtype for "what PyTorch gets in low precision"."""
    if cu_seqlens is not None:
        mask = _varlen_mask(cu_seqlens, max_seqlen)
        qp, kp, vp = (_padded(x, mask) for x in (q, k, v))
        out, lse = attention_fwd_ref(qp, kp, vp, mask, None, 0, dropout_p, scale, seed, compute_dtype)
        out = torch.empty_like(q).copy_(_unpadded(out, mask))
        return out, lse.transpose(1, 2)[mask].transpose(0, 1).contiguous()
    acc = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, L, _ = q.shape
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
    lse = torch.logsumexp(s, -1)  # -inf for a row without keys
    p = torch.exp(s - torch.where(lse == -math.inf, math.inf, lse)[..., None])  # 0 on such rows, not NaN
    if dropout_p > 0:
        keep = dropout_keep_ref(seed, B * H, L, dropout_p, q.device).view(B, H, L, L)
        p = torch.where(keep, p / (1 - dropout_p), 0.0)
    out = torch.empty_like(q).copy_(p @ v.to(acc))  # the op's output keeps q's memory layout
    return out, lse.float() if acc != torch.float64 else lse


def attention_bwd_ref(
    dout, q, k, v, out, lse, key_padding_mask=None, cu_seqlens=None, max_seqlen=0, dropout_p=0.0, scale=None, seed=0,
    compute_dtype=None,
):  # fmt: skip
    """Same outputs as fastdistil::attention_bwd: (dq, dk, dv), by the FlashAttention-2 formulas
    dV = P'^T dO, dP = (dO V^T) * keep / (1 - p), dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q.
    """
    if cu_seqlens is not None:
        mask = _varlen_mask(cu_seqlens, max_seqlen)
        pads = [_padded(x, mask) for x in (dout, q, k, v, out)]
        lse_p = torch.full(mask.shape + (q.shape[1],), -math.inf, device=lse.device, dtype=lse.dtype)
        lse_p[mask] = lse.transpose(0, 1)
        grads = attention_bwd_ref(*pads, lse_p.transpose(1, 2), mask, None, 0, dropout_p, scale, seed, compute_dtype)
        return tuple(_unpadded(g, mask) for g in grads)
    acc = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, L, _ = q.shape
    q_, k_, v_, do = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = (q_ @ k_.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
    p = torch.exp(s - torch.where(lse == -math.inf, math.inf, lse).to(acc)[..., None])
    dp = do @ v_.transpose(-1, -2)
    pd = p
    if dropout_p > 0:
        keep = dropout_keep_ref(seed, B * H, L, dropout_p, q.device).view(B, H, L, L)
        pd = torch.where(keep, p / (1 - dropout_p), 0.0)
        dp = torch.where(keep, dp / (1 - dropout_p), 0.0)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (ds @ k_) * scale
    dk = (ds.transpose(-1, -2) @ q_) * scale
    dv = pd.transpose(-1, -2) @ do
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_ref(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, seed=0):
    """transformers' eager BERT attention (matmul, additive mask, softmax, dropout, matmul), differentiable by
    autograd, with our dropout mask: the benchmarks' eager baseline and an oracle sharing no code with the op.
    Rows without keys give 0 (eager would give NaN)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, L, _ = q.shape
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if dropout_p > 0:
        keep = dropout_keep_ref(seed, B * H, L, dropout_p, q.device).view(B, H, L, L)
        p = p * keep / (1 - dropout_p)
    return torch.matmul(p, v)


# -----------------------------------------------------------------------------
# 2. CPU implementation: ATen's flash-attention CPU kernel (what F.scaled_dot_product_attention runs on CPU)
#    returns the log-sum-exp and has a matching backward; its mask is additive, in q's dtype.


def _additive_mask(key_padding_mask, like):
    if key_padding_mask is None:
        return None
    m = torch.zeros(key_padding_mask.shape, dtype=like.dtype, device=like.device)
    return m.masked_fill_(~key_padding_mask, -math.inf)[:, None, None, :]


def attention_fwd_cpu(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    if q.numel() == 0:  # no query, head or dimension: ATen's CPU kernel divides by zero there
        out, lse = _fwd_fake(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed)
        return out.zero_(), lse.fill_(-math.inf)
    if dropout_p > 0 or cu_seqlens is not None or q.dtype == torch.float64:
        return attention_fwd_ref(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed)
    mask = _additive_mask(key_padding_mask, q)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale
    )
    if out.stride() != q.stride():
        out = torch.empty_like(q).copy_(out)
    lse = lse.contiguous()
    if key_padding_mask is not None:  # ATen leaves 0 on rows without keys; the op's contract is -inf
        lse = lse.masked_fill(~key_padding_mask.any(-1)[:, None, None], -math.inf)
    return out, lse


def attention_bwd_cpu(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if dropout_p > 0 or cu_seqlens is not None or q.dtype == torch.float64:
        return attention_bwd_ref(
            dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed
        )
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse.nan_to_num(neginf=0.0), 0.0, False, attn_mask=_additive_mask(key_padding_mask, q),
        scale=scale,
    )  # fmt: skip
    return tuple(g if g.stride() == x.stride() else torch.empty_like(x).copy_(g) for g, x in zip(grads, (q, k, v)))


# -----------------------------------------------------------------------------
# 3. Schemas and fakes.

FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens, int max_seqlen, "
    "float dropout_p, float scale, int seed) -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, "
    "Tensor? cu_seqlens, int max_seqlen, float dropout_p, float scale, int seed) -> (Tensor, Tensor, Tensor)"
)
torch.library.define("fastdistil::attention_fwd", FWD_SCHEMA)
torch.library.define("fastdistil::attention_bwd", BWD_SCHEMA)


@torch.library.register_fake("fastdistil::attention_fwd")
def _fwd_fake(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    if cu_seqlens is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.register_fake("fastdistil::attention_bwd")
def _bwd_fake(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# -----------------------------------------------------------------------------
# 4. Autograd: the backward recomputes P block by block from the saved log-sum-exp (and the dropout mask from
#    the seed); nothing of size (L, L) is saved.


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens)
    ctx.args = (max_seqlen, dropout_p, scale, seed)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens = ctx.saved_tensors
    max_seqlen, dropout_p, scale, seed = ctx.args
    dq, dk, dv = torch.ops.fastdistil.attention_bwd(
        dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse, key_padding_mask, cu_seqlens,
        max_seqlen, dropout_p, scale, seed,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("fastdistil::attention_fwd", _backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# 5. Public API.


def _check_qkv(q, k, v, rank: int, layout: str) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16), got {x.dtype}")
        if x.dim() != rank:
            raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have the same shape {layout}, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    D = q.shape[-1]
    if not 1 <= D <= 256:
        raise ValueError(f"the head dimension D must be between 1 and 256, got {D}")


def _check_dropout_scale_seed(dropout_p, scale, seed, D: int) -> tuple[float, float, int]:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    scale = check_softmax_scale("scale", scale, D)
    if seed is None:
        # Drawn from torch's CPU generator: reproducible under torch.manual_seed, and no device sync.
        seed = int(torch.randint(0, 2**62, ()).item()) if dropout_p > 0 else 0
    elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2^63) or None, got {seed!r}")
    return float(dropout_p), float(scale), int(seed)


def _check_triton_tiles(q: Tensor, k: Tensor, v: Tensor) -> None:
    """On CUDA, a head size and dtype the Triton kernels have no sm_90 tiles for (fp32 with D > 128 and a
    backward) is refused here, with the reason, rather than failing at the first backward launch."""
    if triton_attention is None or not q.is_cuda or q.dtype == torch.float64:
        return
    if backend.cuda_impl("attention", FWD_IMPLS) != "cuda_triton":
        return
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not triton_attention.supported(q.shape[-1], q.dtype, backward=needs_grad):
        raise ValueError(triton_attention.unsupported_reason(q.shape[-1], q.dtype))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int | None = None,
) -> Tensor:
    """Bidirectional attention: softmax(scale * q k^T over kept keys), dropout, times v. Returns (B, heads, L, D)
    in q's dtype and memory layout.

    q, k, v:          (B, heads, L, D), float32 / bfloat16 / float16, same shape; any strides whose last is 1
                      (the (B, L, heads, D) memory layout of transformers' projections is read in place).
    key_padding_mask: bool (B, L), True = the key is attended to. None: every key. A row whose keys are all
                      masked gives zeros, with zero gradients.
    dropout_p:        dropout on the attention probabilities, in [0, 1) (BERT: 0.1 in training, 0 in eval).
    scale:            multiplies q k^T; None: 1 / sqrt(D).
    seed:             the dropout mask is a function of (seed, batch*heads, query, key); the backward regenerates
                      it. None: drawn from torch's default CPU generator (so torch.manual_seed makes runs
                      repeat). The same seed gives the same output.
    """
    _check_qkv(q, k, v, 4, "(B, heads, L, D)")
    B, _, L, D = q.shape
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = keep), e.g. attention_mask.bool()")
        if key_padding_mask.shape != (B, L):
            raise ValueError(f"key_padding_mask must have shape (B, L) = {(B, L)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on {q.device} like q, got {key_padding_mask.device}")
    dropout_p, scale, seed = _check_dropout_scale_seed(dropout_p, scale, seed, D)
    _check_triton_tiles(q, k, v)
    out, _ = torch.ops.fastdistil.attention_fwd(
        unit_stride(q), unit_stride(k), unit_stride(v), key_padding_mask, None, 0, dropout_p, scale, seed
    )
    return _nan_rows_stay_nan(q, out)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int | None = None,
) -> Tensor:
    """attention() on unpadded sequences: q, k, v are (total_tokens, heads, D), sequence b being rows
    cu_seqlens[b]:cu_seqlens[b+1]; no work is spent on padding. Returns (total_tokens, heads, D).

    cu_seqlens: int32 (B + 1,) on q's device, 0 first, non-decreasing, total_tokens last.
    max_seqlen: an int >= the longest sequence (a host value, so that launching needs no device sync).
    unpad_input() builds both from a padding mask. Dropout: element (b*heads + h, i, j) within each sequence, as
    in attention() on the padded batch with the same seed.
    """
    _check_qkv(q, k, v, 3, "(total_tokens, heads, D)")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError("cu_seqlens must be a 1-d int32 tensor (B + 1 cumulative sequence lengths, 0 first)")
    if cu_seqlens.numel() < 1 or cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must have at least one entry and be on {q.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if cu_seqlens.device.type == "cpu":  # free to check here; on a GPU it would cost a sync
        lengths = cu_seqlens.diff()
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != q.shape[0] or (lengths < 0).any():
            raise ValueError(f"cu_seqlens must start at 0, not decrease and end at total_tokens = {q.shape[0]}")
        if lengths.numel() and lengths.max() > max_seqlen:
            raise ValueError(f"max_seqlen = {max_seqlen} is shorter than a sequence ({int(lengths.max())} tokens)")
    dropout_p, scale, seed = _check_dropout_scale_seed(dropout_p, scale, seed, q.shape[-1])
    _check_triton_tiles(q, k, v)
    out, _ = torch.ops.fastdistil.attention_fwd(
        unit_stride(q), unit_stride(k), unit_stride(v), None, cu_seqlens, int(max_seqlen), dropout_p, scale, seed
    )
    return _nan_rows_stay_nan(q, out)


def _nan_rows_stay_nan(q: Tensor, out: Tensor) -> Tensor:
    """NaN in, NaN out: a query row holding NaN gives a NaN output row, as in every other op here (flash kernels
    can turn such a row's NaN scores into zeros). One elementwise pass over q, small next to the attention."""
    return out.clone().masked_fill_(torch.isnan(q).any(-1, keepdim=True), torch.nan)  # clone: out's layout


def unpad_indices(mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """A bool (B, L) keep mask -> (flat indices of the kept positions (T,), cu_seqlens int32 (B+1,), max_seqlen).
    One host read (max_seqlen), so that launching the varlen kernels needs none."""
    lengths = mask.sum(-1, dtype=torch.int32)
    indices = mask.reshape(-1).nonzero().squeeze(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return indices, cu, int(lengths.max()) if lengths.numel() else 0


def unpad_input(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """x (B, L, ...) and a bool (B, L) mask -> (x's kept rows (T, ...), flat indices (T,), cu_seqlens int32 (B+1,),
    max_seqlen). pad_output() puts rows back."""
    indices, cu, max_seqlen = unpad_indices(mask)
    return x.reshape(-1, *x.shape[2:])[indices], indices, cu, max_seqlen


def pad_output(x: Tensor, indices: Tensor, batch: int, length: int) -> Tensor:
    """Inverse of unpad_input: (T, ...) -> (B, L, ...), zeros where the mask was False."""
    out = x.new_zeros((batch * length, *x.shape[1:]))
    return out.index_copy(0, indices, x).view(batch, length, *x.shape[1:])


# -----------------------------------------------------------------------------
# 6. Implementations and wiring.

FWD_IMPLS = {"reference": attention_fwd_ref, "cpu_sdpa": attention_fwd_cpu}
BWD_IMPLS = {"reference": attention_bwd_ref, "cpu_sdpa": attention_bwd_cpu}
if triton_attention is not None:
    FWD_IMPLS["cuda_triton"] = triton_attention.attention_fwd  # kernels/attention.py
    BWD_IMPLS["cuda_triton"] = triton_attention.attention_bwd

# CPU: ATen's CPU flash kernel (the reference with dropout). CUDA: Triton (no CUDA C++ attention).
backend.wire("attention", {"attention_fwd": FWD_IMPLS, "attention_bwd": BWD_IMPLS}, cuda_preference=("cuda_triton",))
