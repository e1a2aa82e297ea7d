"""python -m fastdistil.evaluate and python -m fastdistil.compress on tiny models built here: every metric against
a hand computation (and scikit-learn), latency warm-up and repeats, retention relative to the teacher, the three
compression formats loading and running, and bad input as one line with exit code 2."""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from fastdistil import compress as fd_compress
from fastdistil import data as fd_data
from fastdistil import evaluate as fd_eval
from fastdistil import heldout as fd_heldout
from fastdistil import models as fd_models
from tests.test_train import WORDS, _tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An MLM teacher (4 layers), two students from its layers, an encoder-only teacher and its student (what
    the default training job produces), held-out text and a labelled CSV."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    tok = _tokenizer(root)
    cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, initializer_range=0.3)  # fmt: skip
    teacher = transformers.BertForMaskedLM(transformers.BertConfig(**cfg))
    encoder = transformers.BertModel(transformers.BertConfig(**cfg))
    models = {
        "teacher": teacher,
        "student2": fd_models.student_from_teacher(teacher, [0, 3]),
        "student1": fd_models.student_from_teacher(teacher, [3]),
        "encoder-teacher": encoder,
        "encoder-student": fd_models.student_from_teacher(encoder, [0, 3]),
    }
    for name, m in models.items():
        fd_models.save_student(m, tok, root / name)
    rng = random.Random(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(60)) + "\n")
    rows = ["text,label"]
    for _ in range(60):
        label = rng.choice(["sea", "land"])
        words = WORDS[:8] if label == "sea" else WORDS[8:16]
        rows.append(" ".join(rng.choice(words) for _ in range(10)) + f",{label}")
    (root / "labelled.csv").write_text("\n".join(rows) + "\n")
    return root


def _common(root, *extra):
    return [
        "--data", str(root / "text.txt"), "--cache_dir", str(root / "cache"), "--num_proc", "1",
        "--max_seq_len", "24", "--eval_fraction", "0.3", "--batch_size", "2", "--seq_len", "16",
        "--warmup", "1", "--repeats", "3", "--quiet", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Metrics against hand computations


def test_classification_metrics_by_hand_and_against_scikit_learn():
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    m = fd_eval.classification_metrics(y_true, y_pred)
    # class 0: P 1/2 R 1/2 F 1/2; class 1: P 2/3 R 1 F 4/5; class 2: P 1 R 1/2 F 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    never_predicted = fd_eval.classification_metrics([0, 1, 1], [0, 0, 0])  # class 1: P = R = F = 0
    assert never_predicted["precision_macro"] == pytest.approx((1 / 3 + 0) / 2)
    assert never_predicted["f1_macro"] == pytest.approx((2 * (1 / 3) * 1 / (1 / 3 + 1)) / 2)
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        t, p = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
        m = fd_eval.classification_metrics(t, p)
        assert m["accuracy"] == pytest.approx(sk.accuracy_score(t, p))
        for ours, theirs in (("precision_macro", sk.precision_score), ("recall_macro", sk.recall_score),
                             ("f1_macro", sk.f1_score)):  # fmt: skip
            assert m[ours] == pytest.approx(theirs(t, p, average="macro", zero_division=0))


def test_latency_has_warmup_and_repeats(monkeypatch):
    model = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=16))  # fmt: skip
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    r = fd_eval.measure_latency(model, 50, batch_size=2, seq_len=8, device="cpu", warmup=2, repeats=5)
    assert len(calls) == 7 and len(r["timings_ms"]) == 5 and r["warmup"] == 2
    assert r["latency_ms"] == pytest.approx(sorted(r["timings_ms"])[2])  # the median of the timed repeats
    assert r["tokens_per_s"] == pytest.approx(16 / (r["latency_ms"] / 1e3))


def test_masking_is_deterministic_and_skips_special_tokens():
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 3], [2, 20, 21, 3, 0, 0, 0, 0, 0, 0]])
    batch = fd_data.Batch(ids, (ids != 0).long())
    a = fd_heldout.mask_tokens(batch, [0, 1, 2, 3, 4], 4, torch.Generator().manual_seed(1))
    b = fd_heldout.mask_tokens(batch, [0, 1, 2, 3, 4], 4, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    masked, labels = a
    sel = labels != -100
    assert int(sel.sum()) == round(0.15 * 10)  # 10 real non-special tokens
    assert torch.all(masked[sel] == 4) and torch.equal(labels[sel], ids[sel])
    assert not torch.isin(ids[sel], torch.tensor([0, 1, 2, 3, 4])).any()


def test_text_metrics_by_hand(workdir):
    teacher, student = fd_eval.load_model(str(workdir / "teacher")), fd_eval.load_model(str(workdir / "student2"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 12), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    ids[2, 8:] = 0
    masked, labels = fd_heldout.mask_tokens(fd_data.Batch(ids, mask), [0, 1, 2, 3, 4], 4, g, prop=0.3)
    got = fd_eval.text_metrics(student, teacher, [fd_heldout.HeldoutBatch(ids, mask, masked, labels)], "cpu")
    with torch.no_grad():
        sel = labels != -100
        s = student.model(input_ids=masked, attention_mask=mask).logits[sel]
        t = teacher.model(input_ids=masked, attention_mask=mask).logits[sel]
        p, log_p, log_q = t.softmax(-1), t.log_softmax(-1), s.log_softmax(-1)
        ce = -log_q[torch.arange(len(s)), labels[sel]].mean()
        kl = (p * (log_p - log_q)).sum(-1).mean()
        hs = student.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ht = teacher.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        cos = [
            F.cosine_similarity(hs[i][mask[i].bool()].mean(0), ht[i][mask[i].bool()].mean(0), dim=0) for i in range(3)
        ]
    assert got["mlm_loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert got["mlm_top1"] == pytest.approx((s.argmax(-1) == labels[sel]).float().mean().item())
    assert got["kl_to_teacher"] == pytest.approx(kl.item(), rel=1e-4)
    assert got["embedding_cosine"] == pytest.approx(torch.stack(cos).mean().item(), rel=1e-5)
    same = fd_eval.text_metrics(teacher, teacher, [fd_heldout.HeldoutBatch(ids, mask, masked, labels)], "cpu")
    assert "kl_to_teacher" not in same and same["embedding_cosine"] == pytest.approx(1.0)
    assert same["pairwise_spearman"] == pytest.approx(1.0) and -1 <= got["pairwise_spearman"] <= 1


def test_retention_and_speedup_are_relative_to_the_teacher():
    rows = [
        {"name": "t", "latency_ms": 10.0, "disk_mb": 100.0, "accuracy": 0.8, "f1_macro": 0.5, "mlm_top1": 0.4},
        {"name": "s", "latency_ms": 4.0, "disk_mb": 60.0, "accuracy": 0.6, "f1_macro": 0.45, "mlm_top1": None},
    ]
    fd_eval.add_relative(rows)
    assert rows[0]["retention_accuracy"] == 100.0 and rows[0]["speedup"] == 1.0
    assert rows[1]["retention_accuracy"] == pytest.approx(75.0) and rows[1]["retention_f1_macro"] == pytest.approx(90.0)
    assert rows[1]["speedup"] == pytest.approx(2.5) and rows[1]["size_ratio"] == pytest.approx(0.6)
    assert "retention_mlm_top1" not in rows[1]


# ---------------------------------------------------------------------------------------------------------
# The command end to end


def test_evaluate_mlm_students_end_to_end(workdir, capsys):
    out = workdir / "report-mlm"
    argv = ["--teacher", str(workdir / "teacher"), "--students", str(workdir / "student2"), str(workdir / "student1"),
            "--labelled", str(workdir / "labelled.csv"), "--finetune_epochs", "1", "--out", str(out)]  # fmt: skip
    assert fd_eval.main(argv + _common(workdir)) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["role"] for r in rows] == ["teacher", "student", "student"]
    t, s2, s1 = rows
    assert t["params_m"] > s2["params_m"] > s1["params_m"] and t["disk_mb"] > s2["disk_mb"] > s1["disk_mb"]
    for r in rows:
        for k in ("latency_ms", "mlm_loss", "perplexity", "mlm_top1", "embedding_cosine", "accuracy", "f1_macro"):
            assert math.isfinite(r[k]), (r["name"], k)
        assert r["retention_accuracy"] == pytest.approx(100 * r["accuracy"] / t["accuracy"])
    assert t["retention_accuracy"] == 100.0 and "kl_to_teacher" not in t and s1["kl_to_teacher"] > 0
    assert (out / "retention.png").stat().st_size > 1000 and "| teacher:" in (out / "report.md").read_text()
    assert "F1 (macro)" in capsys.readouterr().out


def test_evaluate_encoder_student_with_probe(workdir):
    """The default training job's kind of model: an encoder without an MLM head; a linear probe."""
    out = workdir / "report-encoder"
    argv = ["--teacher", str(workdir / "encoder-teacher"), "--students", str(workdir / "encoder-student"),
            "--labelled", str(workdir / "labelled.csv"), "--probe", "--out", str(out)]  # fmt: skip
    assert fd_eval.main(argv + _common(workdir)) == 0
    t, s = json.loads((out / "report.json").read_text())["rows"]
    assert "mlm_loss" not in s and 0 < s["embedding_cosine"] <= 1 and t["embedding_cosine"] == pytest.approx(1.0)
    assert t["accuracy"] > 0.8  # the two classes use disjoint words: a probe separates them
    assert not (out / "retention.png").exists()  # one student: no plot


def _labelled(workdir, name, text):
    path = workdir / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "content, name, message",
    [
        ("text,label\n", "empty.csv", "empty"),
        ("words,label\na b,x\nc d,y\n", "nocol.csv", "no column 'text'"),
        ("text,label\na b,x\nc d,x\n", "oneclass.csv", "two classes"),
        ('{"text": "a b", "label": 0.5}\n{"text": "c d", "label": 1.5}\n', "floats.jsonl", "integers or all strings"),
    ],
)
def test_bad_labelled_sets_are_one_line_errors(workdir, capsys, content, name, message):
    argv = ["--teacher", str(workdir / "teacher"), "--students", str(workdir / "student1"), "--data", "",
            "--labelled", _labelled(workdir, name, content), "--out", str(workdir / "bad")]  # fmt: skip
    assert fd_eval.main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err


def test_tokenizer_mismatch_is_an_error(workdir, capsys):
    other = workdir / "other-tokenizer"
    tok = transformers.BertTokenizerFast(
        vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x"])}
    )
    fd_models.save_student(fd_eval.load_model(str(workdir / "student1")).model, tok, other)
    argv = ["--teacher", str(workdir / "teacher"), "--students", str(other), "--data", "", "--quiet"]
    assert fd_eval.main(argv) == 2
    assert "tokenizer differs from the teacher's" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--seq_len", "--max_seq_len"])
def test_lengths_beyond_the_teachers_positions_are_one_line_errors(workdir, capsys, flag):
    argv = ["--teacher", str(workdir / "teacher"), "--students", str(workdir / "student1"),
            *_common(workdir, flag, "65"), "--out", str(workdir / "too-long")]  # fmt: skip
    assert fd_eval.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {flag} 65: the teacher {workdir / 'teacher'} takes at most 64 positions", err
    assert not (workdir / "too-long").exists()


# ---------------------------------------------------------------------------------------------------------
# Compression


def _forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_magnitude_pruning_reaches_the_sparsity_and_stays_plain_transformers(workdir):
    out = workdir / "sparse"
    argv = ["--model", str(workdir / "student2"), "--method", "magnitude", "--sparsity", "0.6", "--out", str(out)]
    assert fd_compress.main(argv + _common(workdir)) == 0
    model = transformers.BertForMaskedLM.from_pretrained(out)  # plain transformers
    weights = [m.weight for m in model.bert.encoder.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=0.01)
    assert (
        torch.count_nonzero(model.bert.embeddings.word_embeddings.weight)
        > 0.99 * model.bert.embeddings.word_embeddings.weight.numel()
    )
    before, after = json.loads((out / "compression-report" / "report.json").read_text())["rows"]
    assert (before["role"], after["role"]) == ("before", "after")
    assert after["nonzero_params_m"] < 0.9 * before["params_m"]


def test_head_pruning_equals_zeroing_the_removed_heads(workdir):
    out = workdir / "heads"
    argv = ["--model", str(workdir / "student2"), "--method", "heads", "--sparsity", "0.5", "--out", str(out)]
    assert fd_compress.main(argv + _common(workdir)) == 0
    pruned = fd_compress.load(str(out))
    meta = json.loads((out / fd_compress.MARKER).read_text())
    assert meta["format"] == "pruned-heads" and sum(map(len, meta["heads_kept"])) == 4  # 8 heads, half removed
    original = fd_eval.load_model(str(workdir / "student2")).model
    d = 32 // 4
    with torch.no_grad():  # removing a head = zeroing its columns of the output projection
        for layer, kept in zip(original.bert.encoder.layer, meta["heads_kept"]):
            for h in set(range(4)) - set(kept):
                layer.attention.output.dense.weight[:, h * d : (h + 1) * d] = 0
    ids = torch.randint(5, 60, (2, 10))
    torch.testing.assert_close(_forward(pruned.model, ids), _forward(original, ids), atol=1e-5, rtol=1e-5)
    assert fd_eval.count_parameters(pruned.model)[0] < fd_eval.count_parameters(original)[0]


def test_int8_quantization_loads_and_runs_close_to_float(workdir):
    out = workdir / "int8"
    argv = ["--model", str(workdir / "student2"), "--method", "int8", "--out", str(out),
            "--labelled", str(workdir / "labelled.csv")]  # fmt: skip
    assert fd_compress.main(argv + _common(workdir)) == 0
    q = fd_compress.load(str(out))
    assert not q.trainable and q.format == "int8"
    assert any(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in q.model.modules())
    ref = fd_eval.load_model(str(workdir / "student2")).model
    ids = torch.randint(5, 60, (2, 10))
    a, b = _forward(q.model, ids), _forward(ref, ids)
    assert not torch.equal(a, b) and F.cosine_similarity(a, b, dim=-1).min() > 0.98  # int8 weights: close, not equal
    torch.testing.assert_close(_forward(fd_compress.load(str(out)).model, ids), a)  # the saved model is that model
    before, after = json.loads((out / "compression-report" / "report.json").read_text())["rows"]
    assert "accuracy" in after and after["retention_accuracy"] == pytest.approx(
        100 * after["accuracy"] / before["accuracy"]
    )


def test_compress_bad_flags(workdir, capsys):
    base = ["--model", str(workdir / "student1"), "--quiet", "--data", ""]
    assert fd_compress.main(base + ["--method", "heads", "--sparsity", "1.5", "--out", str(workdir / "x")]) == 2
    assert "--sparsity" in capsys.readouterr().err
    assert fd_compress.main(base + ["--method", "int8", "--out", str(workdir / "student1")]) == 2
    assert "--out must differ" in capsys.readouterr().err


def test_builtin_labelled_set():
    texts, labels = fd_data.builtin_labelled(per_class=20, seed=1)
    assert len(texts) == 160 and sorted(set(labels)) == sorted(
        ["Acts", "Apocalyptic", "Epistles", "Gospels", "History", "Law", "Prophets", "Wisdom"]
    )
    assert fd_data.builtin_labelled(per_class=20, seed=1) == (texts, labels) and all("{" not in t for t in texts)



def _pair_sims(x):
    """Cosine similarity of every pair of rows (i < j), the quantity pairwise_spearman ranks."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    return (x @ x.T)[i, j].numpy()


def test_pairwise_spearman_against_scipy_and_across_widths():
    from scipy.stats import spearmanr

    from fastdistil.heldout import pairwise_spearman

    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 16, generator=g)
    narrow = a[:, :8] + 0.3 * torch.randn(40, 8, generator=g)  # another width, related embeddings
    expected = spearmanr(_pair_sims(a), _pair_sims(narrow)).statistic
    assert 0.2 < expected < 0.99
    assert pairwise_spearman(a, narrow) == pytest.approx(expected, abs=1e-9)
    assert pairwise_spearman(a, 3 * a) == pytest.approx(1.0)  # the same similarities
    ties = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # tied similarities share a rank
    assert pairwise_spearman(ties, a[:4]) == pytest.approx(spearmanr(_pair_sims(ties), _pair_sims(a[:4])).statistic)
    assert pairwise_spearman(a[:2], a[:2]) is None  # one pair: no ranking
