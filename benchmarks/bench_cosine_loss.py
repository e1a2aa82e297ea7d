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
from fastdistil import backend
from fastdistil.ops import op_module

C = op_module("cosine_loss")
H = 768
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NS = (4096, 16384)
CUDA_IMPLS = [n for n in C.FWD_IMPLS if n.startswith("cuda")] if harness.DEVICE == "cuda" else []
ARMS = ["eager", "compiled", "ours"] + [f"ours:{n}" for n in CUDA_IMPLS]


def make_step(arm, N, dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, H, generator=g).to(device=harness.DEVICE, dtype=DTYPES[dtype]).requires_grad_()
    t = torch.randn(N, H, generator=g).to(device=harness.DEVICE, dtype=DTYPES[dtype])
    mask = torch.ones(N, dtype=torch.bool, device=harness.DEVICE)
    mask[torch.randperm(N, generator=g)[: N // 10].to(harness.DEVICE)] = False
    if arm == "eager":
        loss_fn = C.cosine_loss_ref
    elif arm == "compiled":
        loss_fn = torch.compile(C.cosine_loss_ref)
    else:
        loss_fn = fastdistil.cosine_loss
    impl = arm.split(":", 1)[1] if arm.startswith("ours:") else None

    def step():
        with backend.force_cuda_impl(impl):
            loss_fn(s, t, mask).backward()
        s.grad = None
        harness.sync()

    return step


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
