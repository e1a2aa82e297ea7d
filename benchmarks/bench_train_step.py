"""One training step of python -m fastdistil.train: `--kernels reference` (the pure-PyTorch baseline: full
vocabulary logits from both models, DistilBERT's loss formulation) against `--kernels fused` (the streaming
distillation head and the fused cosine loss), on a small BERT with the real 30522-token vocabulary.

    pytest benchmarks/bench_train_step.py --benchmark-only

Teacher: BertForMaskedLM, 4 layers, H = 256 (random weights: speed and memory do not depend on them);
student: its layers [0, 3]. Batch: 16 sequences of 128 tokens with 15% masked, the full DistilBERT objective
(alpha_ce 5, alpha_mlm 2, alpha_cos 1), forward + backward + AdamW step. Reported: median step time,
tokens/s, and peak memory delta of a step (fresh process per arm on CPU).
"""

import sys

import pytest
import torch

from benchmarks import harness

V, H, LAYERS, B, L = 30522, 256, 4, 16, 128
ARMS = ["eager", "ours"]  # eager = --kernels reference, ours = --kernels fused
DTYPES = {"fp32": "fp32", "bf16": "bf16"}


def make_step(arm, dtype):
    import transformers

    from fastdistil import config as fd_config
    from fastdistil import data as fd_data
    from fastdistil import models as fd_models
    from fastdistil import objectives
    from fastdistil.ops import use_kernels
    from fastdistil.trainer import autocast

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=4 * H
    )
    t_model = transformers.BertForMaskedLM(cfg).eval().to(harness.DEVICE)
    for p in t_model.parameters():
        p.requires_grad_(False)
    student = fd_models.student_from_teacher(t_model, [0, 3]).to(harness.DEVICE)
    c = fd_config.resolve({"alpha_ce": 5.0, "alpha_mlm": 2.0, "precision": DTYPES[dtype], "device": harness.DEVICE})
    objective = objectives.for_teacher(c, student, t_model, has_mlm_head=True)
    kernels = "reference" if arm == "eager" else "fused"
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(1000, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[B // 2 :, L * 3 // 4 :] = 0  # some padding
    masker = fd_data.MLMMasker(torch.randint(1, 100, (V,)).numpy(), [0, 100, 101, 102, 103], 103)
    masked, labels = masker(fd_data.Batch(ids, mask), torch.Generator().manual_seed(0))
    masked, mask, labels = masked.to(harness.DEVICE), mask.to(harness.DEVICE), labels.to(harness.DEVICE)

    def step():
        with use_kernels(kernels), autocast(c.precision, harness.DEVICE):
            losses = objective(masked, mask, labels)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        harness.sync()

    return step


OP = "train_step"
CASES = [{"arm": arm, "dtype": dtype} for dtype in DTYPES for arm in ARMS]


def tokens(case):
    return B * L - (B // 2) * (L // 4)


def bytes_moved(case):
    return 0


def rounds(case):
    if harness.DEVICE == "cuda":
        return 20
    return 5 if case["dtype"] == "fp32" else 2  # bf16 GEMMs are slow on CPUs without native bf16


@pytest.mark.parametrize("case", CASES, ids=harness.case_id)
def test_train_step(benchmark, case):
    benchmark.group = f"train_step BERT L={LAYERS} H={H} V={V} {case['dtype']}"
    harness.run(sys.modules[__name__], case, benchmark)
