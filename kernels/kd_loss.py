"""Triton kernels for fastdistil::kd_loss (spec: kd_loss_fwd_ref / kd_loss_bwd_ref in
fastdistil/ops/kd_loss.py; the C++ kernels in csrc/ compute the same one-pass formulas).

Forward: one program per row. Pass 1 over V in BLOCK_V blocks keeps online (max, sum of exp) for s/T
and t/T and the p-weighted sum of (t - s)/T, rescaled with the teacher's running max:
    KL = w / d_t - lse_t + lse_s.
With WITH_GRAD, pass 2 writes d KL / d s = (q - p) / T (the row is re-read, mostly from L2).
Backward: scales the gradient rows by grad_loss in place, one program per (row, block of V).
Rows where row_mask is False are never loaded (every load is masked with `keep`).
"""

import torch
import triton
import triton.language as tl

from fastdistil.kernels._common import device_ctx, kd_block, kd_result, mask_arg, row_selected


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr,
    t_ptr,  # (N, V) student / teacher logits, rows contiguous
    mask_ptr,  # (N,) bool as uint8, read only when HAS_MASK
    loss_ptr,  # (N,) fp32
    grad_ptr,  # (N, V) like s, written only when WITH_GRAD
    stride_row,
    V,
    inv_temperature,
    HAS_MASK: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 once N * V does
    keep = row_selected(mask_ptr, row, HAS_MASK)
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
        m_s, d_s, m_t, d_t, w = kd_block(m_s, d_s, m_t, d_t, w, s, t)
    kl, lse_s, lse_t = kd_result(m_s, d_s, m_t, d_t, w)
    tl.store(loss_ptr + row, tl.where(keep, kl, 0.0))
    if WITH_GRAD:
        grad_ptr += row * stride_row
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = (cols < V) & keep
            s = tl.load(s_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
            t = tl.load(t_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
            g = (tl.exp(s - lse_s) - tl.exp(t - lse_t)) * inv_temperature
            g = tl.where(valid, g, 0.0)  # exact zeros on unselected rows
            tl.store(grad_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _kd_loss_bwd_kernel(grad_loss_ptr, grad_ptr, stride_row, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ptrs = grad_ptr + row * stride_row + cols
    scale = tl.load(grad_loss_ptr + row).to(tl.float32)
    g = tl.load(ptrs, mask=cols < V, other=0.0).to(tl.float32) * scale
    tl.store(ptrs, g.to(grad_ptr.dtype.element_ty), mask=cols < V)


def fwd_block(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)  # 4096 fp32 lanes per step keeps registers in check


def bwd_block(V: int) -> int:
    return min(triton.next_power_of_2(V), 2048)


def kd_loss_fwd(student_logits, teacher_logits, temperature, row_mask=None, with_grad=False):
    """(N, V), (N, V), float, (N,) bool or None, bool -> loss (N,) float32, grad (N, V) like s or (0,)."""
    s, t = student_logits.contiguous(), teacher_logits.contiguous()
    N, V = s.shape
    loss = torch.empty(N, device=s.device, dtype=torch.float32)
    grad = torch.empty_like(s) if with_grad else s.new_empty((0,))
    mask, has_mask = mask_arg(row_mask, s)
    BLOCK_V = fwd_block(V)
    if N > 0:
        with device_ctx(s):
            _kd_loss_fwd_kernel[(N,)](
                s,
                t,
                mask,
                loss,
                grad if with_grad else s,
                s.stride(0),
                V,
                1.0 / temperature,
                HAS_MASK=has_mask,
                WITH_GRAD=with_grad,
                BLOCK_V=BLOCK_V,
            )
    return loss, grad


def kd_loss_bwd(grad_loss, grad_logits):
    """grad_logits[i, :] *= grad_loss[i], in place."""
    N, V = grad_logits.shape
    BLOCK_V = bwd_block(V)
    if N > 0:
        with device_ctx(grad_logits):
            _kd_loss_bwd_kernel[(N, triton.cdiv(V, BLOCK_V))](
                grad_loss.float().contiguous(), grad_logits, grad_logits.stride(0), V, BLOCK_V=BLOCK_V
            )
