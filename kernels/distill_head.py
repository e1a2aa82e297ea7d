"""Triton kernel for the distillation head's fused epilogue (spec: distill_epilogue_ref in
fastdistil/ops/distill_head.py; the C++ kernels in csrc/ compute the same formulas).

One program per row of a chunk of logits. Pass 1 over V in BLOCK_V blocks: online (max, sum of exp) of
s/T and t/T with the p-weighted (t - s)/T sum (KL rows) and of s at T = 1 (labelled rows). Pass 2
(WITH_GRAD): g = kl_c (q - p) + mlm_c (softmax(s) - onehot(label)) overwrites the student logits in place.
"""

import torch
import triton
import triton.language as tl

from fastdistil.kernels._common import device_ctx, kd_block, kd_result, mask_arg, online_lse, row_selected


@triton.jit
def _distill_epilogue_kernel(
    s_ptr,  # (N, V) student logits, overwritten with the gradient when WITH_GRAD
    t_ptr,  # (N, V) teacher logits
    rows_ptr,  # (N,) bool as uint8: the row is in the KL row set (read only when HAS_ROWS)
    labels_ptr,  # (N,) int64, -100 = no label (read only when HAS_LABELS)
    kl_coef_ptr,  # () fp32
    mlm_coef_ptr,  # () fp32
    kl_ptr,  # (N,) fp32 out
    ce_ptr,  # (N,) fp32 out
    stride_row,
    V,
    inv_temperature,
    HAS_ROWS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 once N * V does
    in_kl = row_selected(rows_ptr, row, HAS_ROWS)
    label = -100
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
    has_label = label >= 0
    s_ptr += row * stride_row
    t_ptr += row * stride_row
    m_s = -float("inf")
    d_s = 0.0
    m_t = -float("inf")
    d_t = 0.0
    w = 0.0
    m_1 = -float("inf")
    d_1 = 0.0
    s_label = 0.0  # read in pass 1: pass 2 overwrites the row, and other warps may get there first
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < V
        s_raw = tl.load(s_ptr + cols, mask=valid & (in_kl | has_label), other=-float("inf")).to(tl.float32)
        t_raw = tl.load(t_ptr + cols, mask=valid & in_kl, other=-float("inf")).to(tl.float32)
        s = tl.where(in_kl, s_raw, -float("inf")) * inv_temperature
        t = t_raw * inv_temperature
        m_s, d_s, m_t, d_t, w = kd_block(m_s, d_s, m_t, d_t, w, s, t)
        m_1, d_1, _, _ = online_lse(m_1, d_1, tl.where(has_label, s_raw, -float("inf")))
        s_label += tl.sum(tl.where(cols == label, s_raw, 0.0), 0)
    kl, lse_s, lse_t = kd_result(m_s, d_s, m_t, d_t, w)
    lse_1 = m_1 + tl.log(d_1)
    tl.store(kl_ptr + row, tl.where(in_kl, kl, 0.0))
    tl.store(ce_ptr + row, tl.where(has_label, lse_1 - s_label, 0.0))
    if WITH_GRAD:
        kl_c = tl.where(in_kl, tl.load(kl_coef_ptr), 0.0)
        mlm_c = tl.where(has_label, tl.load(mlm_coef_ptr), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < V
            s = tl.load(s_ptr + cols, mask=valid, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + cols, mask=valid & in_kl, other=0.0).to(tl.float32)
            q = tl.where(in_kl, tl.exp(s * inv_temperature - lse_s), 0.0)
            p = tl.where(in_kl, tl.exp(t * inv_temperature - lse_t), 0.0)
            r = tl.where(has_label, tl.exp(s - lse_1), 0.0)
            g = kl_c * (q - p) + mlm_c * (r - tl.where(cols == label, 1.0, 0.0))
            tl.store(s_ptr + cols, g.to(s_ptr.dtype.element_ty), mask=valid)


def block_v(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)


def distill_epilogue(student_logits, teacher_logits, kl_rows, labels, kl_coef, mlm_coef, temperature, with_grad):
    """Same contract as fastdistil::distill_epilogue (see distill_epilogue_ref)."""
    s = student_logits
    if not s.is_contiguous():
        raise ValueError("student_logits must be contiguous (it is overwritten in place)")
    for name, x in (("teacher_logits", teacher_logits), ("kl_rows", kl_rows), ("labels", labels),
                    ("kl_coef", kl_coef), ("mlm_coef", mlm_coef)):  # fmt: skip
        if x is not None and x.device != s.device:  # Triton's launcher would reject (or misread) the pointer
            raise ValueError(f"{name} is on {x.device} but student_logits is on {s.device}: every tensor argument "
                             "of the epilogue must be on the logits' device")  # fmt: skip
    t = teacher_logits.contiguous()
    N, V = s.shape
    kl = torch.empty(N, device=s.device, dtype=torch.float32)
    ce = torch.empty(N, device=s.device, dtype=torch.float32)
    rows, has_rows = mask_arg(kl_rows, s)
    has_labels = labels is not None
    BLOCK_V = block_v(V)
    if N > 0:
        with device_ctx(s):
            _distill_epilogue_kernel[(N,)](
                s,
                t,
                rows,
                labels.contiguous() if has_labels else s,
                kl_coef.float().contiguous(),
                mlm_coef.float().contiguous(),
                kl,
                ce,
                s.stride(0),
                V,
                1.0 / temperature,
                HAS_ROWS=has_rows,
                HAS_LABELS=has_labels,
                WITH_GRAD=with_grad,
                BLOCK_V=BLOCK_V,
            )
    return kl, ce
