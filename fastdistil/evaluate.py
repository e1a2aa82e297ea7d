"""python -m fastdistil.evaluate: what each student keeps of its teacher, and what it saves.

    python -m fastdistil.evaluate --teacher builtin:all-MiniLM-L6-v2 --students fastdistil-run/student
    python -m fastdistil.evaluate --teacher bert-dir --students s1 s2 --labelled reviews.csv --finetune_epochs 3

For the teacher and every student, side by side:
- parameters (and non-zero parameters) and the size of the weight files on disk;
- inference latency of the encoder at --batch_size x --seq_len on --device (warm-up, then the median of
  --repeats timed forwards, the models taking turns) and throughput in tokens/s;
- on held-out text (--data, the same held-out split the trainer uses by default): for models with an MLM head,
  masked-token loss, perplexity, top-1 accuracy (15% of the real tokens replaced by [MASK], the same positions
  for every model) and the student-teacher KL(teacher || student) on those positions; for every model the mean
  cosine between its mean-pooled sentence embedding and the teacher's;
- on a labelled classification set (--labelled: CSV / TSV / JSON lines with --text_column and --label_column,
  or a `datasets` name): accuracy and macro precision, recall and F1 of a classifier on mean-pooled embeddings,
  fine-tuned with the encoder (--finetune_epochs, fixed seed) or a linear probe on frozen embeddings (--probe);
- retention: a student's score as a percentage of the teacher's; speed-up and size against the teacher.
It prints the table and writes report.json, report.md and (with several students) retention.png to --out.
Models may be transformers checkpoints or the directories fastdistil.compress writes.

Task models (fastdistil.train --task) instead, on a labelled test set in train's formats:

    python -m fastdistil.evaluate --task sequence-classification --teacher run/teacher --students run/student \
        --test_data test.csv

teacher, every student and the label-only baseline (--label_only, or <run>/label-only-student beside
<run>/student) side by side: accuracy and macro precision / recall / F1 (classification), entity-level
precision / recall / F1 with seqeval's IOB2 conventions (NER), exact match and token F1 with SQuAD's answer
normalisation (QA); retention against the teacher, parameters, size, examples/s and speed-up.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastdistil import data as fd_data
from fastdistil import heldout
from fastdistil import models as fd_models
from fastdistil.artifacts import Model, load_model  # noqa: F401  (load_model: the CLI's loader)
from fastdistil.config import device_name
from fastdistil.errors import EXIT_USAGE, UsageError
from fastdistil.fileio import atomic_write, check_destination
from fastdistil.models import encoder
from fastdistil.padding import mean_pool
from fastdistil.tasks import TASKS
from fastdistil.tasks import evaluation as task_evaluation
from fastdistil.tasks.data import read_records
from fastdistil.tasks.metrics import classification_metrics

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class EvalError(UsageError):
    """Bad input to the evaluation (one line, exit code 2)."""


# ---------------------------------------------------------------------------------------------------------
# Models


def check_same_tokenizer(teacher: Model, student: Model) -> None:
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise EvalError(
            f"{student.name}: its tokenizer differs from the teacher's ({len(student.tokenizer)} vs "
            f"{len(teacher.tokenizer)} tokens); students must share the teacher's vocabulary"
        )


def disk_bytes(path: str) -> int:
    """Bytes of the weight files in a model directory."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.iterdir() if f.is_file()]
    return sum(f.stat().st_size for f in files if f.name.endswith(WEIGHT_SUFFIXES))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), each tensor once (tied weights count once), int8 packed weights
    included."""
    seen, total, nonzero = set(), 0, 0
    tensors = list(model.parameters())
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if callable(weight) and hasattr(m, "_packed_params"):  # dynamically quantized Linear
            w = weight()
            tensors.append(w.dequantize() if w.is_quantized else w)
            if m.bias() is not None:
                tensors.append(m.bias())
    for t in tensors:
        key = (t.data_ptr(), t.numel()) if not t.is_quantized else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel()
        nonzero += int(torch.count_nonzero(t))
    return total, nonzero


# ---------------------------------------------------------------------------------------------------------
# Latency


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latencies(
    models: list[torch.nn.Module], vocab_size: int, batch_size: int, seq_len: int, device, warmup=3, repeats=10
) -> list[dict]:
    """Per model, the median wall time of its encoder's forward on one full (batch_size, seq_len) batch of random
    tokens, after `warmup` untimed forwards. The timed forwards of the models alternate (model 1, 2, ..., 1, 2,
    ...), so that a machine that speeds up or slows down during the run affects every model alike."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    encoders = [encoder(m).eval() for m in models]
    for enc in encoders:
        for _ in range(warmup):
            enc(input_ids=ids, attention_mask=mask)
    sync(device)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for enc, t in zip(encoders, times):
            t0 = time.perf_counter()
            enc(input_ids=ids, attention_mask=mask)
            sync(device)
            t.append(time.perf_counter() - t0)
    out = []
    for t in times:
        median = statistics.median(t)
        out.append(
            {
                "latency_ms": median * 1e3,
                "tokens_per_s": batch_size * seq_len / median,
                "sequences_per_s": batch_size / median,
                "timings_ms": [x * 1e3 for x in t],
                "warmup": warmup,
            }
        )
    return out


def measure_latency(model, vocab_size, batch_size, seq_len, device, warmup=3, repeats=10) -> dict:
    return measure_latencies([model], vocab_size, batch_size, seq_len, device, warmup, repeats)[0]


# ---------------------------------------------------------------------------------------------------------
# Held-out text: MLM metrics and embedding cosine


def heldout_batches(spec: str, tokenizer, c) -> list[heldout.HeldoutBatch]:
    """Batches of the held-out sequences of `spec`: the trainer's split for the same --data / --max_seq_len /
    --min_seq_len / --eval_fraction / --seed, at most --max_sequences, masked as fastdistil.heldout defines."""
    cache = Path(c.cache_dir or os.environ.get("FASTDISTIL_CACHE") or Path.home() / ".cache" / "fastdistil")
    seqs = fd_data.build_sequences(spec, tokenizer, c.max_seq_len, c.min_seq_len, cache, c.num_proc or os.cpu_count())
    _, eval_idx = fd_data.split_train_eval(len(seqs), c.eval_fraction, c.seed)
    return heldout.heldout_batches(seqs, eval_idx[: c.max_sequences], tokenizer, c.eval_batch_size, c.seed)


def text_metrics(m: Model, teacher: Model, batches, device) -> dict:
    """MLM loss / perplexity / top-1 / KL(teacher || student) on the masked positions (models with an MLM head),
    and the cosines of the (unmasked) text's embeddings to the teacher's: fastdistil.heldout.compare."""
    return heldout.compare(
        m.model, teacher.model, batches, device, model_mlm=m.has_mlm_head, teacher_mlm=teacher.has_mlm_head
    )


# ---------------------------------------------------------------------------------------------------------
# Labelled classification set


@dataclass
class Labelled:
    texts: list[str]
    labels: np.ndarray  # int64 class indices
    classes: list  # the original label values, in index order
    train_idx: np.ndarray
    test_idx: np.ndarray


def read_labelled(spec: str, text_column: str, label_column: str, test_fraction: float, seed: int) -> Labelled:
    """A labelled set from CSV / TSV / JSON lines (or a `datasets` name), split into train / test (stratified by
    class, deterministic). Labels must be all integers or all strings, with at least two classes."""
    if spec == fd_data.BUILTIN_LABELLED:
        texts, labels = fd_data.builtin_labelled(seed=seed)
        return make_labelled(texts, labels, spec, test_fraction, seed)
    rows = read_records(spec, "--labelled")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise EvalError(f"--labelled {spec}: no column {missing[0]!r} (columns: {sorted(rows[0])}); "
                        "see --text_column / --label_column")  # fmt: skip
    texts, raw = [r[text_column] for r in rows], [r[label_column] for r in rows]
    bad_text = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()), None)
    if bad_text is not None:
        raise EvalError(f"--labelled {spec}: row {bad_text + 1} has no text in column {text_column!r}")
    return make_labelled(texts, raw, spec, test_fraction, seed)


def make_labelled(texts, raw_labels, what: str, test_fraction: float, seed: int) -> Labelled:
    if len(texts) == 0:
        raise EvalError(f"{what}: the set is empty")
    kinds = {type(v) for v in raw_labels}
    if kinds <= {int, np.int64} and bool not in kinds:
        pass
    elif kinds != {str}:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise EvalError(f"{what}: labels must be all integers or all strings, got {names}")
    classes = sorted(set(raw_labels))
    if len(classes) < 2:
        raise EvalError(f"{what}: every example has the label {classes[0]!r}; a classification set needs two classes")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[v] for v in raw_labels], dtype=np.int64)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in range(len(classes)):  # stratified: each class split in the same proportion, at least one each side
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1) if len(idx) > 1 else 0
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    if not test:
        raise EvalError(f"{what}: too few examples to hold any out for testing")
    return Labelled(list(texts), labels, classes, np.sort(train), np.sort(test))


def _encode(tokenizer, texts, max_len):
    return tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")


def _embed(enc, tokenizer, texts, max_len, batch_size, device) -> torch.Tensor:
    out = []
    for s in range(0, len(texts), batch_size):
        b = _encode(tokenizer, texts[s : s + batch_size], max_len).to(device)
        h = enc(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        out.append(mean_pool(h.float(), b["attention_mask"]))
    return torch.cat(out)


def classify(m: Model, data: Labelled, c, device) -> dict:
    """Train a classifier on data.train_idx and score it on data.test_idx: a linear probe on frozen mean-pooled
    embeddings (c.probe), or the encoder fine-tuned with a linear head on them (c.finetune_epochs)."""
    torch.manual_seed(c.seed)
    g = torch.Generator().manual_seed(c.seed)
    n_classes = len(data.classes)
    train_texts = [data.texts[i] for i in data.train_idx]
    test_texts = [data.texts[i] for i in data.test_idx]
    y_train = torch.as_tensor(data.labels[data.train_idx])
    width = fd_models.hidden_size(m.model)
    head = torch.nn.Linear(width, n_classes).to(device)
    if c.probe:
        enc = encoder(m.model).eval()
        with torch.no_grad():
            x_train = _embed(enc, m.tokenizer, train_texts, c.max_seq_len, c.eval_batch_size, device)
            x_test = _embed(enc, m.tokenizer, test_texts, c.max_seq_len, c.eval_batch_size, device)
        mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # standardised features: one lr fits all models
        x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
        opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
        y = y_train.to(device)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(head(x_train), y) + 1e-3 * head.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            pred = head(x_test).argmax(-1).cpu().numpy()
    else:
        if not m.trainable:
            raise EvalError(f"{m.name}: a {m.format} model cannot be fine-tuned; use --probe")
        enc = copy.deepcopy(encoder(m.model)).to(device).train()
        for p in enc.parameters():
            p.requires_grad_(True)
        params = list(enc.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=c.finetune_lr)
        from tqdm.auto import tqdm

        steps = c.finetune_epochs * math.ceil(len(train_texts) / c.finetune_batch_size)
        bar = tqdm(total=steps, desc=f"fine-tuning {m.name}", leave=False, disable=not c.progress)
        for _ in range(c.finetune_epochs):
            order = torch.randperm(len(train_texts), generator=g).tolist()
            for s in range(0, len(order), c.finetune_batch_size):
                idx = order[s : s + c.finetune_batch_size]
                b = _encode(m.tokenizer, [train_texts[i] for i in idx], c.max_seq_len).to(device)
                h = enc(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                loss = F.cross_entropy(
                    head(mean_pool(h.float(), b["attention_mask"])), y_train[idx].to(device)
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update()
        bar.close()
        enc.eval()
        with torch.no_grad():
            pred = head(_embed(enc, m.tokenizer, test_texts, c.max_seq_len, c.eval_batch_size, device)).argmax(-1)
            pred = pred.cpu().numpy()
    return classification_metrics(data.labels[data.test_idx], pred)


# ---------------------------------------------------------------------------------------------------------
# The report

RETAINED = ("mlm_top1", "accuracy", "f1_macro")  # higher is better: student / teacher
COLUMNS = [  # (key, header, format)
    ("params_m", "params (M)", "{:.2f}"),
    ("nonzero_params_m", "non-zero (M)", "{:.2f}"),
    ("disk_mb", "disk (MB)", "{:.1f}"),
    ("latency_ms", "latency (ms)", "{:.1f}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("mlm_loss", "MLM loss", "{:.3f}"),
    ("perplexity", "perplexity", "{:.1f}"),
    ("mlm_top1", "MLM top-1", "{:.3f}"),
    ("kl_to_teacher", "KL to teacher", "{:.3f}"),
    ("embedding_cosine", "cos to teacher", "{:.3f}"),
    ("pairwise_spearman", "pair-sim Spearman", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("precision_macro", "precision", "{:.3f}"),
    ("recall_macro", "recall", "{:.3f}"),
    ("f1_macro", "F1 (macro)", "{:.3f}"),
    ("retention_mlm_top1", "MLM top-1 kept", "{:.1f}%"),
    ("retention_accuracy", "accuracy kept", "{:.1f}%"),
    ("retention_f1_macro", "F1 kept", "{:.1f}%"),
]


def add_relative(rows: list[dict]) -> None:
    """Speed-up, size ratio and retention of every row against the first (the teacher)."""
    ref = rows[0]
    for r in rows:
        r["speedup"] = ref["latency_ms"] / r["latency_ms"] if "latency_ms" in r else None
        r["size_ratio"] = r["disk_mb"] / ref["disk_mb"] if ref.get("disk_mb") else None
        for k in RETAINED:
            if r.get(k) is not None and ref.get(k):
                r[f"retention_{k}"] = 100.0 * r[k] / ref[k]


def markdown_table(rows: list[dict]) -> str:
    cols = [(k, h, f) for k, h, f in COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = ["| model | " + " | ".join(h for _, h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = [f.format(r[k]) if r.get(k) is not None else "" for k, _, f in cols]
        lines.append(f"| {r['role']}: {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> str | None:
    """retention against speed-up and against size, one point per student. Returns the metric plotted."""
    metric = next((k for k in ("retention_f1_macro", "retention_mlm_top1") if all(k in r for r in rows[1:])), None)
    if metric is None and all("embedding_cosine" in r for r in rows[1:]):
        metric = "embedding_cosine"
    if metric is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ylabel = "cosine to the teacher" if metric == "embedding_cosine" else f"{metric[len('retention_') :]} retained (%)"
    for ax, x, xlabel in ((axes[0], "speedup", "speed-up over the teacher"), (axes[1], "size_ratio", "size / teacher")):
        for r in rows[1:]:
            ax.scatter(r[x], r[metric])
            ax.annotate(Path(r["name"]).name or r["name"], (r[x], r[metric]), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(f"students against {rows[0]['name']}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return metric


def quiet_libraries() -> None:
    """--quiet: no progress bars from datasets and transformers either."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def run(c, roles=("teacher", "student")) -> list[dict]:
    """Evaluate c.teacher and c.students; returns the rows (teacher first) and writes the report files. `roles`
    names the reference and the others in the table (fastdistil.compress: "before", "after")."""
    device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = print if c.progress else (lambda *a, **k: None)
    if not c.progress:
        quiet_libraries()
    labelled = None
    if c.labelled:  # first: a bad set fails before any model loads
        labelled = read_labelled(c.labelled, c.text_column, c.label_column, c.test_fraction, c.seed)
    teacher = load_model(c.teacher)
    students = [load_model(s) for s in c.students]
    for s in students:
        check_same_tokenizer(teacher, s)
        if s.format == "int8" and device.type != "cpu":
            raise EvalError(f"{s.name}: dynamically quantized int8 models run on the CPU only; use --device cpu")
    check_positions(teacher, c)  # before the held-out text is tokenised and any model runs
    batches = heldout_batches(c.data, teacher.tokenizer, c) if c.data else []
    for m in (teacher, *students):
        m.model.to(device).eval()
    rows = []
    for role, m in [(roles[0], teacher)] + [(roles[1], s) for s in students]:
        say(f"evaluating {role} {m.name}", flush=True)
        total, nonzero = count_parameters(m.model)
        row = {"role": role, "name": m.name, "format": m.format, "params_m": total / 1e6}
        # shown when pruning made a difference (a few weights are exactly 0 in any model: biases, padding rows)
        row["nonzero_params_m"] = nonzero / 1e6 if nonzero < 0.995 * total else None
        row["disk_mb"] = disk_bytes(m.path) / 2**20
        if batches:
            row.update(text_metrics(m, teacher, batches, device))
        if labelled is not None:
            row.update(classify(m, labelled, c, device))
        rows.append(row)
    say("timing the forward passes", flush=True)
    models = [teacher, *students]
    timings = measure_latencies(
        [m.model for m in models], len(teacher.tokenizer), c.batch_size, c.seq_len, device, c.warmup, c.repeats
    )
    for row, t in zip(rows, timings):
        row.update(t)
    add_relative(rows)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    n_heldout = sum(b.input_ids.shape[0] for b in batches)
    setup = (
        f"device {device}, latency at batch {c.batch_size} x {c.seq_len} tokens (median of {c.repeats} after "
        f"{c.warmup} warm-up), held-out text {c.data or 'none'} ({n_heldout} sequences)"
        + (
            f", labelled {c.labelled} ({len(labelled.train_idx)} train / {len(labelled.test_idx)} test, "
            + ("linear probe" if c.probe else f"fine-tuned {c.finetune_epochs} epochs")
            + ")"
            if labelled
            else ""
        )
    )
    plotted = plot(rows, out / "retention.png") if len(students) > 1 else None
    atomic_write(out / "report.json", json.dumps({"setup": setup, "rows": rows}, indent=1))
    atomic_write(
        out / "report.md",
        f"{table}\n\n{setup}\n" + (f"\n![retention](retention.png)  ({plotted})\n" if plotted else ""),
    )
    print(table)
    print(f"\n{setup}\nwritten: {out / 'report.md'}, {out / 'report.json'}" + (", retention.png" if plotted else ""))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Command line


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared with fastdistil.compress (which evaluates before and after)."""
    g = p.add_argument_group("held-out text")
    g.add_argument(
        "--data",
        default=fd_data.BUILTIN_CORPUS,
        help="text for MLM metrics and embedding cosine: a file, a directory, builtin:web-bible or a datasets "
        "name; '' to skip (default %(default)s)",
    )
    g.add_argument("--max_seq_len", type=int, default=128, help="tokens per held-out sequence (default %(default)s)")
    g.add_argument("--min_seq_len", type=int, default=12, help="(default %(default)s, as the trainer)")
    g.add_argument(
        "--eval_fraction", type=float, default=0.02, help="held-out share, as the trainer's (default %(default)s)"
    )
    g.add_argument(
        "--max_sequences", type=int, default=256, help="at most this many held-out sequences (default %(default)s)"
    )
    g.add_argument("--eval_batch_size", type=int, default=16, help="(default %(default)s)")
    g.add_argument("--cache_dir", help="tokenised-data cache (default: $FASTDISTIL_CACHE or ~/.cache/fastdistil)")
    g.add_argument("--num_proc", type=int, help="tokenisation processes (default: CPU count)")
    g = p.add_argument_group("labelled set")
    g.add_argument(
        "--labelled",
        help="CSV / TSV / JSON-lines file (or a datasets name) of texts and class labels; "
        f"{fd_data.BUILTIN_LABELLED}: Bible verses labelled with their book's genre (8 classes, in the package)",
    )
    g.add_argument("--text_column", default="text", help="(default %(default)s)")
    g.add_argument("--label_column", default="label", help="(default %(default)s)")
    g.add_argument("--test_fraction", type=float, default=0.2, help="held-out share per class (default %(default)s)")
    g.add_argument("--probe", action="store_true", help="linear probe on frozen embeddings instead of fine-tuning")
    g.add_argument("--finetune_epochs", type=int, default=3, help="(default %(default)s)")
    g.add_argument("--finetune_lr", type=float, default=5e-5, help="(default %(default)s)")
    g.add_argument("--finetune_batch_size", type=int, default=16, help="(default %(default)s)")
    g = p.add_argument_group("task models (--task)")
    g.add_argument("--task", choices=TASKS, help="compare fine-tuned task models (teacher, --students and the "
                   "label-only baseline) on --test_data with the task's metrics instead")  # fmt: skip
    g.add_argument("--test_data", help="the labelled test set, in fastdistil.train --task's formats")
    g.add_argument("--text_pair_column", help="classification: column of the second text of a pair")
    g.add_argument("--doc_stride", type=int, default=32, help="QA: overlap of context windows (default %(default)s)")
    g.add_argument("--label_only", metavar="DIR", help="the label-only baseline (default: <run>/label-only-student "
                   "beside a student <run>/student)")  # fmt: skip
    g = p.add_argument_group("latency")
    g.add_argument("--batch_size", type=int, default=32, help="sequences per timed forward (default %(default)s)")
    g.add_argument("--seq_len", type=int, default=128, help="tokens per sequence (default %(default)s)")
    g.add_argument("--warmup", type=int, default=3, help="untimed forwards first (default %(default)s)")
    g.add_argument(
        "--repeats", type=int, default=10, help="timed forwards; the median is reported (default %(default)s)"
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    g.add_argument("--seed", type=int, default=56, help="masking, splits and fine-tuning (default %(default)s)")
    g.add_argument("--quiet", dest="progress", action="store_false", help="no progress output")


def check_positions(teacher: Model, c) -> None:
    for flag in ("seq_len", "max_seq_len"):
        fd_models.check_positions(teacher.model.config, getattr(c, flag), flag, who=f"the teacher {teacher.name}",
                                  error=EvalError)  # fmt: skip


def check_common(c) -> None:
    positive = ("max_seq_len", "max_sequences", "eval_batch_size", "finetune_epochs", "finetune_batch_size",
                "batch_size", "seq_len", "repeats")  # fmt: skip
    for k in positive:
        if getattr(c, k) < 1:
            raise EvalError(f"--{k} must be at least 1, got {getattr(c, k)}")
    if c.warmup < 0:
        raise EvalError(f"--warmup must be >= 0, got {c.warmup}")
    for k in ("eval_fraction", "test_fraction"):
        if not 0 < getattr(c, k) < 1:
            raise EvalError(f"--{k} must be in (0, 1), got {getattr(c, k)}")
    if not 3 <= c.max_seq_len <= 512 or not 1 <= c.seq_len <= 512:
        raise EvalError("--max_seq_len and --seq_len must be at most 512 (BERT's positions)")
    if not (math.isfinite(c.finetune_lr) and c.finetune_lr > 0):
        raise EvalError(f"--finetune_lr must be a finite number > 0, got {c.finetune_lr}")
    problem = device_name(c.device)  # the trainer's check of --device
    if problem:
        raise EvalError(f"--device {problem}, got {c.device!r}")
    if c.device is not None and c.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {c.device}: no CUDA device here")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastdistil.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", default=fd_models.BUILTIN_TEACHER, help="the reference model (default %(default)s)")
    p.add_argument("--students", nargs="+", required=True, metavar="DIR", help="student checkpoints to compare")
    p.add_argument("--out", default="fastdistil-eval", help="report directory (default %(default)s)")
    add_common_arguments(p)
    return p


def main(argv=None) -> int:
    c = build_parser().parse_args(argv)
    try:
        check_common(c)
        check_destination(c.out, "--out", marker="report.json", inputs=(c.teacher, *c.students))
        if c.task:
            task_evaluation.run_cli(c)
        else:
            run(c)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
