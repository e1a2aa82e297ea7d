"""The distillation head fwd+bwd: the DistilBERT baseline (eager), torch.compile of it, and ours.

    pytest benchmarks/bench_distill_head.py --benchmark-only

The baseline is distill_head_ref in fastdistil/ops/distill_head.py: full (N, V) logits from both vocabulary
projections, masked_select of the attention rows, KLDivLoss(batchmean) * T^2 at T = 2, CrossEntropyLoss on
the labelled rows, 5 * loss_ce + 2 * loss_mlm, backward to the student's hidden states, weight and bias.
Ours is fastdistil.fused_distill_head (chunked GEMMs + the fused epilogue). Inputs: N tokens with ~10%
padding rows and 15% labelled rows, H = 768, V = 30522; bf16 means autocast over fp32 parameters.

The work is GEMM-bound (four (N x H x V) products), so rates are GFLOP/s against the machine's own GEMM
ceiling in that dtype. On these CPU machines bf16 GEMMs run at a fifth of fp32 (no AVX-512 BF16): the bf16
N = 8192 case takes minutes per arm and runs only with FASTDISTIL_BENCH_FULL=1 (always on a GPU).
Targets (CPU, N = 8192, fp32) are checked in the report.
"""

import os
import sys

import pytest
import torch

import fastdistil
from benchmarks import harness
from fastdistil.ops import op_module

D = op_module("distill_head")
H, V = 768, 30522
TEMPERATURE, ALPHA_CE, ALPHA_MLM = 2.0, 5.0, 2.0
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtype (None: plain fp32)
NS = (8192,) if harness.QUICK else (2048, 8192)
ARMS = harness.without_compiled(["eager", "compiled", "ours"])
FULL = harness.DEVICE == "cuda" or os.environ.get("FASTDISTIL_BENCH_FULL") == "1"


def _inputs(N):
    g = harness.generator(0)
    d = harness.DEVICE
    sh = harness.randn(N, H, generator=g).requires_grad_()
    sw = harness.randn(V, H, generator=g, scale=0.05).requires_grad_()
    sb = harness.randn(V, generator=g, scale=0.1).requires_grad_()
    th = harness.randn(N, H, generator=g)
    tw = harness.randn(V, H, generator=g, scale=0.05)
    tb = harness.randn(V, generator=g, scale=0.1)
    kl_mask = harness.padding_mask(N, g)
    chosen = torch.rand(N, generator=g, device=d) < 0.15
    labels = torch.where(chosen, torch.randint(0, V, (N,), generator=g, device=d), -100)
    labels[~kl_mask] = -100
    return (sh, sw, sb, th, tw, tb), kl_mask, labels


def make_step(arm, N, dtype):
    """A zero-argument callable running one fwd+bwd of `arm` on fixed inputs."""
    tensors, kl_mask, labels = _inputs(N)
    autocast = DTYPES[dtype]
    if arm == "ours":

        def loss_fn(*xs):
            return fastdistil.fused_distill_head(
                *xs, temperature=TEMPERATURE, kl_mask=kl_mask, mlm_labels=labels, alpha_ce=ALPHA_CE, alpha_mlm=ALPHA_MLM
            )

    else:

        def reference(*xs):
            return D.distill_head_ref(*xs, temperature=TEMPERATURE, kl_mask=kl_mask, mlm_labels=labels)

        loss_fn = torch.compile(reference) if arm == "compiled" else reference

    def step():
        with torch.autocast(harness.DEVICE, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss_ce, loss_mlm = loss_fn(*tensors)
        (ALPHA_CE * loss_ce + ALPHA_MLM * loss_mlm).backward()
        for x in tensors[:3]:
            x.grad = None
        harness.sync()

    return step


OP = "distill_head"
CASES = [
    {"arm": arm, "N": N, "dtype": dtype}
    for dtype in DTYPES
    for N in NS
    if FULL or not (dtype == "bf16" and N == 8192)
    for arm in ARMS
]


def _rows(case):
    return case["N"] - case["N"] // 10  # the rows that carry a loss (padding is 10%)


def flops(case):
    """The four GEMMs the job needs on its selected rows: teacher and student logits, d hidden, d weight."""
    return 2 * _rows(case) * V * H * 4


def gemm_dtype(case):
    return DTYPES[case["dtype"]] or torch.float32


def bytes_moved(case):
    return 0  # compute-bound: reported in GFLOP/s (see flops)


def rounds(case):
    if harness.DEVICE == "cuda":
        return 10
    return 3 if case["N"] <= 2048 and case["dtype"] == "fp32" else 1


@pytest.mark.parametrize("case", CASES, ids=harness.case_id)
def test_distill_head_fwd_bwd(benchmark, case):
    benchmark.group = f"distill_head N={case['N']} H={H} V={V} {case['dtype']}"
    harness.run(sys.modules[__name__], case, benchmark)


def _memory_target(by_arm, ceiling):
    ours, eager = by_arm.get("ours"), by_arm.get("eager")
    if not (ours and eager):
        return False, "not measured"
    frac = ours.peak_delta_bytes / eager.peak_delta_bytes
    return frac <= 0.10, (
        f"{100 * frac:.1f}% ({ours.peak_delta_bytes / 2**20:.0f} MB vs {eager.peak_delta_bytes / 2**20:.0f} MB)"
    )


if harness.DEVICE == "cpu":
    harness.TARGETS[("distill_head", harness.case_key({"N": 8192, "dtype": "fp32"}))] = [
        ("peak memory delta <= 10% of eager", _memory_target),
        ("time <= 1.0x eager", harness.time_ratio_target("eager", 1.0)),
        ("time <= 1.2x compiled", harness.time_ratio_target("compiled", 1.2)),
    ]
