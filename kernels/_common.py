"""Helpers shared by the Triton kernel files."""

import torch
import triton
import triton.language as tl


@triton.jit
def row_selected(mask_ptr, row, HAS_MASK: tl.constexpr):
    """Whether row `row` of an optional (N,) uint8 row mask is selected (every row when there is none)."""
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    return keep


@triton.jit
def load_row_pair(s_ptr, t_ptr, mask_ptr, row, stride_row, H, HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr):
    """One row of two (N, H) tensors as fp32 (zeros past H and on unselected rows, which are never read),
    with the row's keep flag and the lane mask."""
    keep = row_selected(mask_ptr, row, HAS_MASK)
    cols = tl.arange(0, BLOCK_H)
    valid = (cols < H) & keep
    s = tl.load(s_ptr + row * stride_row + cols, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * stride_row + cols, mask=valid, other=0.0).to(tl.float32)
    return s, t, keep, cols, valid


@triton.jit
def online_lse(m, d, x):
    """Merge a block x into the online log-sum-exp state (m, d = sum exp(. - m)). Returns the new (m, d), the
    block's exp(x - ref) and the factor exp(m - ref) that rescales anything else kept relative to m; ref is the
    new max, or 0 while everything seen is -inf (exp(-inf - 0) = 0, never -inf - -inf = NaN)."""
    new_m = tl.maximum(m, tl.max(x, 0))
    ref = tl.where(new_m == -float("inf"), 0.0, new_m)
    rescale = tl.exp(m - ref)
    e = tl.exp(x - ref)
    return new_m, d * rescale + tl.sum(e, 0), e, rescale


@triton.jit
def kd_block(m_s, d_s, m_t, d_t, w, s, t):
    """One block of the one-pass KL(softmax(t) || softmax(s)) statistics (s, t already divided by T): online
    log-sum-exps of s and t, and the p-weighted sum w of (t - s) kept relative to the teacher's max. Entries with
    t == -inf have p = 0 and add 0 (not 0 * -inf). KL = w / d_t - lse_t + lse_s."""
    m_s, d_s, _, _ = online_lse(m_s, d_s, s)
    m_t, d_t, e_t, rescale = online_lse(m_t, d_t, t)
    w = w * rescale + tl.sum(tl.where(t == -float("inf"), 0.0, e_t * (t - s)), 0)
    return m_s, d_s, m_t, d_t, w


@triton.jit
def kd_result(m_s, d_s, m_t, d_t, w):
    """(KL, lse_s, lse_t) from the final kd_block state."""
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    kl = w / d_t - lse_t + lse_s
    kl = tl.where(kl < 0, 0.0, kl)  # >= 0 in exact math; NaN passes through (the comparison is false)
    return kl, lse_s, lse_t


@triton.jit
def keys_valid(kpm_ptr, b, L, offs_n, kv_end, HAS_KPM: tl.constexpr):
    """Which keys offs_n of batch row b count: before kv_end and, with a (B, L) uint8 key padding mask, kept."""
    valid = offs_n < kv_end
    if HAS_KPM:
        valid &= tl.load(kpm_ptr + b * L + offs_n, mask=valid, other=0) != 0
    return valid


def mask_arg(row_mask, like):
    """(pointer argument, HAS_MASK) for an optional (N,) bool row mask; `like` stands in when there is none."""
    if row_mask is None:
        return like, False  # never read
    return row_mask.contiguous().view(torch.uint8), True


def device_ctx(t):
    """Launch on the tensor's GPU, not GPU 0 (and nothing to do for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else torch.device(t.device)
