"""Bidirectional attention with padding, forward and forward+backward: ours against SDPA and eager.

    pytest benchmarks/bench_attention.py --benchmark-only

Arms:
    eager        transformers' eager BERT attention (matmul, masked softmax, matmul; attention_ref)
    sdpa_mask    F.scaled_dot_product_attention with the (B, 1, 1, L) padding mask (on CUDA this rules out its
                 flash backend)
    sdpa_nomask  SDPA without a mask: what flash costs when padding is simply computed (wrong at padded keys;
                 the speed a mask-free kernel reaches)
    ours         fastdistil.attention(q, k, v, key_padding_mask): Triton on CUDA, ATen's CPU flash kernel on CPU
    ours_varlen  fastdistil.attention_varlen on the unpadded tokens (CUDA only; the unpadding gather is not timed,
                 it happens once per forward, not per layer)
Shapes (B, heads, L, D) = (32, 12, 512, 64) and (32, 12, 128, 64) on CUDA in bf16; on CPU fp32 with B = 4 at
L = 512 (eager needs seconds there). Padding fractions 0, 25%, 50%: right padding, row lengths spread evenly so
that the mean is the fraction. q, k, v in transformers' (B, L, heads, D) memory layout. No dropout.
FLOP/s use the forward convention 4 B heads L^2 D (x 3.5 for forward+backward, as FlashAttention counts), over
the padded length: the same count for every arm, so the ratios are time ratios.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

import fastdistil
from benchmarks import harness
from fastdistil.ops import op_module
from fastdistil.ops.attention import unpad_indices

A = op_module("attention")
HEADS, D = 12, 64
CUDA = harness.DEVICE == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = [(32, 512), (32, 128)] if CUDA else [(4, 512), (32, 128)]
PADDING = (0.0, 0.25, 0.5)
if harness.QUICK:  # tests/run_gpu.sh: the long sequences, unpadded and half padded
    SHAPES, PADDING = SHAPES[:1], (0.0, 0.5)
MODES = ("fwd", "fwd+bwd")
ARMS = ["eager", "sdpa_mask", "sdpa_nomask", "ours"] + (["ours_varlen"] if CUDA else [])


def lengths(B: int, L: int, pad: float) -> torch.Tensor:
    """Row lengths with mean padding fraction `pad`: evenly spread between L (1 - 2 pad) and L, at least 1."""
    frac = torch.linspace(0, 2 * pad, B) if B > 1 else torch.tensor([pad])
    return (L - (frac * L).round().long()).clamp(1, L)


def make_step(arm, B, L, pad, mode):
    g = harness.generator(0)
    backward = mode == "fwd+bwd"
    qkv = [harness.randn(B, L, HEADS, D, generator=g, dtype=DTYPE) for _ in range(3)]
    mask = (torch.arange(L)[None, :] < lengths(B, L, pad)[:, None]).to(harness.DEVICE)
    if arm == "ours_varlen":
        indices, cu, max_seqlen = unpad_indices(mask)
        leaves = [x.reshape(B * L, HEADS, D)[indices].requires_grad_(backward) for x in qkv]

        def run():
            return fastdistil.attention_varlen(*leaves, cu, max_seqlen)
    else:
        leaves = [x.requires_grad_(backward) for x in qkv]
        q, k, v = (x.transpose(1, 2) for x in leaves)  # (B, heads, L, D) views, as transformers passes them
        sdpa_mask = mask[:, None, None, :]
        run = {
            "eager": lambda: A.attention_ref(q, k, v, mask),
            "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask),
            "sdpa_nomask": lambda: F.scaled_dot_product_attention(q, k, v),
            "ours": lambda: fastdistil.attention(q, k, v, mask),
        }[arm]
    grad = None

    def step():
        nonlocal grad
        with torch.set_grad_enabled(backward):
            out = run()
            if backward:
                grad = torch.ones_like(out) if grad is None else grad
                out.backward(grad)
                for x in leaves:
                    x.grad = None
        harness.sync()

    return step


OP = "attention"
CASES = [
    {"arm": arm, "B": B, "L": L, "pad": pad, "mode": mode}
    for mode in MODES
    for B, L in SHAPES
    for pad in PADDING
    for arm in ARMS
]


def flops(case):
    fwd = 4 * case["B"] * HEADS * case["L"] ** 2 * D
    return fwd * (3.5 if case["mode"] == "fwd+bwd" else 1.0)


def gemm_dtype(case):
    return DTYPE


def bytes_moved(case):  # q, k, v, out (and dO, dQ, dK, dV) once each
    per = case["B"] * case["L"] * HEADS * D * torch.finfo(DTYPE).bits // 8
    return per * (4 if case["mode"] == "fwd" else 8)


def rounds(case):
    if CUDA:
        return 30
    return 3 if case["L"] == 512 else 5


# Targets (checked on CUDA, where the Triton kernel is what runs): with padding, beat SDPA given the mask.
for _case in CASES:
    if CUDA and _case["arm"] == "ours" and _case["pad"] > 0:
        key = (OP, harness.case_key({k: v for k, v in _case.items() if k != "arm"}))
        harness.TARGETS.setdefault(key, []).append(
            ("ours <= 1.0x the time of SDPA with the padding mask", harness.time_ratio_target("sdpa_mask", 1.0))
        )


@pytest.mark.parametrize("case", CASES, ids=harness.case_id)
def test_attention(benchmark, case):
    benchmark.group = f"attention B={case['B']} L={case['L']} pad={case['pad']} {case['mode']}"
    harness.run(sys.modules[__name__], case, benchmark)
