"""Triton kernels for fastdistil::attention (spec: attention_fwd_ref / attention_bwd_ref in
fastdistil/ops/attention.py): bidirectional (non-causal) attention in the FlashAttention-2 style.

Forward: one program per (block of BLOCK_M queries, batch x head). It walks the key blocks with an online
softmax (running max m, running sum l, un-normalised accumulator), so the (L, L) score matrix never exists;
it writes O = acc / l and the log-sum-exp per query row (natural log; -inf for a row whose keys are all
masked, whose output is then 0, not NaN).
Backward (delta = rowsum(dO * O) computed by the caller): one kernel per key block for dK and dV, walking
every query block (non-causal: all of them), and one kernel per query block for dQ, walking every key block.
Two kernels instead of atomics keep the gradients deterministic.

Sequences: "padded" mode reads (B, heads, L, D) through strides with an optional key padding mask (B, L), and
stops each row at the last kept key of its batch row (kv_end, a (B,) device tensor: right-padding costs
nothing past it). "varlen" mode reads (total_tokens, heads, D) with cu_seqlens (B + 1,) and skips padding
altogether.

Dropout (on the normalised probabilities, scaled by 1 / (1 - p), as in BERT) keeps element (b*heads + h, i, j)
when a counter-based hash of (seed, that index) clears a threshold. The backward regenerates the same mask
from the same seed; dropout_keep_ref in fastdistil/ops/attention.py is the same hash in PyTorch.
"""

import torch
import triton
import triton.language as tl

from fastdistil.dropout_seed import dropout_threshold, fold_seed
from fastdistil.kernels._common import device_ctx, keys_valid

LOG2E = 1.4426950408889634


@triton.jit
def _mix32(x):
    """A 32-bit integer finaliser (xor-shift / multiply, "lowbias32"): every input bit flips each output bit
    with probability ~1/2. uint32 arithmetic wraps, as in the PyTorch twin (int64 masked to 32 bits)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _dropout_keep(seed, bh, L, offs_m, offs_n, threshold):
    """(BLOCK_M, BLOCK_N) bool: keep element (bh, i, j). One hash per row key, one per element."""
    row = _mix32(seed.to(tl.uint32) + _mix32(bh.to(tl.uint32) * L.to(tl.uint32) + offs_m.to(tl.uint32)))
    x = _mix32(row[:, None] + (offs_n.to(tl.uint32) * 0x9E3779B9)[None, :])
    return (x >> 8) >= threshold


@triton.jit
def _seq_bounds(cu_ptr, kv_end_ptr, b, L, IS_VARLEN: tl.constexpr, HAS_KV_END: tl.constexpr):
    """(first token, number of query rows, number of key columns to visit) of batch row b."""
    if IS_VARLEN:
        start = tl.load(cu_ptr + b)
        seqlen = tl.load(cu_ptr + b + 1) - start
        kv_end = seqlen
    else:
        start = tl.full([], 0, tl.int32)
        seqlen = L
        kv_end = L
        if HAS_KV_END:
            kv_end = tl.load(kv_end_ptr + b)
    return start, seqlen, kv_end


@triton.jit
def _program_tile(cu_ptr, kv_end_ptr, H, L, D, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK: tl.constexpr,
                  BLOCK_D: tl.constexpr):  # fmt: skip
    """What every program starts from: its batch*head index bh = program_id(0) (and b, h), its sequence (first
    token, length, keys to visit), and its tile of BLOCK positions (program_id(1)): the positions in the sequence,
    the lanes of D in use, the (BLOCK, BLOCK_D) load mask and the absolute row indices. batch*heads sits on grid
    axis 0 (up to 2^31 - 1 programs; axis 1 takes at most 65535 tiles, L up to 4 M at BLOCK 64), and b is int64
    so that b * batch stride cannot overflow int32 in large batches."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    start, seqlen, kv_end = _seq_bounds(cu_ptr, kv_end_ptr, b, L, IS_VARLEN, HAS_KPM)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    tile_mask = (offs < seqlen)[:, None] & dmask[None, :]
    return bh, b, h, start, seqlen, kv_end, offs, offs_d, dmask, tile_mask, (start + offs).to(tl.int64)


@triton.jit
def _key_block(k_base, v_base, skm, svm, kpm_ptr, b, L, n0, kv_end, offs_d, dmask, HAS_KPM: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """Keys n0 .. n0 + BLOCK_N of one sequence: their positions, which are attended to, and the K and V tiles."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kvalid = keys_valid(kpm_ptr, b, L, offs_n, kv_end, HAS_KPM)
    kvmask = (offs_n < kv_end)[:, None] & dmask[None, :]
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skm + offs_d[None, :], mask=kvmask, other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svm + offs_d[None, :], mask=kvmask, other=0.0)
    return offs_n, kvalid, k, v


@triton.jit(do_not_specialize=["seed", "L"])  # L: used as a value (dropout counter), never 1-specialised
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # noqa: E741
    kpm_ptr, kv_end_ptr, cu_ptr,
    sqb, sqh, sqm, skb, skh, skm, svb, svh, svm, sob, soh, som,
    slb, slh,  # lse strides (its row stride is 1)
    H, L, D, qk_scale, seed, threshold, drop_scale,
    HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    bh, b, h, start, seqlen, kv_end, offs_m, offs_d, dmask, qmask, rows = _program_tile(
        cu_ptr, kv_end_ptr, H, L, D, IS_VARLEN, HAS_KPM, BLOCK_M, BLOCK_D
    )
    if tl.program_id(1) * BLOCK_M >= seqlen:
        return
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=qmask, other=0.0)
    k_base = K + b * skb + h * skh + start.to(tl.int64) * skm
    v_base = V + b * svb + h * svh + start.to(tl.int64) * svm

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m), dropout NOT applied
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n, kvalid, k, v = _key_block(
            k_base, v_base, skm, svm, kpm_ptr, b, L, n0, kv_end, offs_d, dmask, HAS_KPM, BLOCK_N
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(kvalid[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # all masked so far: exp2(-inf - 0) = 0, not NaN
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, L, offs_m, offs_n, threshold)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty), mask=qmask)
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / 1.4426950408889634, -float("inf"))
    tl.store(LSE + b * slb + h * slh + start + offs_m, lse, mask=offs_m < seqlen)


@triton.jit
def _scores_and_probs(q, k, lse2, kvalid, qk_scale, DOT_PRECISION: tl.constexpr):
    """P (BLOCK_M, BLOCK_N) recomputed from the saved log-sum-exp (log2 units; +inf for rows without keys)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(kvalid[None, :], s, -float("inf"))
    return tl.exp2(s - lse2[:, None])


@triton.jit
def _load_lse2(LSE, offs, mask):
    """Saved lse (natural log) in log2 units, +inf where a row had no key (so that P = exp2(s - lse) = 0)."""
    lse = tl.load(LSE + offs, mask=mask, other=float("inf"))
    return tl.where(lse == -float("inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit(do_not_specialize=["seed", "L"])  # L: used as a value (dropout counter), never 1-specialised
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    kpm_ptr, kv_end_ptr, cu_ptr,
    sqb, sqh, sqm, skb, skh, skm, svb, svh, svm, sdob, sdoh, sdom,
    sdkb, sdkh, sdkm, sdvb, sdvh, sdvm, slb, slh,
    H, L, D, qk_scale, sm_scale, seed, threshold, drop_scale,
    HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    bh, b, h, start, seqlen, kv_end, offs_n, offs_d, dmask, nmask, cols = _program_tile(
        cu_ptr, kv_end_ptr, H, L, D, IS_VARLEN, HAS_KPM, BLOCK_N, BLOCK_D
    )
    pid_n = tl.program_id(1)
    if pid_n * BLOCK_N >= seqlen:
        return
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if pid_n * BLOCK_N < kv_end:  # key blocks past the last kept key get exact zeros
        kvalid = keys_valid(kpm_ptr, b, L, offs_n, kv_end, HAS_KPM)
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skm + offs_d[None, :], mask=nmask, other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svm + offs_d[None, :], mask=nmask, other=0.0)
        q_base = Q + b * sqb + h * sqh + start.to(tl.int64) * sqm
        do_base = DO + b * sdob + h * sdoh + start.to(tl.int64) * sdom
        l_base = b * slb + h * slh + start
        for m0 in range(0, seqlen, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            in_seq = offs_m < seqlen
            mmask = in_seq[:, None] & dmask[None, :]
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :], mask=mmask, other=0.0)
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * sdom + offs_d[None, :], mask=mmask, other=0.0)
            lse2 = _load_lse2(LSE, l_base + offs_m, in_seq)
            delta = tl.load(DELTA + l_base + offs_m, mask=in_seq, other=0.0)
            p = _scores_and_probs(q, k, lse2, kvalid, qk_scale, DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, bh, L, offs_m, offs_n, threshold)
                pd = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                pd = p
            dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk_ptrs = DK + b * sdkb + h * sdkh + cols[:, None] * sdkm + offs_d[None, :]
    dv_ptrs = DV + b * sdvb + h * sdvh + cols[:, None] * sdvm + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=nmask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=nmask)


@triton.jit(do_not_specialize=["seed", "L"])  # L: used as a value (dropout counter), never 1-specialised
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    kpm_ptr, kv_end_ptr, cu_ptr,
    sqb, sqh, sqm, skb, skh, skm, svb, svh, svm, sdob, sdoh, sdom, sdqb, sdqh, sdqm, slb, slh,
    H, L, D, qk_scale, sm_scale, seed, threshold, drop_scale,
    HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    bh, b, h, start, seqlen, kv_end, offs_m, offs_d, dmask, mmask, rows = _program_tile(
        cu_ptr, kv_end_ptr, H, L, D, IS_VARLEN, HAS_KPM, BLOCK_M, BLOCK_D
    )
    if tl.program_id(1) * BLOCK_M >= seqlen:
        return
    in_seq = offs_m < seqlen
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=mmask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], mask=mmask, other=0.0)
    l_offs = b * slb + h * slh + start + offs_m
    lse2 = _load_lse2(LSE, l_offs, in_seq)
    delta = tl.load(DELTA + l_offs, mask=in_seq, other=0.0)
    k_base = K + b * skb + h * skh + start.to(tl.int64) * skm
    v_base = V + b * svb + h * svh + start.to(tl.int64) * svm
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n, kvalid, k, v = _key_block(
            k_base, v_base, skm, svm, kpm_ptr, b, L, n0, kv_end, offs_d, dmask, HAS_KPM, BLOCK_N
        )
        p = _scores_and_probs(q, k, lse2, kvalid, qk_scale, DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, L, offs_m, offs_n, threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(
        DQ + b * sdqb + h * sdqh + rows[:, None] * sdqm + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=mmask,
    )


# -----------------------------------------------------------------------------
# Host side. Both layouts become (pointer, batch stride, head stride, row stride); varlen has batch stride 0 and
# takes each sequence's first row from cu_seqlens.


# (BLOCK_M, BLOCK_N, num_warps) per kernel, dtype class and head-size class (BLOCK_D), chosen with the sm_90
# compile gate (tests/test_sm90_compile.py; `python -m tests.sm90` prints the table): the largest tiles found that
# fit sm_90's shared memory and compile without register spills. fp32 runs on FMA (IEEE dots, no TF32) with fp32
# tiles, hence smaller ones; its backward with head size > 128 has none that fits (refused: see supported()).
TILES = {
    "fwd": {
        "half": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 32, 8), 256: (32, 32, 8)},
        "fp32": {16: (128, 64, 8), 32: (64, 64, 8), 64: (64, 32, 8), 128: (32, 16, 8), 256: (32, 16, 8)},
    },
    "bwd_dkdv": {
        "half": {16: (64, 32, 4), 32: (64, 32, 4), 64: (64, 32, 4), 128: (32, 64, 8), 256: (32, 16, 8)},
        "fp32": {16: (64, 64, 8), 32: (64, 32, 8), 64: (32, 32, 8), 128: (32, 32, 8)},
    },
    "bwd_dq": {
        "half": {16: (64, 32, 4), 32: (64, 32, 4), 64: (64, 32, 4), 128: (64, 32, 8), 256: (32, 16, 8)},
        "fp32": {16: (64, 32, 8), 32: (64, 32, 8), 64: (32, 32, 8), 128: (64, 32, 8)},
    },
}
KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def supported(D: int, dtype: torch.dtype, backward: bool = True) -> bool:
    """Whether the kernels have tiles for head size D in dtype (the backward's too when `backward`)."""
    kernels = KERNELS if backward else KERNELS[:1]
    return all(block_d(D) in TILES[k][_dtype_class(dtype)] for k in kernels)


def unsupported_reason(D: int, dtype: torch.dtype) -> str:
    return (f"the Triton attention kernels have no tiles for head size {D} in {dtype} with a backward: its tiles do "
            "not fit sm_90's 227 KB of shared memory without register spills; run attention in bf16 / fp16 "
            "(autocast) or with head size <= 128")  # fmt: skip


def launch_config(kernel: str, D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_M, BLOCK_N, num_warps) of one kernel for head size D in dtype."""
    bd = block_d(D)
    tiles = TILES[kernel][_dtype_class(dtype)]
    if bd not in tiles:
        raise ValueError(unsupported_reason(D, dtype))
    return (bd, *tiles[bd])


MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1 (axis 0, batch * heads here, takes 2^31 - 1)


def _grid(batch_heads: int, L: int, block: int) -> tuple[int, int]:
    tiles = triton.cdiv(L, block)
    if tiles > MAX_GRID_Y:
        raise ValueError(f"sequences of {L} tokens need {tiles} tiles of {block}, more than CUDA's {MAX_GRID_Y}")
    return batch_heads, tiles


def _strides(x: torch.Tensor, varlen: bool):
    if varlen:  # (T, heads, D)
        return 0, x.stride(1), x.stride(0)
    return x.stride(0), x.stride(1), x.stride(2)


def _geometry(q, key_padding_mask, cu_seqlens, max_seqlen):
    """(varlen, B, heads, L, mask as uint8, kv_end, cu_seqlens); unused pointers stand in as q (never read).
    kv_end[b] = one past the last kept key of row b, computed on the device (no sync): key blocks past it are
    skipped, so right padding costs nothing there."""
    varlen = cu_seqlens is not None
    if varlen:
        B, H, L = cu_seqlens.numel() - 1, q.shape[1], max_seqlen
    else:
        B, H, L = q.shape[0], q.shape[1], q.shape[2]
    kpm, kv_end = q, q
    if key_padding_mask is not None:
        kpm = key_padding_mask.contiguous().view(torch.uint8)
        positions = torch.arange(1, L + 1, device=q.device, dtype=torch.int32)
        kv_end = (key_padding_mask * positions).amax(-1).to(torch.int32) if L else kv_end
    return varlen, B, H, L, kpm, kv_end, (cu_seqlens if varlen else q)


def _dropout_args(dropout_p: float, seed: int):
    drop_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    return fold_seed(seed), dropout_threshold(dropout_p), drop_scale


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no TF32) to match the reference


def attention_fwd(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    """fastdistil::attention_fwd: (out in q's layout, lse float32 (B, heads, L), or (heads, T) for varlen)."""
    varlen, B, H, L, kpm, kv_end, cu = _geometry(q, key_padding_mask, cu_seqlens, max_seqlen)
    D = q.shape[-1]
    out = torch.empty_like(q)
    lse = torch.empty((H, q.shape[0]) if varlen else (B, H, L), device=q.device, dtype=torch.float32)
    slb, slh = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    seed32, threshold, drop_scale = _dropout_args(dropout_p, seed)
    if B * H * L == 0:
        return out, lse.fill_(-float("inf"))
    block_d, block_m, block_n, warps = launch_config("fwd", D, q.dtype)
    with device_ctx(q):
        _attn_fwd_kernel[_grid(B * H, L, block_m)](
            q, k, v, out, lse, kpm, kv_end, cu,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
            slb, slh, H, L, D, scale * LOG2E, seed32, threshold, drop_scale,
            HAS_KPM=key_padding_mask is not None, IS_VARLEN=varlen, HAS_DROPOUT=dropout_p > 0,
            BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=_precision(q.dtype), num_warps=warps,
        )  # fmt: skip
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    """fastdistil::attention_bwd: (dq, dk, dv) in the layouts of q, k, v."""
    varlen, B, H, L, kpm, kv_end, cu = _geometry(q, key_padding_mask, cu_seqlens, max_seqlen)
    D = q.shape[-1]
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij (dropout included): one cheap elementwise pass.
    delta = (dout.float() * out.float()).sum(-1)
    delta = delta.transpose(0, 1).contiguous() if varlen else delta.contiguous()  # lse's layout
    slb, slh = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H * L == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    seed32, threshold, drop_scale = _dropout_args(dropout_p, seed)
    flags = dict(HAS_KPM=key_padding_mask is not None, IS_VARLEN=varlen, HAS_DROPOUT=dropout_p > 0,
                 DOT_PRECISION=_precision(q.dtype))  # fmt: skip
    common = (H, L, D, scale * LOG2E, scale, seed32, threshold, drop_scale)
    qkv = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen))
    block_d, block_m, block_n, warps = launch_config("bwd_dkdv", D, q.dtype)
    tiles = dict(BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    with device_ctx(q):
        _attn_bwd_dkdv_kernel[_grid(B * H, L, block_n)](
            q, k, v, dout, lse, delta, dk, dv, kpm, kv_end, cu,
            *qkv, *_strides(dk, varlen), *_strides(dv, varlen), slb, slh, *common, **flags, **tiles,
        )  # fmt: skip
    block_d, block_m, block_n, warps = launch_config("bwd_dq", D, q.dtype)
    tiles = dict(BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    with device_ctx(q):
        _attn_bwd_dq_kernel[_grid(B * H, L, block_m)](
            q, k, v, dout, lse, delta, dq, kpm, kv_end, cu,
            *qkv, *_strides(dq, varlen), slb, slh, *common, **flags, **tiles,
        )  # fmt: skip
    return dq, dk, dv
