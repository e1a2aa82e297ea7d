"""Helpers shared by the Triton kernel files."""

import torch
import triton
import triton.language as tl


@triton.jit
def load_row_pair(s_ptr, t_ptr, mask_ptr, row, stride_row, H, HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr):
    """One row of two (N, H) tensors as fp32 (zeros past H and on unselected rows, which are never read),
    with the row's keep flag and the lane mask."""
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    cols = tl.arange(0, BLOCK_H)
    valid = (cols < H) & keep
    s = tl.load(s_ptr + row * stride_row + cols, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * stride_row + cols, mask=valid, other=0.0).to(tl.float32)
    return s, t, keep, cols, valid


def mask_arg(row_mask, like):
    """(pointer argument, HAS_MASK) for an optional (N,) bool row mask; `like` stands in when there is none."""
    if row_mask is None:
        return like, False  # never read
    return row_mask.contiguous().view(torch.uint8), True


def device_ctx(t):
    """Launch on the tensor's GPU, not GPU 0 (and nothing to do for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else torch.device(t.device)
