"""Tests for fastdistil/ops/cosine_loss.py: every implementation against the float64 reference (three-way
rule), the public op against the DistilBERT formulation (masked_select + CosineEmbeddingLoss), masks,
gradients to either side, bad input, gradcheck, opcheck, torch.compile."""

import pytest
import torch

import fastdistil
from fastdistil.ops import op_module
from tests.conftest import DEVICES, HAS_CUDA, IMPL_DEVICE, assert_close_3way, available, output_rounding_slack

C = op_module("cosine_loss")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 8), (3, 123), (37, 768), (5, 1031), (2, 3000)]  # H = 123 and H over one CPU block
SMALL_SHAPES = [(1, 8), (3, 123), (9, 768)]


def _shapes(impl):
    return SMALL_SHAPES if impl == "cuda_triton" and not HAS_CUDA else SHAPES


def _pair(N, H, device, dtype):
    s = torch.randn(N, H, dtype=torch.float64)
    t = 0.6 * s + 0.8 * torch.randn(N, H, dtype=torch.float64)  # correlated, like student vs teacher
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def _check(impl, s, t, row_mask=None):
    N = s.shape[0]
    loss, stats = C.FWD_IMPLS[impl](s, t, row_mask)
    o_loss, o_stats = C.cosine_loss_fwd_ref(s, t, row_mask, compute_dtype=torch.float64)
    l_loss, l_stats = C.cosine_loss_fwd_ref(s, t, row_mask, compute_dtype=s.dtype)
    assert_close_3way(loss.cpu(), o_loss.cpu(), l_loss.cpu(), what=f"{impl} loss")
    assert_close_3way(stats.cpu(), o_stats.cpu(), l_stats.cpu(), what=f"{impl} stats")
    grad_loss = torch.rand(N, dtype=torch.float64, device=s.device) + 0.5
    o_gs, o_gt = C.cosine_loss_bwd_ref(grad_loss, s.double(), t.double(), o_stats, row_mask)
    l_gs, l_gt = C.cosine_loss_bwd_ref(grad_loss.to(s.dtype), s, t, l_stats, row_mask)
    gs, gt = C.BWD_IMPLS[impl](grad_loss.float(), s, t, o_stats.float(), row_mask, True, True)
    assert gs.dtype == s.dtype and gt.dtype == t.dtype
    only_s, no_t = C.BWD_IMPLS[impl](grad_loss.float(), s, t, o_stats.float(), row_mask, True, False)
    assert no_t.numel() == 0 and torch.equal(only_s, gs)
    rtol = 1e-6 + output_rounding_slack(impl, s.dtype)
    assert_close_3way(gs.cpu(), o_gs.cpu(), l_gs.cpu(), atol=1e-7, rtol=rtol, what=f"{impl} grad_student")
    assert_close_3way(gt.cpu(), o_gt.cpu(), l_gt.cpu(), atol=1e-7, rtol=rtol, what=f"{impl} grad_teacher")


@pytest.mark.parametrize("impl", available(C.FWD_IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(impl, dtype):
    for N, H in _shapes(impl):
        _check(impl, *_pair(N, H, IMPL_DEVICE[impl], dtype))


@pytest.mark.parametrize("impl", available(C.FWD_IMPLS))
def test_row_mask_skips_rows_even_when_they_hold_nan(impl):
    device = IMPL_DEVICE[impl]
    s, t = _pair(7, 100, device, torch.float32)
    row_mask = torch.tensor([1, 0, 0, 1, 1, 0, 1], dtype=torch.bool, device=device)
    s[~row_mask] = float("nan")
    _check(impl, s, t, row_mask)


@pytest.mark.parametrize("impl", available(C.FWD_IMPLS))
def test_zero_vector_and_nan(impl):
    """A zero student row is legal (eps keeps cos = 0, loss 1); NaN propagates to its row's loss."""
    device = IMPL_DEVICE[impl]
    s, t = _pair(3, 64, device, torch.float32)
    s[0] = 0.0
    s[2, 5] = float("nan")
    loss, _ = C.FWD_IMPLS[impl](s, t, None)
    assert loss[0].item() == 1.0 and torch.isfinite(loss[1]) and torch.isnan(loss[2])


@pytest.mark.parametrize("device", DEVICES)
def test_matches_distilbert_formulation(device):
    B, L, H = 3, 9, 123
    s, t = _pair(B * L, H, device, torch.float64)
    s, t = s.view(B, L, H).requires_grad_(), t.view(B, L, H).requires_grad_()
    mask = torch.arange(L, device=device)[None, :] < torch.tensor([9, 4, 1], device=device)[:, None]
    ours, ref = fastdistil.cosine_loss(s, t, mask), C.cosine_loss_ref(s, t, mask)
    torch.testing.assert_close(ours, ref)
    g = torch.autograd.grad(ours * 2.5, (s, t))
    g_ref = torch.autograd.grad(ref * 2.5, (s, t))
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_only_to_inputs_that_require_it(device):
    s, t = _pair(6, 40, device, torch.float32)
    s.requires_grad_()
    loss = fastdistil.cosine_loss(s, t)
    loss.backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_reductions_and_empty_mask(device):
    s, t = _pair(10, 33, device, torch.float32)
    s, t = s.view(2, 5, 33).requires_grad_(), t.view(2, 5, 33)
    mask = torch.rand(2, 5, device=device) > 0.4
    rows = fastdistil.cosine_loss(s, t, mask, reduction="none")
    assert rows.shape == (2, 5) and torch.equal(rows[~mask], torch.zeros_like(rows[~mask]))
    torch.testing.assert_close(fastdistil.cosine_loss(s, t, mask, reduction="sum"), rows.sum())
    torch.testing.assert_close(fastdistil.cosine_loss(s, t, mask), rows.sum() / mask.sum().clamp_min(1))
    empty = fastdistil.cosine_loss(s, t, torch.zeros_like(mask))
    assert empty.item() == 0.0
    (g,) = torch.autograd.grad(empty, s)
    assert torch.equal(g, torch.zeros_like(g))


def test_non_contiguous_and_low_precision():
    s, t = _pair(30, 64, "cpu", torch.bfloat16)
    s_nc, t_nc = s.t().contiguous().t(), t.t().contiguous().t()
    assert not s_nc.is_contiguous()
    torch.testing.assert_close(fastdistil.cosine_loss(s_nc, t_nc), fastdistil.cosine_loss(s, t), rtol=0, atol=0)


def test_gradcheck_fp64():
    s = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, True])
    assert torch.autograd.gradcheck(lambda s, t: fastdistil.cosine_loss(s, t, mask), (s, t))
    assert torch.autograd.gradcheck(lambda s, t: C.cosine_loss_ref(s, t, mask), (s, t))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    s = torch.randn(5, 33, device=device, requires_grad=True)
    t = torch.randn(5, 33, device=device, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False], device=device)
    torch.library.opcheck(torch.ops.fastdistil.cosine_loss_fwd.default, (s, t, None))
    torch.library.opcheck(torch.ops.fastdistil.cosine_loss_fwd.default, (s, t, mask))
    _, stats = torch.ops.fastdistil.cosine_loss_fwd(s.detach(), t.detach(), mask)
    for flags in ((True, True), (True, False)):
        torch.library.opcheck(
            torch.ops.fastdistil.cosine_loss_bwd.default,
            (torch.rand(5, device=device), s.detach(), t.detach(), stats, mask, *flags),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_matches_eager(device):
    s, t = _pair(12, 64, device, torch.float32)
    s, t = s.view(3, 4, 64).requires_grad_(), t.view(3, 4, 64)
    mask = torch.rand(3, 4, device=device) > 0.2
    f = lambda s, t, m: fastdistil.cosine_loss(s, t, m)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(s, t, mask), f(s, t, mask))
    torch.testing.assert_close(torch.autograd.grad(compiled(s, t, mask), s), torch.autograd.grad(f(s, t, mask), s))


def test_bad_input():
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3, 8\).*\(2, 3, 7\)"):
        fastdistil.cosine_loss(s, t[..., :7])
    with pytest.raises(TypeError, match="same dtype"):
        fastdistil.cosine_loss(s, t.half())
    with pytest.raises(TypeError, match="floating-point"):
        fastdistil.cosine_loss(s.int(), t.int())
    with pytest.raises(ValueError, match="empty last dimension"):
        fastdistil.cosine_loss(s[..., :0], t[..., :0])
    with pytest.raises(ValueError, match=r"leading shape of the hidden states, \(2, 3\)"):
        fastdistil.cosine_loss(s, t, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'"):
        fastdistil.cosine_loss(s, t, reduction="batchmean")
