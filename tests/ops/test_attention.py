"""Tests for fastdistil/ops/attention.py: every implementation against the float64 reference (three-way rule) on
outputs, log-sum-exp and dQ, dK, dV; padding (holes, right padding, a fully padded row); the (B, L, heads, D)
layout; dropout (the kernels' mask is the reference's, bit for bit; its rate; seeds; gradcheck); varlen;
bad input; opcheck. Triton runs under TRITON_INTERPRET=1 on CPU without a GPU (small shapes)."""

import math

import pytest
import torch

import fastdistil
from fastdistil.ops import attention, attention_varlen, op_module
from fastdistil.ops.attention import pad_output, unpad_input
from tests.conftest import (
    IMPL_DEVICE,
    assert_close_3way,
    available,
    output_rounding_slack,
    padding_mask,
    skip_bf16_dots_under_the_interpreter,
)

A = op_module("attention")
IMPLS = available(A.FWD_IMPLS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GEOMETRIES = [(37, 32), (129, 64)]  # odd L: partial query and key blocks; both head sizes of BERT-family models


def _qkv(B, H, L, D, device, dtype, layout="BLHD", requires_grad=False):
    """Tensors of shape (B, H, L, D); layout BLHD is transformers' projections viewed as (B, H, L, D)."""
    out = []
    for _ in range(3):
        x = torch.randn(B, L, H, D, dtype=torch.float64).to(device=device, dtype=dtype)
        x = x.transpose(1, 2) if layout == "BLHD" else x.transpose(1, 2).contiguous()
        out.append(x.requires_grad_(requires_grad))
    return out


def _check_fwd_bwd(impl, q, k, v, mask, dropout_p=0.0, seed=0, cu=None, max_seqlen=0):
    scale = q.shape[-1] ** -0.5
    args = (mask, cu, max_seqlen, dropout_p, scale, seed)
    out, lse = A.FWD_IMPLS[impl](q, k, v, *args)
    o64, l64 = A.attention_fwd_ref(q, k, v, *args, compute_dtype=torch.float64)
    olp, llp = A.attention_fwd_ref(q, k, v, *args, compute_dtype=q.dtype)
    assert out.dtype == q.dtype and out.shape == q.shape and out.stride() == torch.empty_like(q).stride()
    assert lse.dtype == torch.float32 and lse.shape == l64.shape
    rtol = 1e-6 + output_rounding_slack(impl, q.dtype)
    assert_close_3way(out.cpu(), o64.cpu(), olp.cpu(), rtol=rtol, what=f"{impl} out")
    assert_close_3way(lse.cpu(), l64.cpu(), llp.float().cpu(), what=f"{impl} lse")
    dout = torch.randn(q.shape, dtype=torch.float64).to(q)
    grads = A.BWD_IMPLS[impl](dout, q, k, v, out, lse, *args)
    g64 = A.attention_bwd_ref(dout, q, k, v, o64, l64, *args, compute_dtype=torch.float64)
    glp = A.attention_bwd_ref(dout, q, k, v, olp, llp, *args, compute_dtype=q.dtype)
    for name, g, o, lp, x in zip(("dq", "dk", "dv"), grads, g64, glp, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close_3way(g.cpu(), o.cpu(), lp.cpu(), atol=1e-6, rtol=rtol, what=f"{impl} {name}")
    return out, lse, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,D", GEOMETRIES)
@pytest.mark.parametrize("pattern", ["none", "padded"])
def test_forward_and_backward_match_float64(impl, dtype, L, D, pattern):
    skip_bf16_dots_under_the_interpreter(impl, dtype)
    device = IMPL_DEVICE[impl]
    q, k, v = _qkv(3, 2, L, D, device, dtype)
    mask = padding_mask(3, L, device, pattern)
    out, lse, grads = _check_fwd_bwd(impl, q, k, v, mask)
    if mask is not None:  # the fully padded row: zeros and -inf, never NaN
        assert torch.all(out[2] == 0) and torch.all(lse[2] == -math.inf)
        assert all(torch.all(g[2] == 0) for g in grads)
        dk, dv = grads[1], grads[2]  # masked keys get no gradient at all
        assert torch.all(dk[1, :, L // 2 :] == 0) and torch.all(dv[1, :, L // 2 :] == 0)
        assert torch.all(dk[0, :, L // 3 : L // 3 + 4] == 0) and torch.all(dv[0, :, L // 3 : L // 3 + 4] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_contiguous_bhld_layout_and_head_dim_that_is_not_a_power_of_two(impl):
    device = IMPL_DEVICE[impl]
    q, k, v = _qkv(2, 3, 21, 24, device, torch.float32, layout="BHLD")
    _check_fwd_bwd(impl, q, k, v, padding_mask(2, 21, device, "none"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_matches_the_reference_with_the_same_mask(impl, dropout_p):
    device = IMPL_DEVICE[impl]
    q, k, v = _qkv(3, 2, 37, 32, device, torch.float32)
    _check_fwd_bwd(impl, q, k, v, padding_mask(3, 37, device, "padded"), dropout_p=dropout_p, seed=2**40 + 17)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_dropout_mask_is_the_reference_mask_bit_for_bit(impl):
    """q = 0 makes P uniform (1 / L) and v = identity makes out = P' itself: out[i, j] = keep[i, j] / (L (1 - p))."""
    device, B, H, L, p, seed = IMPL_DEVICE[impl], 2, 2, 32, 0.3, 12345
    q = torch.zeros(B, H, L, L, device=device)
    v = torch.eye(L, device=device).expand(B, H, L, L).contiguous()
    out, _ = A.FWD_IMPLS[impl](q, q, v, None, None, 0, p, 1.0, seed)
    kept = (out * (L * (1 - p))).round().cpu().view(B * H, L, L)
    assert torch.equal(kept.bool(), A.dropout_keep_ref(seed, B * H, L, p))
    assert set(kept.unique().tolist()) <= {0.0, 1.0}


def test_dropout_mask_rate_and_seed_dependence():
    for p in (0.1, 0.5, 0.9):
        keep = A.dropout_keep_ref(7, 96, 256, p)
        n = keep.numel()
        assert abs((1 - keep.float().mean().item()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    a, b = A.dropout_keep_ref(1, 8, 128, 0.5), A.dropout_keep_ref(2, 8, 128, 0.5)
    assert abs((a == b).float().mean().item() - 0.5) < 0.02  # independent masks agree half the time
    assert not torch.equal(A.dropout_keep_ref(2**33 + 1, 8, 128, 0.5), A.dropout_keep_ref(1, 8, 128, 0.5))
    rows = A.dropout_keep_ref(3, 1, 512, 0.5)[0].float()
    assert (rows @ rows.T / 512).triu(1).abs().max() < 0.5  # no two rows share a stream (would be ~1 or ~0)


@pytest.mark.parametrize("impl", IMPLS)
def test_same_seed_same_output_other_seed_other_output(impl):
    device = IMPL_DEVICE[impl]
    q, k, v = _qkv(2, 2, 37, 32, device, torch.float32)
    outs = [A.FWD_IMPLS[impl](q, k, v, None, None, 0, 0.2, 0.2, s)[0] for s in (5, 5, 6)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_seed_none_follows_torch_manual_seed_and_dropout_changes_every_call():
    q, k, v = _qkv(2, 2, 16, 32, "cpu", torch.float32)
    torch.manual_seed(3)
    a, b = attention(q, k, v, dropout_p=0.3), attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(attention(q, k, v, dropout_p=0.3), a) and not torch.equal(a, b)


def test_gradcheck_through_dropout_and_padding():
    """Finite differences (float64, the CPU slot) through the op with dropout and a padding mask."""
    q, k, v = _qkv(2, 2, 7, 8, "cpu", torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, mask, dropout_p=0.3, seed=11), (q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_varlen_matches_reference_and_the_padded_op(impl, dropout_p):
    device, B, H, L, D = IMPL_DEVICE[impl], 4, 2, 45, 32
    x = torch.randn(B, L, 3, H, D, device=device)
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b, n in enumerate((45, 17, 1, 30)):
        mask[b, :n] = True
    xu, indices, cu, max_seqlen = unpad_input(x, mask)
    q, k, v = xu.unbind(1)
    assert max_seqlen == 45 and cu.tolist() == [0, 45, 62, 63, 93]
    out, lse, grads = _check_fwd_bwd(impl, q, k, v, None, dropout_p, 9, cu, max_seqlen)
    qp, kp, vp = (t.transpose(1, 2) for t in x.unbind(2))
    padded, _ = A.FWD_IMPLS[impl](qp, kp, vp, mask, None, 0, dropout_p, D**-0.5, 9)
    torch.testing.assert_close(pad_output(out, indices, B, L), padded.transpose(1, 2) * mask[:, :, None, None])


def test_public_ops_autograd_and_layout():
    q, k, v = _qkv(2, 2, 19, 32, "cpu", torch.float32, requires_grad=True)
    mask = padding_mask(3, 19, "cpu", "padded")[1:]
    out = attention(q, k, v, mask)
    assert out.stride() == q.stride()  # (B, L, heads, D) in memory, like the input: transpose(1, 2) is free
    ref = A.attention_ref(q, k, v, mask)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_varlen_public_op_validates_cu_seqlens():
    q = torch.randn(10, 2, 32)
    with pytest.raises(TypeError, match="int32"):
        attention_varlen(q, q, q, torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match="end at total_tokens"):
        attention_varlen(q, q, q, torch.tensor([0, 9], dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="shorter than a sequence"):
        attention_varlen(q, q, q, torch.tensor([0, 10], dtype=torch.int32), 4)
    out = attention_varlen(q, q, q, torch.tensor([0, 4, 10], dtype=torch.int32), 6)
    assert out.shape == q.shape


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q: attention(q, q, q[..., :16]), ValueError, "same shape"),
        (lambda q: attention(q, q, q.half()), TypeError, "same dtype"),
        (lambda q: attention(q[0], q[0], q[0]), ValueError, r"\(B, heads, L, D\)"),
        (lambda q: attention(q.long(), q.long(), q.long()), TypeError, "floating-point"),
        (lambda q: attention(q, q, q, torch.ones(2, 5)), TypeError, "bool"),
        (lambda q: attention(q, q, q, torch.ones(2, 4, dtype=torch.bool)), ValueError, r"\(B, L\)"),
        (lambda q: attention(q, q, q, dropout_p=1.0), ValueError, "dropout_p"),
        (lambda q: attention(q, q, q, scale=0.0), ValueError, "scale"),
        (lambda q: attention(q, q, q, seed=-1), ValueError, "seed"),
        (lambda q: attention(*(torch.randn(1, 1, 2, 300),) * 3), ValueError, "between 1 and 256"),
    ],
)
def test_bad_input_gets_one_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 5, 32))


def test_opcheck():
    q, k, v = _qkv(2, 2, 9, 16, "cpu", torch.float32, requires_grad=True)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5], dtype=torch.bool)
    torch.library.opcheck(torch.ops.fastdistil.attention_fwd, (q, k, v, mask, None, 0, 0.0, 0.25, 0))
    torch.library.opcheck(torch.ops.fastdistil.attention_fwd, (q, k, v, None, None, 0, 0.1, 0.25, 3))


def test_exported_at_top_level():
    assert fastdistil.attention is attention and fastdistil.attention_varlen is attention_varlen
