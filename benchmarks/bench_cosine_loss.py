"""cosine_loss fwd+bwd: the DistilBERT distiller's formulation (eager), torch.compile of it, and ours.

    pytest benchmarks/bench_cosine_loss.py --benchmark-only

Baseline: cosine_loss_ref in fastdistil/ops/cosine_loss.py (masked_select of the attention-mask rows of
the last hidden states + CosineEmbeddingLoss with target 1), backward to the student only, as in training.
Bytes that must move: read both hidden states of the selected rows once, write the student gradient once.
"""

import sys

import pytest
import torch

import fastdistil
from benchmarks import harness
from fastdistil.ops import op_module

C = op_module("cosine_loss")
H = 768
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NS = (16384,) if harness.QUICK else (4096, 16384)
ARMS = harness.arms(C.FWD_IMPLS)


def make_step(arm, N, dtype):
    """A zero-argument callable running one fwd+bwd of `arm` on fixed inputs (gradient to the student only)."""
    g = harness.generator(0)
    s = harness.randn(N, H, generator=g, dtype=DTYPES[dtype]).requires_grad_()
    t = harness.randn(N, H, generator=g, dtype=DTYPES[dtype])
    mask = harness.padding_mask(N, g)
    return harness.loss_step(arm, C.cosine_loss_ref, fastdistil.cosine_loss, lambda fn: fn(s, t, mask), s)


OP = "cosine_loss"
CASES = [{"arm": arm, "N": N, "dtype": dtype} for dtype in DTYPES for N in NS for arm in ARMS]


def bytes_moved(case):
    elt = torch.finfo(DTYPES[case["dtype"]]).bits // 8
    return (2 * (case["N"] - case["N"] // 10) * H + case["N"] * H) * elt


def rounds(case):
    return 10


@pytest.mark.parametrize("case", CASES, ids=harness.case_id)
def test_cosine_loss_fwd_bwd(benchmark, case):
    benchmark.group = f"cosine_loss N={case['N']} H={H} {case['dtype']}"
    harness.run(sys.modules[__name__], case, benchmark)
