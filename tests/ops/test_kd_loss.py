"""Tests for fastdistil/ops/kd_loss.py: every entry of FWD_IMPLS / BWD_IMPLS against the float64 reference
(three-way rule), and the public op's contract: semantics vs the DistilBERT formulation, masks, reductions,
edge values, bad input, gradcheck, opcheck, torch.compile."""

import math

import pytest
import torch

import fastdistil
from fastdistil.ops import op_module
from tests.conftest import DEVICES, HAS_CUDA, IMPL_DEVICE, assert_close_3way, available, output_rounding_slack

K = op_module("kd_loss")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, V): one row; V below / above / not a multiple of every block size; BERT's vocabulary; N odd.
SHAPES = [(1, 8), (3, 33), (5, 1000), (17, 4099), (7, 30522)]
SMALL_SHAPES = [(1, 8), (3, 33), (5, 300), (2, 4099)]  # for the Triton interpreter (slow)
TEMPERATURES = [0.5, 1.0, 2.0, 4.0]


def _shapes(impl):
    return SMALL_SHAPES if impl == "cuda_triton" and not HAS_CUDA else SHAPES


def _logits(N, V, device, dtype, scale=4.0):
    return (scale * torch.randn(N, V, dtype=torch.float64)).to(device=device, dtype=dtype)  # spread like real logits


def _check(impl, s, t, temperature, row_mask=None):
    """Forward with and without the gradient, and the in-place backward scaling, against the reference."""
    oracle_loss, oracle_grad = K.kd_loss_fwd_ref(s, t, temperature, row_mask, True, compute_dtype=torch.float64)
    lowp_loss, lowp_grad = K.kd_loss_fwd_ref(s, t, temperature, row_mask, True, compute_dtype=s.dtype)
    loss, empty = K.FWD_IMPLS[impl](s, t, temperature, row_mask, False)
    assert loss.dtype == torch.float32 and empty.numel() == 0
    assert_close_3way(loss.cpu(), oracle_loss.cpu(), lowp_loss.cpu(), what=f"{impl} loss")
    loss_g, grad = K.FWD_IMPLS[impl](s, t, temperature, row_mask, True)
    torch.testing.assert_close(loss_g, loss, rtol=0, atol=0)  # same loss whether or not the gradient is kept
    assert grad.dtype == s.dtype and grad.shape == s.shape
    slack = output_rounding_slack(impl, s.dtype)
    assert_close_3way(grad.cpu(), oracle_grad.cpu(), lowp_grad.cpu(), atol=1e-7, rtol=1e-6 + slack, what=f"{impl} grad")
    # Backward: scale rows in place by grad_loss != 1 (one row by exactly 1, which may be skipped).
    grad_loss = torch.rand(s.shape[0], device=s.device) * 3 + 0.5
    grad_loss[0] = 1.0
    expected = (grad.double() * grad_loss.double()[:, None]).to(s.dtype)
    K.BWD_IMPLS[impl](grad_loss, grad)
    torch.testing.assert_close(grad, expected, rtol=torch.finfo(s.dtype).eps + slack, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Every implementation against the float64 reference.


@pytest.mark.parametrize("impl", available(K.FWD_IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(impl, dtype):
    for N, V in _shapes(impl):
        s, t = (_logits(N, V, IMPL_DEVICE[impl], dtype) for _ in range(2))
        _check(impl, s, t, 2.0)


@pytest.mark.parametrize("impl", available(K.FWD_IMPLS))
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperatures(impl, temperature):
    s, t = (_logits(6, 517, IMPL_DEVICE[impl], torch.float32) for _ in range(2))
    _check(impl, s, t, temperature)


@pytest.mark.parametrize("impl", available(K.FWD_IMPLS))
def test_row_mask_skips_rows_even_when_they_hold_nan(impl):
    device = IMPL_DEVICE[impl]
    s, t = (_logits(9, 2500, device, torch.float32) for _ in range(2))  # 3 CPU blocks per row
    row_mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool, device=device)
    s[~row_mask] = float("nan")  # padding rows are never read
    _check(impl, s, t, 2.0, row_mask)
    loss, grad = K.FWD_IMPLS[impl](s, t, 2.0, row_mask, True)
    assert torch.equal(loss[~row_mask].cpu(), torch.zeros(4))
    assert torch.equal(grad[~row_mask].cpu(), torch.zeros(4, 2500))


@pytest.mark.parametrize("impl", available(K.FWD_IMPLS))
def test_neg_inf_logits(impl):
    """-inf = a masked vocabulary entry. Where both sides have it, p = q = 0 and it adds nothing; where only
    the student has it under a finite teacher, the KL is +inf (as in float64 math), never NaN."""
    device = IMPL_DEVICE[impl]
    s, t = (_logits(4, 257, device, torch.float32) for _ in range(2))
    s[:, ::3] = float("-inf")
    t[:, ::3] = float("-inf")
    t[1, :200] = float("-inf")  # whole blocks of -inf at the start of a row
    s[1, :200] = float("-inf")
    _check(impl, s, t, 2.0)
    loss, grad = K.FWD_IMPLS[impl](s, t, 2.0, None, True)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    s[2, 1] = float("-inf")  # teacher finite there: KL(p || q) = +inf
    loss, _ = K.FWD_IMPLS[impl](s, t, 2.0, None)
    assert loss[2].item() == math.inf and torch.isfinite(loss[[0, 1, 3]]).all()


@pytest.mark.parametrize("impl", available(K.FWD_IMPLS))
def test_kl_of_identical_rows_is_zero_and_kl_is_nonnegative(impl):
    device = IMPL_DEVICE[impl]
    x = _logits(5, 1000, device, torch.float32)
    loss, _ = K.FWD_IMPLS[impl](x, x.clone(), 2.0, None)
    assert loss.abs().max().item() <= 1e-6
    near = x + 1e-4 * torch.randn_like(x)  # tiny KL: where one-pass cancellation could go negative
    for s, t in ((x, near), (near, x), (_logits(5, 1000, device, torch.float32), x)):
        loss, _ = K.FWD_IMPLS[impl](s, t, 2.0, None)
        # The kernels clamp the one-pass form at 0; the unclamped fp32 reference may round a hair below.
        floor = -1e-6 if impl == "reference" else 0.0
        assert (loss >= floor).all(), loss


@pytest.mark.parametrize("impl", available(K.FWD_IMPLS))
def test_nan_propagates(impl):
    device = IMPL_DEVICE[impl]
    s, t = (_logits(3, 100, device, torch.float32) for _ in range(2))
    s[0, 17] = float("nan")
    t[2, 99] = float("nan")
    loss, _ = K.FWD_IMPLS[impl](s, t, 2.0, None)
    assert torch.isnan(loss[0]) and torch.isnan(loss[2]) and torch.isfinite(loss[1])


# ---------------------------------------------------------------------------------------------
# The public op: DistilBERT semantics, masks, reductions, gradients.


@pytest.mark.parametrize("device", DEVICES)
def test_matches_distilbert_formulation_with_attention_mask(device):
    """kd_loss == the distiller's masked_select + KLDivLoss(batchmean) * T^2, value and gradient, on (B, L, V)."""
    B, L, V = 3, 11, 1031
    s = _logits(B * L, V, device, torch.float64).view(B, L, V).requires_grad_()
    t = _logits(B * L, V, device, torch.float64).view(B, L, V)
    mask = torch.arange(L, device=device)[None, :] < torch.tensor([11, 7, 3], device=device)[:, None]
    for temperature in (1.0, 2.0):
        ours = fastdistil.kd_loss(s, t, temperature, mask)
        ref = K.kd_loss_ref(s, t, temperature, mask)
        torch.testing.assert_close(ours, ref)
        (g,) = torch.autograd.grad(ours * 3.7, s)  # grad_output != 1
        (g_ref,) = torch.autograd.grad(ref * 3.7, s)
        torch.testing.assert_close(g, g_ref)
        assert torch.equal(g[~mask], torch.zeros_like(g[~mask]))


@pytest.mark.parametrize("device", DEVICES)
def test_reductions_and_scale(device):
    s, t = (
        _logits(4 * 5, 77, device, torch.float32).view(4, 5, 77),
        _logits(20, 77, device, torch.float32).view(4, 5, 77),
    )
    mask = torch.rand(4, 5, device=device) > 0.3
    rows = fastdistil.kd_loss(s, t, 2.0, mask, reduction="none")
    assert rows.shape == (4, 5) and torch.equal(rows[~mask], torch.zeros_like(rows[~mask]))
    torch.testing.assert_close(fastdistil.kd_loss(s, t, 2.0, mask, reduction="sum"), rows.sum())
    torch.testing.assert_close(fastdistil.kd_loss(s, t, 2.0, mask), rows.sum() / mask.sum())
    torch.testing.assert_close(fastdistil.kd_loss(s, t, 2.0, mask, reduction="mean"), rows.sum() / mask.sum())
    unscaled = fastdistil.kd_loss(s, t, 2.0, mask, reduction="none", scale_t2=False)
    torch.testing.assert_close(rows, 4.0 * unscaled)
    torch.testing.assert_close(fastdistil.kd_loss(s, t, 2.0), K.kd_loss_ref(s, t, 2.0), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_masked_gives_zero_loss_and_zero_grad(device):
    s = _logits(6, 50, device, torch.float32).view(2, 3, 50).requires_grad_()
    t = _logits(6, 50, device, torch.float32).view(2, 3, 50)
    mask = torch.zeros(2, 3, dtype=torch.bool, device=device)
    for reduction in ("batchmean", "sum"):
        loss = fastdistil.kd_loss(s, t, 2.0, mask, reduction=reduction)
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, s)
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base_s = _logits(40, 300, device, torch.float32)
    base_t = _logits(40, 300, device, torch.float32)
    s = base_s.view(300, 40).t().requires_grad_()  # (40, 300) with stride (1, 40)... transposed storage
    t = base_t.view(300, 40).t()
    assert not s.is_contiguous()
    ours = fastdistil.kd_loss(s, t, 2.0)
    ref = K.kd_loss_ref(s.detach().double().requires_grad_(), t.double(), 2.0)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(ours, s)
    assert g.shape == s.shape and torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_public_op(dtype):
    s = _logits(8, 500, "cpu", dtype).requires_grad_()
    t = _logits(8, 500, "cpu", dtype)
    loss = fastdistil.kd_loss(s, t, 2.0)
    assert loss.dtype == torch.float32
    ref64 = K.kd_loss_ref(s.detach().double(), t.double(), 2.0)
    ref_lp = K.kd_loss_ref(s.detach(), t, 2.0)
    assert_close_3way(loss.detach(), ref64, ref_lp, what="loss")
    (g,) = torch.autograd.grad(loss, s)
    assert g.dtype == dtype


def test_gradcheck_reference_fp64():
    s = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 17, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda s: K.kd_loss_ref(s, t, 2.0, mask), (s,))


class _KernelOutOfPlace(torch.autograd.Function):
    """One implementation's forward kernel with an out-of-place backward. gradcheck runs the backward of one
    graph many times; the public op's backward scales its buffer in place and so allows only one."""

    @staticmethod
    def forward(ctx, s, t, temperature, row_mask, impl):
        loss, grad = K.FWD_IMPLS[impl](s, t, temperature, row_mask, True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss[:, None], None, None, None, None


@pytest.mark.parametrize("impl", [p for p in available(K.FWD_IMPLS) if p.values[0] in ("reference", "cpu_cpp")])
def test_gradcheck_kernel_fp64(impl):
    """The kernel's float64 path: its gradient buffer must be the exact Jacobian of its loss."""
    s = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 17, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    for temperature, row_mask in ((2.0, mask), (0.5, None)):
        assert torch.autograd.gradcheck(lambda s: _KernelOutOfPlace.apply(s, t, temperature, row_mask, impl), (s,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    s = torch.randn(4, 33, device=device, requires_grad=True)
    t = torch.randn(4, 33, device=device)
    mask = torch.tensor([True, False, True, True], device=device)
    fwd = torch.ops.fastdistil.kd_loss_fwd.default
    torch.library.opcheck(fwd, (s, t, 2.0, None, True))
    torch.library.opcheck(fwd, (s, t, 0.5, mask, True))
    torch.library.opcheck(fwd, (s.detach(), t, 2.0, mask, False))
    torch.library.opcheck(fwd, (s.detach().bfloat16(), t.bfloat16(), 2.0, mask, True))
    _, grad = fwd(s.detach(), t, 2.0, mask, True)
    torch.library.opcheck(torch.ops.fastdistil.kd_loss_bwd.default, (torch.rand(4, device=device), grad))


def test_backward_twice_raises_instead_of_returning_a_wrong_gradient():
    s = torch.randn(3, 20, requires_grad=True)
    loss = fastdistil.kd_loss(s, torch.randn(3, 20))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_gradient_buffer_without_grad():
    s, t = torch.randn(3, 20, requires_grad=True), torch.randn(3, 20)
    with torch.no_grad():
        loss = fastdistil.kd_loss(s, t)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, K.kd_loss_ref(s.detach(), t))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_matches_eager(device):
    s = _logits(12, 301, device, torch.float32).view(3, 4, 301).requires_grad_()
    t = _logits(12, 301, device, torch.float32).view(3, 4, 301)
    mask = torch.rand(3, 4, device=device) > 0.2

    def f(s, t, mask):
        return fastdistil.kd_loss(s, t, 2.0, mask)

    compiled = torch.compile(f, fullgraph=True)
    out, out_c = f(s, t, mask), compiled(s, t, mask)
    torch.testing.assert_close(out_c, out)
    (g,) = torch.autograd.grad(out, s)
    (g_c,) = torch.autograd.grad(compiled(s, t, mask), s)
    torch.testing.assert_close(g_c, g)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_compile_reduce_overhead_matches_eager_cuda():
    # CUDA graphs (reduce-overhead) catch kernels launched on the wrong stream.
    s, t = (_logits(64, 4099, "cuda", torch.float32) for _ in range(2))
    f = lambda s, t: fastdistil.kd_loss(s, t, 2.0)  # noqa: E731
    torch.testing.assert_close(torch.compile(f, mode="reduce-overhead", fullgraph=True)(s, t), f(s, t))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any kernel runs.


@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda s, t: (s, t[:, :-1]), ValueError, r"same shape.*\(4, 10\).*\(4, 9\)"),
        (lambda s, t: (s, t.double()), TypeError, "same dtype"),
        (lambda s, t: (s.long(), t.long()), TypeError, "student_logits must be a floating-point"),
        (lambda s, t: (s[:, :0], t[:, :0]), ValueError, "empty last dimension"),
        (lambda s, t: (s, t.numpy()), TypeError, "teacher_logits must be a torch.Tensor"),
    ],
)
def test_bad_tensors(make, exc, pattern):
    s, t = make(torch.randn(4, 10), torch.randn(4, 10))
    with pytest.raises(exc, match=pattern):
        fastdistil.kd_loss(s, t)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        fastdistil.kd_loss(torch.randn(2, 5), torch.randn(2, 5), temperature)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        fastdistil.kd_loss(torch.randn(2, 5), torch.randn(2, 5), "2")


def test_bad_mask_and_reduction():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"leading shape of the logits, \(2, 3\), got \(2, 4\)"):
        fastdistil.kd_loss(s, t, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        fastdistil.kd_loss(s, t, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastdistil.kd_loss(s, t, reduction="avg")
