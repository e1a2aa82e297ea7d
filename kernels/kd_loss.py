"""Triton kernels for fastdistil::kd_loss (spec: kd_loss_fwd_ref / kd_loss_bwd_ref in
fastdistil/ops/kd_loss.py; the C++ kernels in csrc/ compute the same one-pass formulas).

Forward: one program per row, ONE pass over V in BLOCK_V blocks, keeping online (max, sum of exp)
for s/T and t/T and the p-weighted sum of (t - s)/T, rescaled with the teacher's running max:
    KL = w / d_t - lse_t + lse_s.
Backward: one program per (row, block of V), elementwise from the saved log-sum-exps.
Rows where row_mask is False are never loaded (every load is masked with `keep`).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr, t_ptr,  # (N, V) student / teacher logits, rows contiguous
    mask_ptr,  # (N,) bool as uint8, read only when HAS_MASK
    loss_ptr, s_lse_ptr, t_lse_ptr,  # (N,) fp32 outputs
    stride_row, V, inv_temperature,
    HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 once N * V does
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    s_ptr += row * stride_row
    t_ptr += row * stride_row
    m_s = -float("inf")
    d_s = 0.0
    m_t = -float("inf")
    d_t = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = (cols < V) & keep
        s = tl.load(s_ptr + cols, mask=valid, other=-float("inf")).to(tl.float32) * inv_temperature
        t = tl.load(t_ptr + cols, mask=valid, other=-float("inf")).to(tl.float32) * inv_temperature
        new_m_s = tl.maximum(m_s, tl.max(s, 0))
        # While everything seen is -inf, use 0 as the reference: exp(-inf - 0) = 0, never -inf - -inf = NaN.
        ref_s = tl.where(new_m_s == -float("inf"), 0.0, new_m_s)
        d_s = d_s * tl.exp(m_s - ref_s) + tl.sum(tl.exp(s - ref_s), 0)
        m_s = new_m_s
        new_m_t = tl.maximum(m_t, tl.max(t, 0))
        ref_t = tl.where(new_m_t == -float("inf"), 0.0, new_m_t)
        e = tl.exp(t - ref_t)
        rescale = tl.exp(m_t - ref_t)
        d_t = d_t * rescale + tl.sum(e, 0)
        # p == 0 where t == -inf: contributes 0, not 0 * -inf.
        w = w * rescale + tl.sum(tl.where(t == -float("inf"), 0.0, e * (t - s)), 0)
        m_t = new_m_t
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    kl = w / d_t - lse_t + lse_s
    kl = tl.where(kl < 0, 0.0, kl)  # >= 0 in exact math; NaN passes through (the comparison is false)
    tl.store(loss_ptr + row, tl.where(keep, kl, 0.0))
    tl.store(s_lse_ptr + row, tl.where(keep, lse_s, 0.0))
    tl.store(t_lse_ptr + row, tl.where(keep, lse_t, 0.0))


@triton.jit
def _kd_loss_bwd_kernel(
    grad_loss_ptr, s_ptr, t_ptr, s_lse_ptr, t_lse_ptr, mask_ptr, grad_ptr,
    stride_row, V, inv_temperature,
    HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    valid = (cols < V) & keep
    s = tl.load(s_ptr + row * stride_row + cols, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * stride_row + cols, mask=valid, other=0.0).to(tl.float32)
    scale = tl.load(grad_loss_ptr + row).to(tl.float32) * inv_temperature
    lse_s = tl.load(s_lse_ptr + row).to(tl.float32)
    lse_t = tl.load(t_lse_ptr + row).to(tl.float32)
    g = scale * (tl.exp(s * inv_temperature - lse_s) - tl.exp(t * inv_temperature - lse_t))
    g = tl.where(valid, g, 0.0)  # exact zeros on unselected rows
    tl.store(grad_ptr + row * stride_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)


def _mask_arg(row_mask, like):
    if row_mask is None:
        return like, False  # any pointer: never read
    return row_mask.contiguous().view(torch.uint8), True


def _device_ctx(t):
    return torch.cuda.device(t.device) if t.is_cuda else torch.device(t.device)  # the tensor's GPU, not GPU 0


def kd_loss_fwd(student_logits, teacher_logits, temperature, row_mask=None):
    """(N, V), (N, V), float, (N,) bool or None -> loss, student_lse, teacher_lse: each (N,) float32."""
    s, t = student_logits.contiguous(), teacher_logits.contiguous()
    N, V = s.shape
    loss, s_lse, t_lse = (torch.empty(N, device=s.device, dtype=torch.float32) for _ in range(3))
    mask, has_mask = _mask_arg(row_mask, s)
    BLOCK_V = min(triton.next_power_of_2(V), 4096)  # 4096 fp32 lanes per step keeps registers in check
    if N > 0:
        with _device_ctx(s):
            _kd_loss_fwd_kernel[(N,)](
                s, t, mask, loss, s_lse, t_lse, s.stride(0), V, 1.0 / temperature, HAS_MASK=has_mask, BLOCK_V=BLOCK_V
            )
    return loss, s_lse, t_lse


def kd_loss_bwd(grad_loss, student_logits, teacher_logits, student_lse, teacher_lse, temperature, row_mask=None):
    """d sum_i grad_loss[i] * loss[i] / d student_logits: (N, V) in student_logits.dtype."""
    s, t = student_logits.contiguous(), teacher_logits.contiguous()
    N, V = s.shape
    grad = torch.empty_like(s)
    mask, has_mask = _mask_arg(row_mask, s)
    BLOCK_V = min(triton.next_power_of_2(V), 2048)
    if N > 0:
        with _device_ctx(s):
            _kd_loss_bwd_kernel[(N, triton.cdiv(V, BLOCK_V))](
                grad_loss.float().contiguous(), s, t, student_lse.float().contiguous(),
                teacher_lse.float().contiguous(), mask, grad, s.stride(0), V, 1.0 / temperature,
                HAS_MASK=has_mask, BLOCK_V=BLOCK_V,
            )
    return grad
