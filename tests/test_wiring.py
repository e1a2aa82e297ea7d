"""The architecture itself: one kernel per device for every public op, no silent default, no override
warnings at import, a loud fallback when the native extension is missing, and a torch-version guard."""

import os
import subprocess
import sys

import pytest
import torch

import fastdistil
from fastdistil import backend
from fastdistil.ops import OPS, op_module

PUBLIC_OPS = sorted({op for op, _ in backend.KERNELS})


def test_every_op_is_wired():
    assert sorted(backend.WIRED) == sorted(OPS)
    assert PUBLIC_OPS == sorted(f"fastdistil::{public}" for op in OPS for public in backend.WIRED[op])
    assert backend.WIRED["kd_loss"] == ("kd_loss_fwd", "kd_loss_bwd")
    assert backend.WIRED["distill_head"] == ("distill_epilogue",)
    assert backend.WIRED["attention"] == ("attention_fwd", "attention_bwd")


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_one_kernel_per_device_and_no_silent_default(op):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"
    for key in ("CompositeExplicitAutograd", "CompositeImplicitAutograd"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has a {key} kernel"


def test_cpu_slot_runs_the_cpp_kernel_when_built():
    if backend.NATIVE is None:
        pytest.skip(f"native extension not loaded: {backend.NATIVE_PROBLEM}")
    cpu = {op: impl for (op, device, impl) in backend.table() if device == "cpu"}
    # attention's CPU slot is ATen's CPU flash kernel (fastdistil has no C++ attention), relation_kl's the blocked
    # PyTorch implementation (its work is GEMMs and exponentials that ATen already vectorises); every other op is C++
    assert cpu.pop("fastdistil::attention_fwd") == cpu.pop("fastdistil::attention_bwd") == "cpu_sdpa"
    assert cpu.pop("fastdistil::relation_kl_fwd") == cpu.pop("fastdistil::relation_kl_bwd") == "cpu_blocked"
    assert set(cpu.values()) == {"cpu_cpp"}


def test_import_emits_no_warnings_and_no_kernel_override():
    r = subprocess.run([sys.executable, "-W", "error", "-c", "import fastdistil"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Overriding a previously registered kernel" not in r.stderr


def test_missing_native_extension_warns_once_and_falls_back_to_reference():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastdistil\n"
        "    from fastdistil.ops import op_module\n"
        "    s, t = torch.randn(3, 50, requires_grad=True), torch.randn(3, 50)\n"
        "    loss = fastdistil.kd_loss(s, t); loss.backward()\n"
        "    ref = op_module('kd_loss').kd_loss_ref(s.detach(), t)\n"
        "    torch.testing.assert_close(loss, ref)\n"
        "    fastdistil.cosine_loss(s, t)\n"
        "msgs = [str(x.message) for x in w if issubclass(x.category, fastdistil.backend.FallbackWarning)]\n"
        "print(len(msgs)); print(msgs[0])\n"
    )
    env = dict(os.environ, FASTDISTIL_DISABLE_NATIVE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    count, message = r.stdout.splitlines()[:2]
    assert count == "1", r.stdout
    assert "slow pure-PyTorch reference" in message


def test_extension_built_for_another_torch_is_refused(tmp_path):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF junk " + backend._BUILD_TAG + b"1.0.0+cpu\0 more")
    problem = backend.build_problem(str(fake))
    assert problem and "built against torch 1.0.0+cpu" in problem and "rebuild" in problem
    assert "not built" in backend.build_problem(None)
    if backend.NATIVE is not None:
        assert backend.build_problem(backend.NATIVE.__file__) is None
        assert backend.NATIVE.torch_version == torch.__version__


def test_cuda_impl_override_is_validated(monkeypatch):
    table = op_module("kd_loss").FWD_IMPLS
    monkeypatch.setenv("FASTDISTIL_CUDA_IMPL", "nonsense")
    with pytest.raises(ValueError, match="not an implementation of kd_loss"):
        backend.cuda_impl("kd_loss", table)
    monkeypatch.setenv("FASTDISTIL_CUDA_IMPL", "reference")
    assert backend.cuda_impl("kd_loss", table) == "reference"


def test_backend_table_prints():
    r = subprocess.run([sys.executable, "-m", "fastdistil.info"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for op in PUBLIC_OPS:
        assert op in r.stdout
    assert "fastdistil._C:" in r.stdout


def test_triton_kernels_install_under_the_package():
    pytest.importorskip("triton")
    import fastdistil.kernels.kd_loss as k

    assert k.__name__ == "fastdistil.kernels.kd_loss"
    assert fastdistil.__file__  # the package itself imports from the same install


def test_cpu_output_buffer_cache_reuses_and_releases():
    if backend.NATIVE is None:
        pytest.skip(f"native extension not loaded: {backend.NATIVE_PROBLEM}")
    backend.NATIVE.empty_cache()
    s, t = torch.randn(160, 30522, requires_grad=True), torch.randn(160, 30522)  # 19 MiB: cached
    fastdistil.kd_loss(s, t).backward()
    first = s.grad.data_ptr()
    s.grad = None  # back to the cache
    assert backend.NATIVE.cached_bytes() >= 160 * 30522 * 4
    fastdistil.kd_loss(s, t).backward()
    assert s.grad.data_ptr() == first  # same resident block: no page faults, no kernel zeroing
    s.grad = None
    assert backend.NATIVE.empty_cache() >= 160 * 30522 * 4 and backend.NATIVE.cached_bytes() == 0


def test_cpu_output_buffer_cache_keeps_the_newest_sizes():
    """Stale sizes from earlier work must not lock the shapes in use now out of the cache."""
    if backend.NATIVE is None:
        pytest.skip(f"native extension not loaded: {backend.NATIVE_PROBLEM}")
    backend.NATIVE.empty_cache()
    t = torch.randn(1, 30522)
    rows_seen = (140, 180, 220, 260, 300)  # five distinct block sizes, one more than the cache holds
    for rows in rows_seen:
        s = torch.randn(rows, 30522, requires_grad=True)
        fastdistil.kd_loss(s, t.expand(rows, -1)).backward()
        s.grad = None
    huge = 2 * 2**20  # blocks are whole 2 MiB huge pages
    newest = sum(-(-rows * 30522 * 4 // huge) * huge for rows in rows_seen[1:])
    assert backend.NATIVE.cached_bytes() == newest
    backend.NATIVE.empty_cache()


@pytest.mark.parametrize("op", OPS)
def test_float64_goes_to_the_reference_on_the_cuda_slot(op):
    """The native CUDA kernels compute in fp32 while the fakes promise fp64 outputs for fp64 inputs: the CUDA
    slot routes any fp64 argument to the reference (decided per call; the decision itself needs no GPU)."""
    mod = op_module(op)
    tables = [v for k, v in vars(mod).items() if k.endswith("_IMPLS") and isinstance(v, dict)]
    for impls in tables:
        fp64, fp32 = torch.zeros(3, dtype=torch.float64), torch.zeros(3)
        assert backend.cuda_impl_for_args(op, impls, (fp32, fp64, 2.0, None)) == "reference"
        assert backend.cuda_impl_for_args(op, impls, (fp32, fp32, 2.0, None)) == backend.cuda_impl(op, impls)


def test_the_references_keep_float64():
    kd, cos = op_module("kd_loss"), op_module("cosine_loss")
    s, t = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    assert kd.FWD_IMPLS["reference"](s, t, 2.0, None, True)[0].dtype == torch.float64
    assert cos.FWD_IMPLS["reference"](s, t, None)[0].dtype == torch.float64


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run")
def test_gpu_script_refuses_a_machine_without_a_gpu_at_once(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["bash", os.path.join(root, "tests", "run_gpu.sh"), str(tmp_path)], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert r.returncode == 2 and "no CUDA device is visible" in r.stderr, (r.returncode, r.stderr)
