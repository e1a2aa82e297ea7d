"""kd_loss fwd+bwd: the DistilBERT distiller's formulation (eager), torch.compile of it, and ours.

    pytest benchmarks/bench_kd_loss.py --benchmark-only

The baseline is kd_loss_ref in fastdistil/ops/kd_loss.py: masked_select of the attention-mask rows,
/T, log_softmax, softmax, KLDivLoss(batchmean) * T^2, backward. Inputs: logits of N tokens of which
~10% are padding (unselected rows), V = 30522. Bytes that must move: read both logits of the selected
rows once, write the whole gradient once. Targets (CPU, N = 4096, fp32) are checked in the report.
"""

import sys

import pytest
import torch

import fastdistil
from benchmarks import harness
from fastdistil.ops import op_module

K = op_module("kd_loss")
V = 30522
TEMPERATURE = 2.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NS = (1024, 4096) if harness.DEVICE == "cpu" else ((16384,) if harness.QUICK else (4096, 16384))
ARMS = harness.arms(K.FWD_IMPLS)


def make_step(arm, N, dtype):
    """A zero-argument callable running one fwd+bwd of `arm` on fixed inputs."""
    g = harness.generator(0)
    s = harness.randn(N, V, generator=g, scale=4.0, dtype=DTYPES[dtype]).requires_grad_()
    t = harness.randn(N, V, generator=g, scale=4.0, dtype=DTYPES[dtype])
    mask = harness.padding_mask(N, g)
    return harness.loss_step(arm, K.kd_loss_ref, fastdistil.kd_loss, lambda fn: fn(s, t, TEMPERATURE, mask), s)


OP = "kd_loss"
CASES = [{"arm": arm, "N": N, "dtype": dtype} for dtype in DTYPES for N in NS for arm in ARMS]


def bytes_moved(case):
    elt = torch.finfo(DTYPES[case["dtype"]]).bits // 8
    selected = case["N"] - case["N"] // 10
    return (2 * selected * V + case["N"] * V) * elt


def rounds(case):
    return 3 if (case["arm"] in ("eager", "compiled") and harness.DEVICE == "cpu") else 10


@pytest.mark.parametrize("case", CASES, ids=harness.case_id)
def test_kd_loss_fwd_bwd(benchmark, case):
    benchmark.group = f"kd_loss N={case['N']} V={V} {case['dtype']}"
    harness.run(sys.modules[__name__], case, benchmark)


def _memory_target(by_arm, ceiling):
    ours = by_arm.get("ours")
    one = 4096 * V * 4
    if not ours:
        return False, "not measured"
    ratio = ours.peak_delta_bytes / one
    return ratio <= 1.25, f"{ratio:.2f}x one (N, V) fp32 tensor ({ours.peak_delta_bytes / 2**20:.0f} MB)"


def _bandwidth_target(by_arm, ceiling):
    ours = by_arm.get("ours")
    if not (ours and ceiling):
        return False, "not measured"
    frac = ours.gbs / ceiling
    return frac >= 0.5, f"{100 * frac:.0f}% ({ours.gbs:.1f} of {ceiling:.1f} GB/s)"


if harness.DEVICE == "cpu":
    harness.TARGETS[("kd_loss", harness.case_key({"N": 4096, "dtype": "fp32"}))] = [
        (">= 10x faster than eager", harness.time_ratio_target("eager", 1 / 10)),
        (">= 3x faster than compiled", harness.time_ratio_target("compiled", 1 / 3)),
        ("peak memory delta <= 1.25x one (N, V) fp32", _memory_target),
        (">= 50% of measured bandwidth", _bandwidth_target),
    ]
