"""Tests for fastdistil/ops/relation_kl.py: every implementation against the float64 reference (three-way rule) on
the per-row KL, both row log-sum-exps and both student gradients; padding (holes, right padding, a fully padded
sequence); different head sizes on the two sides; L not a multiple of any block; non-contiguous operands; the public
op against the eager formulation that materialises both maps; KL(x || x) = 0; reductions; bad input; gradcheck;
opcheck. Triton runs under TRITON_INTERPRET=1 on CPU without a GPU (small shapes, small tiles)."""

import math

import pytest
import torch

import fastdistil
from fastdistil.ops import op_module, relation_kl
from tests.conftest import (
    HAS_CUDA,
    IMPL_DEVICE,
    assert_close_3way,
    available,
    output_rounding_slack,
    padding_mask,
    skip_bf16_dots_under_the_interpreter,
)

K = op_module("relation_kl")
IMPLS = available(K.FWD_IMPLS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (L, Ds, Dt): odd L (partial blocks); a narrow student against a wide teacher; odd head sizes.
GEOMETRIES = [(37, 8, 24), (70, 32, 64), (19, 13, 13)]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles small enough that the test shapes span several of them (CPU: query-row blocks of 16 rows across
    heads; Triton: 16 x 16 tiles), so the online softmax and the accumulation over blocks are exercised."""
    monkeypatch.setattr(K, "TILE_ELEMENTS", 16 * 37)
    if K.triton_relation_kl is not None and not HAS_CUDA:
        tiles = {d: (16, 16, 4) for d in (16, 32, 64, 128, 256)}
        monkeypatch.setattr(K.triton_relation_kl, "TILES", {"fp32": tiles, "half": tiles})


def _operands(B, R, L, Ds, Dt, device, dtype, layout="BLHD"):
    """(sl, sr, tl, tr); layout BLHD is transformers' (B, L, hidden) projections viewed as (B, R, L, D)."""
    out = []
    for D in (Ds, Ds, Dt, Dt):
        x = (1.5 * torch.randn(B, L, R, D, dtype=torch.float64)).to(device=device, dtype=dtype)
        out.append(x.transpose(1, 2) if layout == "BLHD" else x.transpose(1, 2).contiguous())
    return out


def _check(impl, sl, sr, tl, tr, mask, ss=0.35, ts=0.2):
    kl, lse_s, lse_t = K.FWD_IMPLS[impl](sl, sr, tl, tr, mask, ss, ts)
    o64 = K.relation_kl_fwd_ref(sl, sr, tl, tr, mask, ss, ts, compute_dtype=torch.float64)
    olp = K.relation_kl_fwd_ref(sl, sr, tl, tr, mask, ss, ts, compute_dtype=sl.dtype)
    for name, out, ref, lowp in zip(("kl", "lse_s", "lse_t"), (kl, lse_s, lse_t), o64, olp):
        assert out.dtype == torch.float32 and out.shape == sl.shape[:3], name
        assert_close_3way(out.cpu(), ref.cpu(), lowp.float().cpu(), atol=1e-5, what=f"{impl} {name}")
    assert (kl >= 0).all()
    if mask is not None:
        pad = ~mask[:, None, :].expand_as(kl)
        assert torch.equal(kl[pad].cpu(), torch.zeros(int(pad.sum())))  # exactly 0 on padding rows
    grad = torch.rand(kl.shape, dtype=torch.float64).to(kl) * 2 + 0.5  # grad_output != 1
    dsl, dsr = K.BWD_IMPLS[impl](grad, sl, sr, tl, tr, lse_s, lse_t, mask, ss, ts)
    g64 = K.relation_kl_bwd_ref(grad, sl, sr, tl, tr, o64[1], o64[2], mask, ss, ts, compute_dtype=torch.float64)
    glp = K.relation_kl_bwd_ref(grad, sl, sr, tl, tr, olp[1], olp[2], mask, ss, ts, compute_dtype=sl.dtype)
    rtol = 1e-6 + output_rounding_slack(impl, sl.dtype)
    for name, out, ref, lowp, x in zip(("d sl", "d sr"), (dsl, dsr), g64, glp, (sl, sr)):
        assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous(), name
        assert_close_3way(out.cpu(), ref.cpu(), lowp.cpu(), atol=1e-6, rtol=rtol, what=f"{impl} {name}")
    return kl, dsl, dsr


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "L{}_Ds{}_Dt{}".format(*g))
def test_matches_reference(impl, dtype, geometry):
    skip_bf16_dots_under_the_interpreter(impl, dtype)
    L, Ds, Dt = geometry
    ops = _operands(3, 2, L, Ds, Dt, IMPL_DEVICE[impl], dtype)
    _check(impl, *ops, padding_mask(3, L, IMPL_DEVICE[impl], "padded"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["BLHD", "contiguous"])
def test_without_mask_and_layouts(impl, layout):
    ops = _operands(2, 3, 37, 16, 32, IMPL_DEVICE[impl], torch.float32, layout)
    _check(impl, *ops, None)


@pytest.mark.parametrize("impl", IMPLS)
def test_self_relations_and_identical_models(impl):
    """Q-Q relations (left is right), and a student equal to its teacher: KL 0 and zero gradients."""
    device = IMPL_DEVICE[impl]
    x, _, y, _ = _operands(2, 2, 37, 16, 24, device, torch.float32)
    mask = padding_mask(2, 37, device, "padded")
    _check(impl, x, x, y, y, mask)
    kl, dsl, dsr = _check(impl, x, x, x, x, mask, ss=0.25, ts=0.25)
    assert kl.abs().max() < 1e-5 and (dsl + dsr).abs().max() < 1e-5


def test_public_op_matches_the_eager_formulation():
    """relation_kl (mean over real query rows) and its gradient against the eager maps: matmul, mask, log_softmax,
    softmax, kl_div; one tensor passed as left and right (the relation case) gets both halves of its gradient."""
    sl, _, tl, _ = _operands(3, 4, 37, 8, 24, "cpu", torch.float32)
    mask = padding_mask(3, 37, "cpu", "padded")
    a, b = sl.detach().clone().requires_grad_(), sl.detach().clone().requires_grad_()
    ours, eager = relation_kl(a, a, tl, tl, mask), K.relation_kl_ref(b, b, tl, tl, mask)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    grad_out = torch.tensor(1.7)
    (ours * grad_out).backward()
    (eager * grad_out).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * b.grad.abs().max().item())
    assert a.grad.abs().max() > 0


def test_reductions_and_the_reference_switch():
    sl, sr, tl, tr = _operands(3, 2, 21, 8, 8, "cpu", torch.float32)
    mask = padding_mask(3, 21, "cpu", "padded")
    rows = relation_kl(sl, sr, tl, tr, mask, reduction="none")
    assert rows.shape == (3, 2, 21)
    n_real = int(mask.sum()) * 2
    torch.testing.assert_close(relation_kl(sl, sr, tl, tr, mask, reduction="sum"), rows.sum())
    torch.testing.assert_close(relation_kl(sl, sr, tl, tr, mask), rows.sum() / n_real)
    with fastdistil.ops.use_kernels("reference"):
        torch.testing.assert_close(relation_kl(sl, sr, tl, tr, mask), rows.sum() / n_real, rtol=1e-5, atol=1e-7)
    empty = torch.zeros(3, 21, dtype=torch.bool)
    assert relation_kl(sl, sr, tl, tr, empty).item() == 0.0  # no real row: 0, not NaN


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_may_hold_nan(impl):
    """NaN at padding positions (holes and right padding) changes nothing: the real rows' KL and gradients match a
    run with zeros there, and the padding rows get exactly 0."""
    device = IMPL_DEVICE[impl]
    clean = [x.contiguous() for x in _operands(3, 2, 37, 8, 16, device, torch.float32)]
    mask = padding_mask(3, 37, device, "padded")
    dirty = [torch.where(mask[:, None, :, None], x, float("nan")) for x in clean]
    results = []
    for sl, sr, tl, tr in (clean, dirty):
        kl, lse_s, lse_t = K.FWD_IMPLS[impl](sl, sr, tl, tr, mask, 0.3, 0.2)
        grads = K.BWD_IMPLS[impl](torch.ones_like(kl), sl, sr, tl, tr, lse_s, lse_t, mask, 0.3, 0.2)
        results.append((kl, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    pad = ~mask[:, None, :]
    assert torch.equal(results[1][1][pad.expand(3, 2, 37)], torch.zeros(int(pad.sum()) * 2, 8, device=device))


def test_nan_in_a_real_row_propagates():
    sl, sr, tl, tr = _operands(2, 2, 21, 8, 8, "cpu", torch.float32, "contiguous")
    mask = padding_mask(2, 21, "cpu", "padded")
    sl[0, 0, 0, 0] = float("nan")
    assert torch.isnan(relation_kl(sl, sr, tl, tr, mask))


def test_gradcheck():
    sl, sr, tl, tr = (x.detach().requires_grad_(i < 2) for i, x in enumerate(_operands(2, 2, 9, 4, 6, "cpu",
                                                                                      torch.float64)))  # fmt: skip
    mask = padding_mask(2, 9, "cpu", "padded")
    assert torch.autograd.gradcheck(lambda a, b: relation_kl(a, b, tl, tr, mask, reduction="none"), (sl, sr))


def test_opcheck():
    sl, sr, tl, tr = (x.contiguous() for x in _operands(2, 2, 19, 8, 16, "cpu", torch.float32))
    sl.requires_grad_(), sr.requires_grad_()
    mask = padding_mask(2, 19, "cpu", "padded")
    torch.library.opcheck(torch.ops.fastdistil.relation_kl_fwd, (sl, sr, tl, tr, mask, 0.3, 0.2))
    torch.library.opcheck(torch.ops.fastdistil.relation_kl_fwd, (sl, sr, tl, tr, None, 0.3, 0.2))


def test_cpu_tiles_are_bounded(monkeypatch):
    """The CPU implementation never builds a score tile above TILE_ELEMENTS: at L = 1024 no (L, L) block of either
    side exists, forward or backward."""
    seen = []

    def spy(real):
        def fn(*args, **kwargs):
            a, b = args[-2], args[-1]
            seen.append(a.shape[0] * a.shape[1] * b.shape[-1])
            return real(*args, **kwargs)

        return fn

    monkeypatch.setattr(K, "TILE_ELEMENTS", 1 << 16)
    monkeypatch.setattr(torch, "bmm", spy(torch.bmm))
    monkeypatch.setattr(torch, "baddbmm", spy(torch.baddbmm))
    sl, sr, tl, tr = _operands(1, 2, 1024, 8, 8, "cpu", torch.float32)
    mask = torch.ones(1, 1024, dtype=torch.bool)
    kl, lse_s, lse_t = K.relation_kl_fwd_cpu(sl, sr, tl, tr, mask, 0.3, 0.3)
    K.relation_kl_bwd_cpu(torch.ones_like(kl), sl, sr, tl, tr, lse_s, lse_t, mask, 0.3, 0.3)
    assert seen and max(seen) <= 1 << 16


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda x: (x[0], x[1][..., :4], x[2], x[3]), "same shape"),
        (lambda x: (x[0], x[1], x[2][:, :1], x[3][:, :1]), "agree in"),
        (lambda x: (x[0], x[1], x[2].half(), x[3].half()), "one dtype"),
        (lambda x: (x[0][0], x[1][0], x[2], x[3]), "shape \\(B, heads, L, D\\)"),
        (lambda x: (x[0].int(), x[1], x[2], x[3]), "floating-point"),
    ],
)
def test_bad_operands(bad, match):
    ops = _operands(2, 2, 9, 8, 8, "cpu", torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        relation_kl(*bad(ops))


def test_bad_mask_scale_reduction():
    ops = _operands(2, 2, 9, 8, 8, "cpu", torch.float32)
    with pytest.raises(TypeError, match="bool"):
        relation_kl(*ops, torch.ones(2, 9))
    with pytest.raises(ValueError, match="\\(B, L\\)"):
        relation_kl(*ops, torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="student_scale"):
        relation_kl(*ops, student_scale=-1.0)
    with pytest.raises(ValueError, match="teacher_scale"):
        relation_kl(*ops, teacher_scale=math.inf)
    with pytest.raises(ValueError, match="reduction"):
        relation_kl(*ops, reduction="batchmean")
