"""Shared test vocabulary: devices, which implementation runs where, tolerances, seeds.

Without a GPU, Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (slow: small shapes only).
The variable must be set before triton.jit decorates anything, i.e. before fastdistil is imported.
"""

import os
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastdistil import backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # the interpreter runs Triton on CPU tensors
IMPL_DEVICE = {
    "reference": "cpu",
    "cpu_cpp": "cpu",
    "cpu_sdpa": "cpu",
    "cpu_blocked": "cpu",
    "cuda_cpp": "cuda",
    "cuda_triton": TRITON_DEVICE,
}


def output_rounding_slack(impl: str, dtype: torch.dtype) -> float:
    """Relative slack for outputs stored in `dtype`. Triton's interpreter (CPU) converts fp32 -> bf16 by
    TRUNCATION, ignoring fp_downcast_rounding (seen with Triton 3.8: half of all elements off by one ulp),
    while GPUs round to nearest even. Allow that extra ulp there, and only there."""
    if impl == "cuda_triton" and not HAS_CUDA and dtype == torch.bfloat16:
        return torch.finfo(dtype).eps
    return 0.0


def available(impls: dict) -> list:
    """pytest params for an op's *_IMPLS table: every implementation, skipped (with the reason) where it
    cannot run here, so a missing kernel shows up as a skip in the report, never as a silent pass."""
    params = []
    for name, fn in impls.items():
        marks = []
        if IMPL_DEVICE[name] == "cuda" and not HAS_CUDA:
            marks.append(pytest.mark.skip(reason=f"{name} needs a CUDA device"))
        elif name.endswith("_cpp") and not backend.has_native(fn):
            marks.append(pytest.mark.skip(reason=f"{name} not built: {backend.NATIVE_PROBLEM or 'no kernel'}"))
        if name == "cuda_triton" and not HAS_CUDA:
            marks.append(pytest.mark.triton_interpret)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def skip_bf16_dots_under_the_interpreter(impl: str, dtype: torch.dtype) -> None:
    if impl == "cuda_triton" and not HAS_CUDA and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs on a GPU")


def padding_mask(B: int, L: int, device, pattern: str = "padded"):
    """Padding patterns of the attention-style ops: a hole in the middle (row 0), right padding (row 1) and, when
    B > 2, a sequence with nothing kept at all (row 2); None for pattern "none"."""
    if pattern == "none":
        return None
    m = torch.ones(B, L, dtype=torch.bool)
    m[0, L // 3 : L // 3 + 4] = False
    m[1, L // 2 :] = False
    if B > 2:
        m[2, :] = False
    return m.to(device)


def assert_close_3way(out, oracle, torch_lowp, *, factor=2.0, atol=1e-6, rtol=1e-6, what="output"):
    """The three-way rule of flash-attention / cut-cross-entropy, on max errors:
        max |ours - ref64| <= factor * max |ref_lp - ref64| + atol + rtol * max |ref64|
    `oracle` is the reference in float64; `torch_lowp` the same reference run in the input dtype (fp32 for
    fp32), so the bound is "no worse than twice what PyTorch itself gets in that precision". Non-finite
    entries must match the oracle exactly (same inf / NaN positions and signs)."""
    out, oracle, torch_lowp = out.double(), oracle.double(), torch_lowp.double()
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isfinite(out), finite), f"{what}: non-finite entries differ from the oracle"
    assert torch.equal(out[~finite].nan_to_num(), oracle[~finite].nan_to_num()), f"{what}: inf/NaN entries differ"
    o, r, lp = out[finite], oracle[finite], torch_lowp[finite]
    if o.numel() == 0:
        return
    ours = (o - r).abs().max().item()
    torchs = (lp - r).abs().max().item()
    bound = factor * torchs + atol + rtol * r.abs().max().item()
    assert ours <= bound, (
        f"{what}: max |ours - ref64| = {ours:.3e} > {bound:.3e} (torch in low precision: {torchs:.3e})"
    )


@pytest.fixture(autouse=True)
def seed(request):
    """Random inputs made fresh in every test from a fixed seed (derived from the test id; override with
    FASTDISTIL_TEST_SEED), printed on failure so any failure can be replayed."""
    env = os.environ.get("FASTDISTIL_TEST_SEED")
    s = int(env) if env is not None else zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    yield s


@pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: works on every pytest a GPU machine may have
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(
                ("seed", f"torch.manual_seed({seeds[0]}); rerun with FASTDISTIL_TEST_SEED={seeds[0]}")
            )
