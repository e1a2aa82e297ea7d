"""Tests for fastdistil/ops/distill_head.py: every epilogue implementation against the float64 math (three-way
rule), and fused_distill_head against the reference that materialises full logits (losses and the gradients of
hidden states, weight and bias): odd shapes, chunking, masks, labels, dtypes, bad input, opcheck, compile."""

import pytest
import torch

import fastdistil
from fastdistil.ops import op_module
from tests.conftest import HAS_CUDA, IMPL_DEVICE, assert_close_3way, available, output_rounding_slack

D = op_module("distill_head")
EPI_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPI_SHAPES = [(1, 8), (5, 33), (9, 1000), (4, 4099), (3, 30522)]
EPI_SMALL_SHAPES = [(1, 8), (5, 33), (3, 300)]  # the Triton interpreter is slow


def _epi_inputs(C, V, device, dtype, label_frac=0.5, kl_frac=0.7):
    s = (4 * torch.randn(C, V, dtype=torch.float64)).to(device=device, dtype=dtype)
    t = (4 * torch.randn(C, V, dtype=torch.float64)).to(device=device, dtype=dtype)
    kl_rows = torch.rand(C) < kl_frac
    labels = torch.where(torch.rand(C) < label_frac, torch.randint(0, V, (C,)), -100)
    kl_rows[0], labels[0] = True, 0  # row 0 in both sets, labelled with the first vocabulary entry
    if C > 1:
        labels[-1] = V - 1  # ... and the last one somewhere
    return s, t, kl_rows.to(device), labels.to(device)


def _check_epilogue(impl, s, t, kl_rows, labels, temperature):
    kl_coef = torch.tensor(0.37, device=s.device)
    mlm_coef = torch.tensor(1.3, device=s.device)
    args = (t, kl_rows, labels, kl_coef, mlm_coef, temperature)
    o_kl, o_ce, o_grad = D.distill_epilogue_math(s, *args, compute_dtype=torch.float64)
    l_kl, l_ce, l_grad = D.distill_epilogue_math(s, *args, compute_dtype=s.dtype)
    fn = D.EPILOGUE_IMPLS[impl]
    s_nograd = s.clone()
    kl, ce = fn(s_nograd, *args, False)
    assert torch.equal(s_nograd, s), "with_grad=False must leave the logits alone"
    assert kl.dtype == ce.dtype == torch.float32
    assert_close_3way(kl.cpu(), o_kl.cpu(), l_kl.cpu(), what=f"{impl} kl")
    assert_close_3way(ce.cpu(), o_ce.cpu(), l_ce.cpu(), atol=1e-5, what=f"{impl} ce")
    g = s.clone()
    kl_g, ce_g = fn(g, *args, True)
    torch.testing.assert_close(kl_g, kl, rtol=0, atol=0)
    torch.testing.assert_close(ce_g, ce, rtol=0, atol=0)
    slack = output_rounding_slack(impl, s.dtype)
    lp_grad = l_grad.to(s.dtype)  # what PyTorch would hand on in this dtype
    assert_close_3way(g.cpu(), o_grad.cpu(), lp_grad.cpu(), atol=1e-7, rtol=1e-6 + slack, what=f"{impl} grad")


@pytest.mark.parametrize("impl", available(D.EPILOGUE_IMPLS))
@pytest.mark.parametrize("dtype", EPI_DTYPES, ids=str)
def test_epilogue_matches_reference(impl, dtype):
    shapes = EPI_SMALL_SHAPES if impl == "cuda_triton" and not HAS_CUDA else EPI_SHAPES
    for C, V in shapes:
        s, t, kl_rows, labels = _epi_inputs(C, V, IMPL_DEVICE[impl], dtype)
        _check_epilogue(impl, s, t, kl_rows, labels, 2.0)


@pytest.mark.parametrize("impl", available(D.EPILOGUE_IMPLS))
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_epilogue_temperatures_and_row_sets(impl, temperature):
    device = IMPL_DEVICE[impl]
    s, t, kl_rows, labels = _epi_inputs(6, 517, device, torch.float32)
    _check_epilogue(impl, s, t, kl_rows, labels, temperature)
    _check_epilogue(impl, s, t, None, None, temperature)  # every row a KL row, no labels
    _check_epilogue(impl, s, t, torch.zeros_like(kl_rows), labels, temperature)  # MLM only
    # A row in neither set: zero losses and an exact zero gradient.
    s2, t2 = s[:2].clone(), t[:2]
    kl, ce = D.EPILOGUE_IMPLS[impl](
        s2,
        t2,
        torch.tensor([False, True], device=device),
        torch.tensor([-100, 3], device=device),
        torch.tensor(1.0, device=device),
        torch.tensor(1.0, device=device),
        temperature,
        True,
    )
    assert kl[0].item() == 0 and ce[0].item() == 0 and torch.count_nonzero(s2[0]).item() == 0


@pytest.mark.parametrize("impl", available(D.EPILOGUE_IMPLS))
def test_epilogue_teacher_minus_inf_and_identical_rows(impl):
    device = IMPL_DEVICE[impl]
    s, t, kl_rows, labels = _epi_inputs(4, 300, device, torch.float32)
    t[:, ::7] = float("-inf")  # masked vocabulary entries of the teacher: p = 0, legal
    _check_epilogue(impl, s, t, kl_rows, labels, 2.0)
    one, zero = torch.tensor(1.0, device=device), torch.tensor(0.0, device=device)
    kl, _ = D.EPILOGUE_IMPLS[impl](t.clone(), t, None, None, one, zero, 2.0, False)
    assert kl.abs().max().item() < 1e-5  # KL(x || x) = 0


# ---------------------------------------------------------------------------------------------
# The head against the full-logits reference.


def _head_inputs(N, Hs, Ht, V, *, bias=True, leading=None, dtype=torch.float32, device="cpu"):
    g = lambda *shape, scale=1.0: (scale * torch.randn(*shape, dtype=torch.float64)).to(device=device, dtype=dtype)  # noqa: E731
    lead = leading or (N,)
    sh = g(*lead, Hs)
    sw = g(V, Hs, scale=Hs**-0.5 * 3)
    sb = g(V) if bias else None
    th = g(*lead, Ht)
    tw = g(V, Ht, scale=Ht**-0.5 * 3)
    tb = g(V) if bias else None
    return [sh, sw, sb, th, tw, tb]


def _losses_and_grads(fn, inputs, *, alphas=(5.0, 2.0), grad_factor=1.0, dtype=None, autocast=None, **kw):
    """Run fn (the fused head or the reference) and backpropagate grad_factor * (a_ce loss_ce + a_mlm loss_mlm);
    returns the two losses and the gradients of student hidden, weight, bias."""
    xs = [None if x is None else x.detach().to(dtype or x.dtype) for x in inputs]
    for x in xs[:3]:
        if x is not None:
            x.requires_grad_()
    extra = {"alpha_ce": alphas[0], "alpha_mlm": alphas[1]} if fn is fastdistil.fused_distill_head else {}
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss_ce, loss_mlm = fn(*xs, **kw, **extra)
    (grad_factor * (alphas[0] * loss_ce + alphas[1] * loss_mlm)).backward()
    grads = [None if x is None else x.grad for x in xs[:3]]
    return [loss_ce.detach(), loss_mlm.detach()], grads


def _compare(inputs, *, alphas=(5.0, 2.0), grad_factor=1.0, autocast=None, chunk_sizes=(None,), **kw):
    o_losses, o_grads = _losses_and_grads(
        D.distill_head_ref, inputs, alphas=alphas, grad_factor=grad_factor, dtype=torch.float64, **kw
    )
    l_losses, l_grads = _losses_and_grads(
        D.distill_head_ref, inputs, alphas=alphas, grad_factor=grad_factor, autocast=autocast, **kw
    )
    # bf16 logits: one sample of rounding noise in a scalar loss can come out either side of PyTorch's by more
    # than 2x; allow one bf16 ulp of the value on top of the three-way bound (a wrong formula is off by O(1)).
    low = autocast is not None or inputs[0].dtype != torch.float32
    rtol = torch.finfo(torch.bfloat16).eps if low else 1e-6
    results = []
    for chunk in chunk_sizes:
        losses, grads = _losses_and_grads(
            fastdistil.fused_distill_head,
            inputs,
            alphas=alphas,
            grad_factor=grad_factor,
            autocast=autocast,
            chunk_size=chunk,
            **kw,
        )
        for name, x, o, lp in zip(("loss_ce", "loss_mlm"), losses, o_losses, l_losses):
            assert x.dtype == torch.float32 and x.dim() == 0
            assert_close_3way(x, o, lp, atol=1e-5, rtol=rtol, what=f"{name} (chunk {chunk})")
        for name, x, o, lp in zip(("grad hidden", "grad weight", "grad bias"), grads, o_grads, l_grads):
            if o is None:
                assert x is None
                continue
            assert x.dtype == inputs[["grad hidden", "grad weight", "grad bias"].index(name)].dtype
            assert_close_3way(x, o, lp, atol=1e-6, rtol=rtol, what=f"{name} (chunk {chunk})")
        results.append((losses, grads))
    return results


def _mask_and_labels(N, V, leading=None, kl_frac=0.8, label_frac=0.2):
    lead = leading or (N,)
    kl_mask = torch.rand(lead) < kl_frac
    labels = torch.where(torch.rand(lead) < label_frac, torch.randint(0, V, lead), -100)
    return kl_mask, labels


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_head_odd_shapes_chunks_and_masks(bias):
    N, V = 37, 517
    inputs = _head_inputs(N, 123, 64, V, bias=bias)  # the teacher's hidden size differs: legal
    kl_mask, labels = _mask_and_labels(N, V)
    results = _compare(inputs, kl_mask=kl_mask, mlm_labels=labels, chunk_sizes=(1, 5, None, 64))
    # chunk_size 1 and chunk_size >= N: the same answer up to fp32 summation order.
    (l1, g1), (l64, g64) = results[0], results[-1]
    for a, b in zip(l1 + g1, l64 + g64):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_head_bert_vocabulary_and_batched_leading_shape():
    B, L, V = 2, 7, 30522
    inputs = _head_inputs(0, 48, 48, V, leading=(B, L))
    kl_mask, labels = _mask_and_labels(0, V, leading=(B, L), label_frac=0.4)
    _compare(inputs, kl_mask=kl_mask, mlm_labels=labels, chunk_sizes=(4, None))


def test_head_temperatures_and_grad_output():
    N, V = 21, 301
    inputs = _head_inputs(N, 32, 40, V)
    kl_mask, labels = _mask_and_labels(N, V)
    for temperature in (0.5, 1.0, 4.0):
        _compare(
            inputs, kl_mask=kl_mask, mlm_labels=labels, temperature=temperature, grad_factor=0.37, chunk_sizes=(8,)
        )


def test_head_row_set_edge_cases():
    N, V = 13, 129
    inputs = _head_inputs(N, 16, 16, V)
    kl_mask, labels = _mask_and_labels(N, V)
    no_labels = torch.full((N,), -100)
    _compare(inputs, mlm_labels=labels, chunk_sizes=(4,))  # kl_mask None: every row
    _compare(inputs, kl_mask=kl_mask, chunk_sizes=(4,))  # no MLM labels: loss_mlm 0
    _compare(inputs, kl_mask=kl_mask, mlm_labels=no_labels, chunk_sizes=(4,))  # every label ignored
    # An empty KL row set with labels, and nothing at all: zeros, zero gradients, no NaN.
    ((losses, grads),) = _compare(inputs, kl_mask=torch.zeros(N, dtype=torch.bool), mlm_labels=labels, chunk_sizes=(4,))
    assert losses[0].item() == 0.0 and losses[1].item() > 0
    ((losses, grads),) = _compare(
        inputs, kl_mask=torch.zeros(N, dtype=torch.bool), mlm_labels=no_labels, chunk_sizes=(4,)
    )
    assert [x.item() for x in losses] == [0.0, 0.0]
    assert all(torch.count_nonzero(g).item() == 0 for g in grads)


def test_head_alpha_variants():
    N, V = 11, 97
    inputs = _head_inputs(N, 16, 24, V)
    kl_mask, labels = _mask_and_labels(N, V, label_frac=0.5)
    for alphas in ((1.0, 0.0), (0.0, 1.0), (5.0, 2.0)):
        _compare(inputs, kl_mask=kl_mask, mlm_labels=labels, alphas=alphas, chunk_sizes=(3,))


def test_head_bf16_autocast():
    N, V = 29, 333
    inputs = _head_inputs(N, 64, 64, V)
    kl_mask, labels = _mask_and_labels(N, V)
    _compare(inputs, kl_mask=kl_mask, mlm_labels=labels, autocast=torch.bfloat16, chunk_sizes=(7, None))


def test_head_bf16_tensors():
    """bf16 hidden states and weights (no autocast): GEMMs in bf16, fp32 softmax, grads back in bf16."""
    N, V = 19, 257
    inputs = [None if x is None else x.bfloat16() for x in _head_inputs(N, 32, 32, V)]
    kl_mask, labels = _mask_and_labels(N, V)
    _compare(inputs, kl_mask=kl_mask, mlm_labels=labels, chunk_sizes=(5,))


def test_head_without_gradients_and_teacher_constant():
    N, V = 9, 50
    inputs = _head_inputs(N, 8, 8, V)
    inputs[3].requires_grad_()  # the teacher is a constant even if its tensors require grad
    with torch.no_grad():
        ce, mlm = fastdistil.fused_distill_head(*inputs, mlm_labels=torch.randint(0, V, (N,)), alpha_mlm=1.0)
    assert not ce.requires_grad and ce.item() > 0 and mlm.item() > 0
    xs = [x.detach().requires_grad_() if i in (0, 3) else x for i, x in enumerate(inputs)]
    loss_ce, _ = fastdistil.fused_distill_head(*xs)
    loss_ce.backward()
    assert xs[3].grad is None and xs[0].grad is not None


def test_head_refuses_gradients_it_did_not_compute():
    inputs = [x.detach().requires_grad_(i < 3) for i, x in enumerate(_head_inputs(6, 8, 8, 20))]
    labels = torch.randint(0, 20, (6,))
    loss_ce, loss_mlm = fastdistil.fused_distill_head(*inputs, mlm_labels=labels, alpha_ce=1.0, alpha_mlm=0.0)
    with pytest.raises(RuntimeError, match="not proportional"):
        (loss_ce + loss_mlm).backward()  # loss_mlm's gradient was not computed (alpha_mlm = 0)


def test_head_module_and_chunk_choice():
    N, V = 10, 40
    sh, sw, sb, th, tw, tb = _head_inputs(N, 8, 12, V)
    student, teacher = torch.nn.Linear(8, V), torch.nn.Linear(12, V)
    with torch.no_grad():
        student.weight.copy_(sw), student.bias.copy_(sb), teacher.weight.copy_(tw), teacher.bias.copy_(tb)
    head = fastdistil.DistillHead(temperature=2.0, alpha_ce=1.0)
    assert list(head.parameters()) == []
    out = head(sh, student, th, teacher)
    ref = D.distill_head_ref(sh, sw, sb, th, tw, tb, temperature=2.0)
    torch.testing.assert_close(out[0], ref[0].float())
    assert D.choose_chunk_size(8192, (768, 768), 30522, 4) == 1024  # two (C, V) fp32 buffers in 256 MiB
    assert D.choose_chunk_size(10, (768, 768), 30522, 4) == 10
    assert D.choose_chunk_size(8192, (768,), 30522, 4, budget_bytes=1) == 1


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(student_weight=torch.randn(40, 9)), "H = student_weight.shape"),
        (lambda a: a.update(teacher_weight=torch.randn(41, 12), teacher_bias=None), "vocabularies differ"),
        (lambda a: a.update(student_bias=torch.randn(39)), "student_bias must have shape"),
        (lambda a: a.update(teacher_hidden=torch.randn(9, 12)), "leading shape"),
        (lambda a: a.update(kl_mask=torch.ones(9, dtype=torch.bool)), "mask must have the leading shape"),
        (lambda a: a.update(mlm_labels=torch.full((10,), 40)), "outside \\[0, 40\\)"),
        (lambda a: a.update(mlm_labels=torch.full((10,), -5)), "outside \\[0, 40\\)"),
        (lambda a: a.update(mlm_labels=torch.zeros(10)), "integer tensor"),
        (lambda a: a.update(chunk_size=0), "chunk_size"),
        (lambda a: a.update(temperature=0.0), "temperature"),
        (lambda a: a.update(alpha_ce=float("nan")), "alpha_ce"),
    ],
)
def test_head_bad_input(change, match):
    sh, sw, sb, th, tw, tb = _head_inputs(10, 8, 12, 40)
    args = dict(
        student_hidden=sh, student_weight=sw, student_bias=sb, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb
    )
    change(args)
    kw = {k: args.pop(k) for k in list(args) if k in ("kl_mask", "mlm_labels", "chunk_size", "temperature", "alpha_ce")}
    with pytest.raises((ValueError, TypeError), match=match):
        fastdistil.fused_distill_head(**args, **kw)


def test_head_opcheck():
    N, V = 9, 37
    sh, sw, sb, th, tw, tb = _head_inputs(N, 8, 8, V)
    kl_mask, labels = _mask_and_labels(N, V, label_frac=0.5)
    for with_grad in (False, True):
        args = (
            sh.requires_grad_(with_grad),
            sw.requires_grad_(with_grad),
            sb,
            th,
            tw,
            tb,
            kl_mask,
            labels,
            2.0,
            1.0,
            1.0,
            4,
            torch.float32,
            with_grad,
        )  # opcheck backpropagates ones: alphas (1, 1)
        torch.library.opcheck(
            torch.ops.fastdistil.distill_head_fwd.default,
            args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


def test_head_under_torch_compile():
    N, V = 12, 53
    inputs = _head_inputs(N, 8, 8, V)
    kl_mask, labels = _mask_and_labels(N, V, label_frac=0.5)

    def step(*xs):
        ce, mlm = fastdistil.fused_distill_head(*xs, kl_mask=kl_mask, mlm_labels=labels, alpha_ce=5.0, alpha_mlm=2.0)
        return 5.0 * ce + 2.0 * mlm

    xs = [x.detach().requires_grad_(i < 3) for i, x in enumerate(inputs)]
    eager = step(*xs)
    eager.backward()
    expected = [x.grad.clone() for x in xs[:3]]
    for x in xs[:3]:
        x.grad = None
    compiled = torch.compile(step, fullgraph=True)(*xs)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for x, g in zip(xs[:3], expected):
        torch.testing.assert_close(x.grad, g)


CUDA_EPILOGUES = [p for p in available(D.EPILOGUE_IMPLS) if p.values[0].startswith("cuda")]


@pytest.mark.parametrize("impl", CUDA_EPILOGUES)
def test_epilogue_arguments_on_another_device_are_one_clear_error(impl):
    """A CUDA kernel handed a CPU scalar would read host memory (and Triton's launcher rejects the pointer): the
    GPU epilogues refuse any argument that is not on the logits' device with one clear error. Under the
    interpreter (no GPU) the Triton wrapper's check is shown with a meta tensor."""
    device = IMPL_DEVICE[impl]
    s, t, kl_rows, labels = _epi_inputs(3, 40, device, torch.float32)
    wrong = torch.tensor(1.0, device="meta" if device == "cpu" else "cpu")
    coef = torch.tensor(1.0, device=device)
    for args in ((wrong, coef), (coef, wrong)):
        with pytest.raises((ValueError, RuntimeError), match="must be on the logits' device"):
            D.EPILOGUE_IMPLS[impl](s.clone(), t, kl_rows, labels, *args, 2.0, True)


@pytest.mark.slow
def test_fp16_autocast_head_gradient_is_as_accurate_as_bf16():
    """Under fp16 autocast (--precision fp16 with a GradScaler) the head stores the logits' gradient in fp16;
    (alpha T / |R|)(q - p) would mostly underflow there, so it is stored scaled by a power of two. At BERT's
    vocabulary, fp16's relative error of both gradients stays below 1e-3 (unscaled it is 2-3e-3; bf16's is 2.6e-3
    on the same case). About a minute on two CPU cores (fp16 GEMMs are slow on CPUs)."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 4096, 128, 30522
    sh = torch.randn(N, H, generator=g).requires_grad_()
    sw, tw = (0.3 * torch.randn(V, H, generator=g) for _ in range(2))
    sw.requires_grad_()
    th = torch.randn(N, H, generator=g)
    mask = torch.rand(N, generator=g) < 0.9
    labels = torch.where(torch.rand(N, generator=g) < 0.15, torch.randint(0, V, (N,), generator=g), -100)

    def grads(dtype):
        sh.grad = sw.grad = None
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            ce, mlm = fastdistil.fused_distill_head(sh, sw, None, th, tw, None, kl_mask=mask, mlm_labels=labels,
                                                    alpha_ce=5.0, alpha_mlm=2.0)  # fmt: skip
        (5 * ce + 2 * mlm).backward()
        return sh.grad.clone(), sw.grad.clone()

    exact = grads(None)
    for got, want, name in zip(grads(torch.float16), exact, ("grad_hidden", "grad_weight")):
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-3, (name, rel)
