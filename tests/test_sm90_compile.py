"""The sm_90 compile gate, run without a GPU: every Triton kernel variant the ops can launch (kernels, dtypes,
head-size classes, flags) is compiled for the H200 with Triton's own compiler and ptxas, and must fit sm_90's
shared memory and compile without register spills. What the interpreter cannot show (a launch that fails for lack
of shared memory, a kernel that spills to local memory) is caught here. The compiler runs in a subprocess without
TRITON_INTERPRET (the interpreter replaces the kernels with Python). About two minutes: marked slow, run once by
CI (.ci/run)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests import sm90

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(sm90.toolchain_problem() is not None, reason=str(sm90.toolchain_problem()))


def _compile(*flags) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "tests.sm90", *flags], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=1200)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_every_triton_variant_fits_sm90_without_spills():
    rows = _compile("--json")
    assert len(rows) >= 100, len(rows)  # every kernel, dtype and head size: the enumeration did not shrink
    over = [f"{r['name']}: {r['shared']} B of shared memory" for r in rows if r["shared"] > sm90.SM90_SHARED_LIMIT]
    spilled = [f"{r['name']}: {r['spill_bytes']} B spilled at {r['registers']} registers" for r in rows
               if r["spill_bytes"]]  # fmt: skip
    assert not over, over
    assert not spilled, spilled


@pytest.mark.slow
def test_the_gate_sees_spills():
    """The gate itself can fail: fp32 attention with 64 x 64 tiles and four warps at D = 64 reads as spilling,
    which is why the kernels' TILES use smaller fp32 tiles."""
    (row,) = _compile("--probe")
    assert row["spill_bytes"] > 0 and row["shared"] > 0, row


def test_unsupported_attention_variants_are_refused_with_the_reason():
    from fastdistil.kernels import attention as A

    assert A.supported(64, torch.float32) and A.supported(256, torch.bfloat16) and A.supported(256, torch.float16)
    assert A.supported(256, torch.float32, backward=False) and not A.supported(256, torch.float32)
    with pytest.raises(ValueError, match="shared memory"):
        A.launch_config("bwd_dkdv", 200, torch.float32)
    assert A.launch_config("fwd", 64, torch.float32) != (64, 64, 64, 4)  # the probe's spilling tile is not used
    for cls in ("half", "fp32"):  # the backward's two kernels cover the same head sizes, within the forward's
        assert set(A.TILES["bwd_dkdv"][cls]) == set(A.TILES["bwd_dq"][cls]) <= set(A.TILES["fwd"][cls])
