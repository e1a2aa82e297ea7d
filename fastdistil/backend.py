"""Which implementation runs where.

    python -m fastdistil.info           # prints the build and the (op, device) -> implementation table

Loads the native extension fastdistil._C (csrc/), refusing one that was built against another torch,
and records which implementation fills each device slot of every public op. The op files in
fastdistil/ops/ decide the wiring in one visible line each, through wire() below.

CUDA slot: each op lists its CUDA implementations in order of preference (CUDA_PREFERENCE); the first
one available here is used. FASTDISTIL_CUDA_IMPL=cuda_cpp|cuda_triton|reference forces one (any key of
an op's *_IMPLS table). A missing native kernel never falls back silently: it warns once, loudly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch

__all__ = ["NATIVE", "NATIVE_PROBLEM", "FallbackWarning", "has_native", "cpu_impl", "cuda_impl", "register", "table"]


class FallbackWarning(UserWarning):
    """A fast implementation is missing and a slower one runs instead."""


_BUILD_TAG = b"fastdistil-built-against-torch:"  # csrc/module.cpp embeds this tag + torch.__version__


def _native_build_torch(path: str) -> str | None:
    """The torch version recorded inside the built _C, read from the file WITHOUT loading it: loading a
    binary built against another torch can crash in its static initialisers before any check runs."""
    with open(path, "rb") as f:
        blob = f.read()
    i = blob.find(_BUILD_TAG)
    if i < 0:
        return None
    end = blob.find(b"\0", i)
    return blob[i + len(_BUILD_TAG) : end].decode("ascii", "replace")


def build_problem(path: str | None) -> str | None:
    """Why the native extension at `path` must not be loaded, or None when it is safe to load."""
    if path is None:
        return "fastdistil._C is not built (run `pip install --no-build-isolation -e .`)"
    built_for = _native_build_torch(path)
    if built_for != torch.__version__:
        return (
            f"fastdistil._C was built against torch {built_for} but torch {torch.__version__} is installed; "
            "rebuild it with `pip install --no-build-isolation -e .`"
        )
    return None


def _load_native():
    if os.environ.get("FASTDISTIL_DISABLE_NATIVE") == "1":  # debugging aid: run the references everywhere
        return None, "FASTDISTIL_DISABLE_NATIVE=1"
    spec = importlib.util.find_spec("fastdistil._C")
    problem = build_problem(None if spec is None else spec.origin)
    if problem:
        return None, problem
    from fastdistil import _C  # runs every TORCH_LIBRARY_IMPL in csrc/

    return _C, None


NATIVE, NATIVE_PROBLEM = _load_native()

# Per op, CUDA implementations in order of preference. Change the default here.
CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {}
# op (an entry of fastdistil.ops.OPS) -> the public ops wire() filled for it, e.g. ("kd_loss_fwd", "kd_loss_bwd").
WIRED: dict[str, tuple[str, ...]] = {}
# (public op, device) -> a function of no arguments giving the name of the implementation in that slot.
KERNELS: dict[tuple[str, str], object] = {}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=3)


def has_native(private_op) -> bool:
    """True when csrc/ registered a kernel for this private op: torch.ops.fastdistil._kd_loss_fwd_cpu
    or its name "fastdistil::_kd_loss_fwd_cpu"."""
    name = getattr(private_op, "_qualified_op_name", private_op)
    key = "CUDA" if name.endswith("_cuda") else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)


def cpu_impl(op: str, impls: dict) -> str:
    """Name of the implementation for the CPU slot: the op's CPU kernel ("cpu_cpp" from csrc/, or a library
    kernel such as "cpu_sdpa"), or the reference (with a warning) when the C++ one is not built."""
    for name in impls:
        if name.startswith("cpu_") and (name != "cpu_cpp" or has_native(impls[name])):
            return name
    _warn_once(
        "cpu",
        f"fastdistil: {NATIVE_PROBLEM or 'the C++ CPU kernels are not registered'}. "
        "CPU ops run the slow pure-PyTorch reference.",
    )
    return "reference"


_available: dict[str, tuple[str, ...]] = {}


def available_cuda_impls(op: str, impls: dict) -> tuple[str, ...]:
    """Implementations of `op` that can fill its CUDA slot here (fixed after import, so computed once:
    cuda_impl runs on every call of an op)."""
    if op not in _available:
        _available[op] = tuple(
            name
            for name, fn in impls.items()
            if (name == "reference" or name.startswith("cuda")) and not (name == "cuda_cpp" and not has_native(fn))
        )
    return _available[op]


_forced_cuda_impl: str | None = None


@contextlib.contextmanager
def force_cuda_impl(name: str | None):
    """Within the block, every op's CUDA slot runs `name` (like FASTDISTIL_CUDA_IMPL); for benchmarks and tests."""
    global _forced_cuda_impl
    previous, _forced_cuda_impl = _forced_cuda_impl, name
    try:
        yield
    finally:
        _forced_cuda_impl = previous


def cuda_impl(op: str, impls: dict) -> str:
    """Name of the implementation for the CUDA slot, resolved at call time (so the env var works per run)."""
    available = available_cuda_impls(op, impls)
    forced = _forced_cuda_impl or os.environ.get("FASTDISTIL_CUDA_IMPL")
    if forced:
        if forced not in impls:
            raise ValueError(f"FASTDISTIL_CUDA_IMPL={forced!r} is not an implementation of {op}: {sorted(impls)}")
        if forced not in available:
            raise RuntimeError(
                f"FASTDISTIL_CUDA_IMPL={forced!r} is not available here ({NATIVE_PROBLEM or 'see README'})"
            )
        return forced
    preference = CUDA_PREFERENCE[op]
    for name in preference:
        if name in available:
            if name != preference[0]:
                _warn_once(f"cuda:{op}", f"fastdistil: {preference[0]} is unavailable for {op}; using {name}.")
            return name
    _warn_once(f"cuda:{op}", f"fastdistil: no CUDA kernel for {op} is available; running the pure-PyTorch reference.")
    return "reference"


def cuda_impl_for_args(op: str, impls: dict, args) -> str:
    """The CUDA slot's choice for one call: float64 inputs (tests' oracles, gradcheck) go to the reference,
    which computes in float64, since the native kernels compute in float32 (the fakes promise float64 out);
    everything else goes to cuda_impl."""
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
        return "reference"
    return cuda_impl(op, impls)


def wire(op: str, tables: dict[str, dict], cuda_preference: tuple[str, ...]) -> None:
    """Fill the CPU and CUDA slots of every public op of `op` from its implementation tables:
    tables = {"kd_loss_fwd": FWD_IMPLS, "kd_loss_bwd": BWD_IMPLS} fills fastdistil::kd_loss_fwd and _bwd.
    All tables share their keys ("reference", "cpu_cpp", "cuda_cpp", "cuda_triton").

    CPU: the C++ kernel, or the reference (warned) when _C is missing; decided once, here. CUDA: the first of
    `cuda_preference` available here (or FASTDISTIL_CUDA_IMPL / force_cuda_impl), resolved at each call."""
    CUDA_PREFERENCE[op] = cuda_preference
    WIRED[op] = tuple(tables)
    first = next(iter(tables.values()))
    cpu = cpu_impl(op, first)

    def cuda_name() -> str:
        return cuda_impl(op, first)

    for public, impls in tables.items():

        def on_cuda(*args, _impls=impls):
            return _impls[cuda_impl_for_args(op, first, args)](*args)

        register(f"fastdistil::{public}", cpu=impls[cpu], cuda=on_cuda, cpu_name=lambda: cpu, cuda_name=cuda_name)


def register(op: str, *, cpu, cuda, cpu_name, cuda_name) -> None:
    """register("fastdistil::kd_loss_fwd", cpu=f, cuda=g, ...): exactly one kernel per device, never a default.

    cpu_name / cuda_name: functions returning the implementation name that the slot runs (for the table)."""
    for device, fn, name in (("cpu", cpu, cpu_name), ("cuda", cuda, cuda_name)):
        if (op, device) in KERNELS:
            raise RuntimeError(f"{op} already has a {device} kernel")
        torch.library.register_kernel(op, device, fn)
        KERNELS[(op, device)] = name


def table() -> list[tuple[str, str, str]]:
    """(op, device, implementation) for every public op slot."""
    return [(op, device, name()) for (op, device), name in sorted(KERNELS.items())]
