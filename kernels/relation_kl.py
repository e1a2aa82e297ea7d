"""Triton kernels for fastdistil::relation_kl (spec: relation_kl_fwd_ref / relation_kl_bwd_ref in
fastdistil/ops/relation_kl.py): KL(softmax(T) || softmax(S)) per head and query row, where S = scale_s Ls Rs^T and
T = scale_t Lt Rt^T are never stored.

Forward: one program per (batch x head, block of BLOCK_M query rows). It walks the key blocks with an online softmax
for each side (running max and sum of the student's scores; running max, sum and the p-weighted sum of T - S of the
teacher's, all in log2 units), and writes the per-row KL and both log-sum-exps (natural log; +inf on padding rows,
so that the probabilities recomputed there are 0).
Backward (d KL / d S = q - p, scaled per row by grad_kl): one kernel per query block for d Ls, walking every key
block, and one per key block for d Rs, walking every query block; two kernels instead of atomics keep the gradients
deterministic. Key blocks past the last real key of a sequence (kv_end) are never visited.
Padding keys get MASKED, a finite stand-in for -inf: the difference of two masked scores is 0, not NaN.
"""

import torch
import triton
import triton.language as tl

from fastdistil.kernels._common import device_ctx, keys_valid

LOG2E = 1.4426950408889634
MASKED = tl.constexpr(-1e30)  # a finite -inf for padding keys (a constexpr: read inside the kernels)


@triton.jit
def _tile(ptr, b, r, offs, rows_real, sb, sr, sl, D, BLOCK_D: tl.constexpr):
    """Rows `offs` of one (batch, head) of a (B, heads, L, D) operand, zeros on the rows that are not real (past
    the end or padding: whatever they hold, NaN included, never reaches a dot product)."""
    cols = tl.arange(0, BLOCK_D)
    mask = rows_real[:, None] & (cols < D)[None, :]
    return tl.load(ptr + b * sb + r * sr + offs[:, None].to(tl.int64) * sl + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _scores(a, bt, scale2, kvalid, DOT_PRECISION: tl.constexpr):
    """scale * a b^T in log2 units, MASKED on padding keys."""
    s = tl.dot(a, tl.trans(bt), input_precision=DOT_PRECISION) * scale2
    return tl.where(kvalid[None, :], s, MASKED)


@triton.jit
def _kv_end(kv_end_ptr, b, L, HAS_KPM: tl.constexpr):
    kv_end = L
    if HAS_KPM:
        kv_end = tl.load(kv_end_ptr + b)
    return kv_end


@triton.jit
def _real_rows(kpm_ptr, b, L, offs_m, HAS_KPM: tl.constexpr):
    real = offs_m < L
    if HAS_KPM:
        real &= tl.load(kpm_ptr + b * L + offs_m, mask=real, other=0) != 0
    return real


@triton.jit
def _relation_kl_fwd_kernel(
    SL, SR, TL, TR, KL, LSE_S, LSE_T, kpm_ptr, kv_end_ptr,
    s_sb, s_sr, s_sl, r_sb, r_sr, r_sl, t_sb, t_sr, t_sl, u_sb, u_sr, u_sl,
    R, L, DS, DT, ss2, ts2,
    HAS_KPM: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b, r = (bh // R).to(tl.int64), bh % R
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    kv_end = _kv_end(kv_end_ptr, b, L, HAS_KPM)
    real = _real_rows(kpm_ptr, b, L, offs_m, HAS_KPM)
    a_s = _tile(SL, b, r, offs_m, real, s_sb, s_sr, s_sl, DS, BLOCK_DS)
    a_t = _tile(TL, b, r, offs_m, real, t_sb, t_sr, t_sl, DT, BLOCK_DT)
    m_s = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    m_t = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)  # sum exp2(t - m_t) (t - s), relative to m_t
    if tl.program_id(1) * BLOCK_M < kv_end:  # query blocks past the last real token are all padding
        for n0 in range(0, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kvalid = keys_valid(kpm_ptr, b, L, offs_n, kv_end, HAS_KPM)
            s = _scores(a_s, _tile(SR, b, r, offs_n, kvalid, r_sb, r_sr, r_sl, DS, BLOCK_DS), ss2, kvalid,
                        DOT_PRECISION)  # fmt: skip
            t = _scores(a_t, _tile(TR, b, r, offs_n, kvalid, u_sb, u_sr, u_sl, DT, BLOCK_DT), ts2, kvalid,
                        DOT_PRECISION)  # fmt: skip
            new_m_s = tl.maximum(m_s, tl.max(s, 1))
            l_s = l_s * tl.exp2(m_s - new_m_s) + tl.sum(tl.exp2(s - new_m_s[:, None]), 1)
            m_s = new_m_s
            new_m_t = tl.maximum(m_t, tl.max(t, 1))
            rescale = tl.exp2(m_t - new_m_t)
            e = tl.exp2(t - new_m_t[:, None])
            l_t = l_t * rescale + tl.sum(e, 1)
            w = w * rescale + tl.sum(e * (t - s), 1)
            m_t = new_m_t
    lse2_s = m_s + tl.log2(tl.where(real, l_s, 1.0))
    lse2_t = m_t + tl.log2(tl.where(real, l_t, 1.0))
    kl = (w / tl.where(real, l_t, 1.0) - lse2_t + lse2_s) * 0.6931471805599453
    kl = tl.where(kl < 0, 0.0, kl)  # >= 0 in exact math; NaN passes (the comparison is false)
    out = bh.to(tl.int64) * L + offs_m
    in_seq = offs_m < L
    tl.store(KL + out, tl.where(real, kl, 0.0), mask=in_seq)
    tl.store(LSE_S + out, tl.where(real, lse2_s * 0.6931471805599453, float("inf")), mask=in_seq)
    tl.store(LSE_T + out, tl.where(real, lse2_t * 0.6931471805599453, float("inf")), mask=in_seq)


@triton.jit
def _row_stats(G, LSE_S, LSE_T, bh, offs_m, L):
    """grad_kl (0 past L) and both saved lse in log2 units (+inf past L and on padding rows) of query rows offs_m."""
    rows = bh.to(tl.int64) * L + offs_m
    in_seq = offs_m < L
    g = tl.load(G + rows, mask=in_seq, other=0.0)
    lse_s = tl.load(LSE_S + rows, mask=in_seq, other=float("inf")) * 1.4426950408889634
    lse_t = tl.load(LSE_T + rows, mask=in_seq, other=float("inf")) * 1.4426950408889634
    return g, lse_s, lse_t


@triton.jit
def _dscores(a_s, b_s, a_t, b_t, g, lse_s, lse_t, real, kvalid, ss2, ts2, DOT_PRECISION: tl.constexpr):
    """g * (q - p) on one (query block, key block) tile, recomputed from the saved row statistics; exactly 0 on
    padding rows, whatever they hold (their lse is +inf, but NaN - inf is NaN)."""
    q = tl.exp2(_scores(a_s, b_s, ss2, kvalid, DOT_PRECISION) - lse_s[:, None])
    p = tl.exp2(_scores(a_t, b_t, ts2, kvalid, DOT_PRECISION) - lse_t[:, None])
    return tl.where(real[:, None], (q - p) * g[:, None], 0.0)


@triton.jit
def _relation_kl_bwd_dl_kernel(
    G, SL, SR, TL, TR, LSE_S, LSE_T, DSL, kpm_ptr, kv_end_ptr,
    s_sb, s_sr, s_sl, r_sb, r_sr, r_sl, t_sb, t_sr, t_sl, u_sb, u_sr, u_sl,
    R, L, DS, DT, ss2, ts2, student_scale,
    HAS_KPM: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b, r = (bh // R).to(tl.int64), bh % R
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    kv_end = _kv_end(kv_end_ptr, b, L, HAS_KPM)
    acc = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    if tl.program_id(1) * BLOCK_M < kv_end:
        real = _real_rows(kpm_ptr, b, L, offs_m, HAS_KPM)
        a_s = _tile(SL, b, r, offs_m, real, s_sb, s_sr, s_sl, DS, BLOCK_DS)
        a_t = _tile(TL, b, r, offs_m, real, t_sb, t_sr, t_sl, DT, BLOCK_DT)
        g, lse_s, lse_t = _row_stats(G, LSE_S, LSE_T, bh, offs_m, L)
        for n0 in range(0, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kvalid = keys_valid(kpm_ptr, b, L, offs_n, kv_end, HAS_KPM)
            b_s = _tile(SR, b, r, offs_n, kvalid, r_sb, r_sr, r_sl, DS, BLOCK_DS)
            b_t = _tile(TR, b, r, offs_n, kvalid, u_sb, u_sr, u_sl, DT, BLOCK_DT)
            ds = _dscores(a_s, b_s, a_t, b_t, g, lse_s, lse_t, real, kvalid, ss2, ts2, DOT_PRECISION)
            acc += tl.dot(ds.to(b_s.dtype), b_s, input_precision=DOT_PRECISION)
    cols = tl.arange(0, BLOCK_DS)
    ptrs = DSL + bh.to(tl.int64) * L * DS + offs_m[:, None].to(tl.int64) * DS + cols[None, :]
    tl.store(ptrs, (acc * student_scale).to(DSL.dtype.element_ty), mask=(offs_m < L)[:, None] & (cols < DS)[None, :])


@triton.jit
def _relation_kl_bwd_dr_kernel(
    G, SL, SR, TL, TR, LSE_S, LSE_T, DSR, kpm_ptr, kv_end_ptr,
    s_sb, s_sr, s_sl, r_sb, r_sr, r_sl, t_sb, t_sr, t_sl, u_sb, u_sr, u_sl,
    R, L, DS, DT, ss2, ts2, student_scale,
    HAS_KPM: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b, r = (bh // R).to(tl.int64), bh % R
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_end = _kv_end(kv_end_ptr, b, L, HAS_KPM)
    acc = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    if tl.program_id(1) * BLOCK_N < kv_end:  # key blocks past the last real key get exact zeros
        kvalid = keys_valid(kpm_ptr, b, L, offs_n, kv_end, HAS_KPM)
        b_s = _tile(SR, b, r, offs_n, kvalid, r_sb, r_sr, r_sl, DS, BLOCK_DS)
        b_t = _tile(TR, b, r, offs_n, kvalid, u_sb, u_sr, u_sl, DT, BLOCK_DT)
        for m0 in range(0, kv_end, BLOCK_M):  # rows past kv_end are padding: they add 0
            offs_m = m0 + tl.arange(0, BLOCK_M)
            real = _real_rows(kpm_ptr, b, L, offs_m, HAS_KPM)
            a_s = _tile(SL, b, r, offs_m, real, s_sb, s_sr, s_sl, DS, BLOCK_DS)
            a_t = _tile(TL, b, r, offs_m, real, t_sb, t_sr, t_sl, DT, BLOCK_DT)
            g, lse_s, lse_t = _row_stats(G, LSE_S, LSE_T, bh, offs_m, L)
            ds = _dscores(a_s, b_s, a_t, b_t, g, lse_s, lse_t, real, kvalid, ss2, ts2, DOT_PRECISION)
            acc += tl.dot(tl.trans(ds.to(a_s.dtype)), a_s, input_precision=DOT_PRECISION)
    cols = tl.arange(0, BLOCK_DS)
    ptrs = DSR + bh.to(tl.int64) * L * DS + offs_n[:, None].to(tl.int64) * DS + cols[None, :]
    tl.store(ptrs, (acc * student_scale).to(DSR.dtype.element_ty), mask=(offs_n < L)[:, None] & (cols < DS)[None, :])


# -----------------------------------------------------------------------------
# Host side.

# (BLOCK_M, BLOCK_N, num_warps) by dtype class and the larger of the two padded head sizes: the largest tiles that
# compile for sm_90 without register spills (tests/test_sm90_compile.py; `python -m tests.sm90 relation_kl`). Two
# operand tiles per side live in registers; fp32 runs IEEE dots (no TF32), hence smaller tiles. Not yet timed on a
# GPU.
TILES = {
    "half": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 32, 8), 256: (32, 32, 8)},
    "fp32": {16: (32, 32, 4), 32: (32, 32, 4), 64: (32, 16, 4), 128: (16, 16, 4), 256: (16, 16, 4)},
}


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def launch_config(Ds: int, Dt: int, dtype: torch.dtype) -> dict:
    tiles = TILES["fp32" if dtype == torch.float32 else "half"]
    bm, bn, warps = tiles[max(block_d(Ds), block_d(Dt))]
    return dict(BLOCK_DS=block_d(Ds), BLOCK_DT=block_d(Dt), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")  # fmt: skip


def _geometry(sl, key_padding_mask):
    """(mask as uint8, kv_end) with stand-ins (never read) without a mask. kv_end[b] = one past the last real token
    of row b, computed on the device (no sync)."""
    if key_padding_mask is None:
        return sl, sl
    L = sl.shape[2]
    positions = torch.arange(1, L + 1, device=sl.device, dtype=torch.int32)
    kv_end = (key_padding_mask * positions).amax(-1).to(torch.int32)
    return key_padding_mask.contiguous().view(torch.uint8), kv_end


def _strides(*xs):
    return [s for x in xs for s in (x.stride(0), x.stride(1), x.stride(2))]


def relation_kl_fwd(sl, sr, tl_, tr, key_padding_mask, student_scale, teacher_scale):
    """fastdistil::relation_kl_fwd: (kl, lse_s, lse_t), each (B, heads, L) float32."""
    B, R, L, Ds = sl.shape
    kl, lse_s, lse_t = (torch.empty((B, R, L), device=sl.device, dtype=torch.float32) for _ in range(3))
    if B * R * L == 0:
        return kl, lse_s, lse_t
    kpm, kv_end = _geometry(sl, key_padding_mask)
    cfg = launch_config(Ds, tl_.shape[-1], sl.dtype)
    with device_ctx(sl):
        _relation_kl_fwd_kernel[(B * R, triton.cdiv(L, cfg["BLOCK_M"]))](
            sl, sr, tl_, tr, kl, lse_s, lse_t, kpm, kv_end, *_strides(sl, sr, tl_, tr),
            R, L, Ds, tl_.shape[-1], student_scale * LOG2E, teacher_scale * LOG2E,
            HAS_KPM=key_padding_mask is not None, **cfg,
        )  # fmt: skip
    return kl, lse_s, lse_t


def relation_kl_bwd(grad_kl, sl, sr, tl_, tr, lse_s, lse_t, key_padding_mask, student_scale, teacher_scale):
    """fastdistil::relation_kl_bwd: (d sl, d sr), contiguous, in the student's dtype."""
    B, R, L, Ds = sl.shape
    dsl, dsr = sl.new_empty(sl.shape), sr.new_empty(sr.shape)
    if B * R * L == 0:
        return dsl.zero_(), dsr.zero_()
    kpm, kv_end = _geometry(sl, key_padding_mask)
    cfg = launch_config(Ds, tl_.shape[-1], sl.dtype)
    args = (*_strides(sl, sr, tl_, tr), R, L, Ds, tl_.shape[-1], student_scale * LOG2E, teacher_scale * LOG2E,
            student_scale)  # fmt: skip
    g = grad_kl.float().contiguous()
    with device_ctx(sl):
        _relation_kl_bwd_dl_kernel[(B * R, triton.cdiv(L, cfg["BLOCK_M"]))](
            g, sl, sr, tl_, tr, lse_s, lse_t, dsl, kpm, kv_end, *args,
            HAS_KPM=key_padding_mask is not None, **cfg,
        )  # fmt: skip
        _relation_kl_bwd_dr_kernel[(B * R, triton.cdiv(L, cfg["BLOCK_N"]))](
            g, sl, sr, tl_, tr, lse_s, lse_t, dsr, kpm, kv_end, *args,
            HAS_KPM=key_padding_mask is not None, **cfg,
        )  # fmt: skip
    return dsl, dsr
