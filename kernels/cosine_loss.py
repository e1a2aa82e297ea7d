"""Triton kernels for fastdistil::cosine_loss (spec: cosine_loss_fwd_ref / cosine_loss_bwd_ref in
fastdistil/ops/cosine_loss.py).

One program per row; the whole hidden vector (H <= 8192) is one block. Forward writes the loss and the
row statistics (<s,t>, |s|^2, |t|^2); backward writes both gradients from them. eps = 1e-12 inside the
sqrt, as torch's cosine_embedding_loss.
"""

import torch
import triton
import triton.language as tl

from fastdistil.kernels._common import device_ctx, load_row_pair, mask_arg


@triton.jit
def _cosine_loss_fwd_kernel(
    s_ptr, t_ptr, mask_ptr, loss_ptr, stats_ptr, stride_row, H, HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    s, t, keep, cols, valid = load_row_pair(s_ptr, t_ptr, mask_ptr, row, stride_row, H, HAS_MASK, BLOCK_H)
    dot = tl.sum(s * t, 0)
    ss = tl.sum(s * s, 0)
    tt = tl.sum(t * t, 0)
    loss = 1.0 - dot / tl.sqrt((ss + 1e-12) * (tt + 1e-12))
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))
    tl.store(stats_ptr + 3 * row, dot)
    tl.store(stats_ptr + 3 * row + 1, ss)
    tl.store(stats_ptr + 3 * row + 2, tt)


@triton.jit
def _cosine_loss_bwd_kernel(
    grad_loss_ptr,
    s_ptr,
    t_ptr,
    stats_ptr,
    mask_ptr,
    gs_ptr,
    gt_ptr,
    stride_row,
    H,
    HAS_MASK: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s, t, keep, cols, valid = load_row_pair(s_ptr, t_ptr, mask_ptr, row, stride_row, H, HAS_MASK, BLOCK_H)
    dot = tl.load(stats_ptr + 3 * row)
    ss = tl.load(stats_ptr + 3 * row + 1)
    tt = tl.load(stats_ptr + 3 * row + 2)
    g = tl.load(grad_loss_ptr + row)
    rinv = 1.0 / tl.sqrt((ss + 1e-12) * (tt + 1e-12))
    cos = dot * rinv
    if STUDENT_GRAD:
        gs = tl.where(valid, g * (s * (cos / (ss + 1e-12)) - t * rinv), 0.0)  # exact zeros on unselected rows
        tl.store(gs_ptr + row * stride_row + cols, gs.to(gs_ptr.dtype.element_ty), mask=cols < H)
    if TEACHER_GRAD:
        gt = tl.where(valid, g * (t * (cos / (tt + 1e-12)) - s * rinv), 0.0)
        tl.store(gt_ptr + row * stride_row + cols, gt.to(gt_ptr.dtype.element_ty), mask=cols < H)


def _block_h(H):
    if H > 8192:
        raise ValueError(f"the Triton cosine_loss kernel handles hidden sizes up to 8192, got {H}")
    return triton.next_power_of_2(H)


def cosine_loss_fwd(student_hidden, teacher_hidden, row_mask=None):
    """(N, H), (N, H), (N,) bool or None -> loss (N,) float32, stats (N, 3) float32."""
    s, t = student_hidden.contiguous(), teacher_hidden.contiguous()
    N, H = s.shape
    loss = torch.empty(N, device=s.device, dtype=torch.float32)
    stats = torch.empty(N, 3, device=s.device, dtype=torch.float32)
    mask, has_mask = mask_arg(row_mask, s)
    if N > 0:
        with device_ctx(s):
            _cosine_loss_fwd_kernel[(N,)](
                s, t, mask, loss, stats, s.stride(0), H, HAS_MASK=has_mask, BLOCK_H=_block_h(H)
            )
    return loss, stats


def cosine_loss_bwd(
    grad_loss, student_hidden, teacher_hidden, stats, row_mask=None, student_grad=True, teacher_grad=True
):
    """-> (grad wrt student_hidden, grad wrt teacher_hidden), each (N, H) in the inputs' dtype, or (0,)
    for a side whose flag is False."""
    s, t = student_hidden.contiguous(), teacher_hidden.contiguous()
    N, H = s.shape
    grad_s = torch.empty_like(s) if student_grad else s.new_empty((0,))
    grad_t = torch.empty_like(t) if teacher_grad else t.new_empty((0,))
    mask, has_mask = mask_arg(row_mask, s)
    if N > 0:
        with device_ctx(s):
            _cosine_loss_bwd_kernel[(N,)](
                grad_loss.float().contiguous(),
                s,
                t,
                stats.float().contiguous(),
                mask,
                grad_s if student_grad else s,
                grad_t if teacher_grad else t,
                s.stride(0),
                H,
                HAS_MASK=has_mask,
                STUDENT_GRAD=student_grad,
                TEACHER_GRAD=teacher_grad,
                BLOCK_H=_block_h(H),
            )
    return grad_s, grad_t
