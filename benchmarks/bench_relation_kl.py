"""relation_kl fwd+bwd (MiniLMv2's Q-Q relation KL): the eager formulation, torch.compile of it, and ours.

    pytest benchmarks/bench_relation_kl.py --benchmark-only

Arms:
    eager     relation_kl_ref in fastdistil/ops/relation_kl.py: both models' (B, R, L, L) relation maps
              materialised (matmul, mask, log_softmax, softmax, kl_div), autograd backward; what the tools that
              distil attention do
    compiled  torch.compile of the eager formulation
    ours      fastdistil.relation_kl: blocked on CPU, Triton on CUDA; no (L, L) matrix of either model is stored
Relation heads R = 12; the student's relation head size 32 (a 384-wide student), the teacher's 64 (768-wide), one
operand passed as left and right (the Q-Q relation); operands in transformers' (B, L, hidden) layout; right padding
of 25% on average (lengths spread evenly). Shapes (B, L) = (32, 128) and (8, 512); fp32 on CPU, bf16 on CUDA
(where B = 32 at L = 512 too).
FLOPs: forward 2 B R L^2 (Ds + Dt) (one score GEMM per side); the backward recomputes both and adds two GEMMs of
2 B R L^2 Ds: 4 B R L^2 (Ds + Dt) + 4 B R L^2 Ds in all, the same count for every arm. The exponential floor
(about 1.5 G exp/s per CPU here): ours computes 4 B R L^2 exponentials (one per side, forward and backward).
"""

import sys

import pytest
import torch

import fastdistil
from benchmarks import harness
from fastdistil.ops import op_module

K = op_module("relation_kl")
R, DS, DT = 12, 32, 64
CUDA = harness.DEVICE == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = [(32, 128), (8, 512)] + ([(32, 512)] if CUDA else [])
if harness.QUICK:  # tests/run_gpu.sh
    SHAPES = [(32, 512)]
ARMS = harness.arms(K.FWD_IMPLS)


def lengths(B: int, L: int, pad: float = 0.25) -> torch.Tensor:
    frac = torch.linspace(0, 2 * pad, B) if B > 1 else torch.tensor([pad])
    return (L - (frac * L).round().long()).clamp(1, L)


def make_step(arm, B, L):
    g = harness.generator(0)
    s = harness.randn(B, L, R * DS, generator=g, dtype=DTYPE).requires_grad_()
    t = harness.randn(B, L, R * DT, generator=g, dtype=DTYPE)
    mask = (torch.arange(L)[None, :] < lengths(B, L)[:, None]).to(harness.DEVICE)

    def heads(x, D):  # (B, L, R * D) -> (B, R, L, D) views, as the objective passes them
        return x.view(B, L, R, D).transpose(1, 2)

    def run(fn):
        sq, tq = heads(s, DS), heads(t, DT)
        return fn(sq, sq, tq, tq, mask)

    return harness.loss_step(arm, K.relation_kl_ref, fastdistil.ops.relation_kl, run, s)


OP = "relation_kl"
CASES = [{"arm": arm, "B": B, "L": L} for B, L in SHAPES for arm in ARMS]


def flops(case):
    per = case["B"] * R * case["L"] ** 2
    return 4 * per * (DS + DT) + 4 * per * DS


def gemm_dtype(case):
    return DTYPE


def bytes_moved(case):  # both operands read, the student's gradient written
    elt = torch.finfo(DTYPE).bits // 8
    return case["B"] * case["L"] * R * (DS + DT + DS) * elt


def rounds(case):
    if CUDA:
        return 30
    return 3 if case["L"] == 512 or case["arm"] != "ours" else 5


def _memory_target(by_arm, ceiling):
    ours, eager = by_arm.get("ours"), by_arm.get("eager")
    if not (ours and eager):
        return False, "not measured"
    ratio = ours.peak_delta_bytes / eager.peak_delta_bytes
    mb = ours.peak_delta_bytes / 2**20, eager.peak_delta_bytes / 2**20
    return ratio <= 0.10, f"{100 * ratio:.1f}% of eager ({mb[0]:.0f} MB vs {mb[1]:.0f} MB)"


for _B, _L in SHAPES:
    harness.TARGETS[(OP, harness.case_key({"B": _B, "L": _L}))] = [
        ("time <= eager", harness.time_ratio_target("eager", 1.0)),
        ("peak memory delta <= 10% of eager", _memory_target),
    ]


@pytest.mark.parametrize("case", CASES, ids=harness.case_id)
def test_relation_kl_fwd_bwd(benchmark, case):
    benchmark.group = f"relation_kl B={case['B']} R={R} L={case['L']} Ds={DS} Dt={DT}"
    harness.run(sys.modules[__name__], case, benchmark)
