"""Task evaluation: the predictions of teacher, students and the label-only baseline on one labelled test set,
scored with fastdistil.tasks.metrics, beside their speed and size, as one table."""

from __future__ import annotations

import time

import numpy as np
import torch

from fastdistil.objectives.task_logits import model_inputs
from fastdistil.tasks import QUESTION_ANSWERING, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION
from fastdistil.tasks import metrics as task_metrics
from fastdistil.tasks.data import Features, TaskSet, collate
from fastdistil.tasks.models import label_ids
from fastdistil.trainer import to_device

HEADLINE = {SEQUENCE_CLASSIFICATION: ("accuracy", "f1_macro"), TOKEN_CLASSIFICATION: ("f1", "precision", "recall"),
            QUESTION_ANSWERING: ("exact_match", "f1")}  # fmt: skip


def _batches(features: Features, pad_id: int, batch_size: int):
    order = np.argsort(features.lengths, kind="stable")  # similar lengths together: little padding
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield idx, collate(features, idx, pad_id)


@torch.no_grad()
def predict(model, features: Features, pad_id: int, device, batch_size: int = 64) -> list:
    """The model's task logits of every feature row, in row order (numpy; QA: (start, end) pairs)."""
    model.eval()
    out: list = [None] * len(features)
    for idx, b in _batches(features, pad_id, batch_size):
        res = model(**model_inputs(b.input_ids.to(device), b.attention_mask.to(device), to_device(b.targets, device)))
        for j, i in enumerate(idx):
            n = int(b.attention_mask[j].sum())
            if features.task == QUESTION_ANSWERING:
                out[i] = (res.start_logits[j, :n].float().cpu().numpy(), res.end_logits[j, :n].float().cpu().numpy())
            elif features.task == TOKEN_CLASSIFICATION:
                out[i] = res.logits[j, :n].float().cpu().numpy()
            else:
                out[i] = res.logits[j].float().cpu().numpy()
    return out


def score(data: TaskSet, features: Features, logits: list, id2label: dict) -> dict:
    """The task's metrics of one model's logits against the gold labels of `data`."""
    if data.task == SEQUENCE_CLASSIFICATION:
        label2id = label_ids(id2label)
        gold = [label2id.get(str(lab), -1) for lab in data.labels]
        return task_metrics.classification_metrics(gold, [int(np.argmax(x)) for x in logits])
    if data.task == TOKEN_CLASSIFICATION:
        predicted = []
        for i, words in enumerate(data.inputs):
            tags = ["O"] * len(words)  # words cut off by max_seq_len are predicted O
            starts = features.columns["word_starts"][i]
            first_subwords = [p for p, s in enumerate(starts) if s]
            for w, p in enumerate(first_subwords):
                tags[w] = id2label[int(np.argmax(logits[i][p]))]
            predicted.append(tags)
        return task_metrics.entity_metrics(data.labels, predicted)
    contexts = [c for _, c, _ in data.inputs]
    answers = task_metrics.best_spans([s for s, _ in logits], [e for _, e in logits], features.offsets,
                                      features.example, contexts)  # fmt: skip
    return task_metrics.squad_metrics(answers, [lab["text"] for lab in data.labels])


TIMED_ROWS = 512  # the test rows every throughput pass runs (spread over all lengths)


def throughput(models: list, features: Features, pad_id: int, device, repeats: int = 3, batch_size: int = 32) -> list:
    """Examples per second of each model over (at most TIMED_ROWS of) the test features: one warm-up batch
    each, then `repeats` passes in which the models take turns batch by batch (a noisy neighbour slows them
    alike); the median pass of each."""
    batches = [b for _, b in _batches(features, pad_id, batch_size)]
    every = max(1, len(batches) * batch_size // TIMED_ROWS)
    batches = batches[::every]  # every k-th batch of the length-sorted order: short and long ones alike
    n_rows = sum(b.input_ids.shape[0] for b in batches)
    inputs = [model_inputs(b.input_ids.to(device), b.attention_mask.to(device), to_device(b.targets, device))
              for b in batches]  # the same inputs for every model  # fmt: skip
    totals = np.zeros((repeats, len(models)))
    with torch.no_grad():
        for k, m in enumerate(models):
            m.eval()
            m(**inputs[0])  # warm-up
        for r in range(repeats):
            for j in range(len(batches)):
                for k, m in enumerate(models):
                    t0 = time.perf_counter()
                    m(**inputs[j])
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    totals[r, k] += time.perf_counter() - t0
    return [n_rows / float(np.median(totals[:, k])) for k in range(len(models))]


def compare(arms: list[tuple[str, object]], data: TaskSet, features: Features, pad_id: int, device,
            repeats: int = 3) -> list[dict]:  # fmt: skip
    """One row per (role, model): its metrics, parameters, examples/s; the first arm is the teacher, and the
    others get their retention (metric as a share of the teacher's) and speed-up."""
    rows = []
    for role, model in arms:
        model.to(device)
        params = list(model.parameters())
        row = {"role": role, "params_m": sum(p.numel() for p in params) / 1e6,
               "size_mb": sum(p.numel() * p.element_size() for p in params) / 2**20}  # fmt: skip
        row.update(score(data, features, predict(model, features, pad_id, device), model.config.id2label))
        rows.append(row)
    for row, speed in zip(rows, throughput([m for _, m in arms], features, pad_id, device, repeats)):
        row["examples_per_s"] = speed
    teacher = rows[0]
    for row in rows[1:]:
        row["speedup"] = row["examples_per_s"] / teacher["examples_per_s"]
        for k in HEADLINE[data.task]:
            row[f"{k}_retention"] = row[k] / teacher[k] if teacher[k] else None
    return rows


def table(rows: list[dict], task: str) -> str:
    keys = HEADLINE[task]
    head = ["model", *keys, *(f"{k} kept" for k in keys[:2]), "params (M)", "size (MB)", "examples/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kept = [f"{r[f'{k}_retention']:.1%}" if r.get(f"{k}_retention") is not None else "" for k in keys[:2]]
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        cells = [r["role"], *(f"{r[k]:.4f}" for k in keys), *kept, f"{r['params_m']:.1f}", f"{r['size_mb']:.0f}",
                 f"{r['examples_per_s']:.0f}", speed]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# python -m fastdistil.evaluate --task ...


def label_only_beside(students: list[str]) -> str | None:
    """The label-only baseline a task run wrote next to its student (<run>/label-only-student), if any."""
    from pathlib import Path

    for s in students:
        candidate = Path(s).parent / "label-only-student"
        if Path(s).name == "student" and (candidate / "config.json").is_file():
            return str(candidate)
    return None


def run_cli(c) -> list[dict]:
    """Teacher, students and the label-only baseline on the labelled test set c.test_data; writes report.json
    and report.md to c.out."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from fastdistil.fileio import atomic_write
    from fastdistil.tasks import data as task_data
    from fastdistil.tasks import models as task_models

    if not c.test_data:
        raise task_data.DataError("--task needs --test_data (the labelled test set)")
    label_column = c.label_column if c.label_column != "label" or c.task == SEQUENCE_CLASSIFICATION else None
    fields = SimpleNamespace(text_column=c.text_column, text_pair_column=c.text_pair_column, label_column=label_column)
    test = task_data.read_task(c.task, c.test_data, fields, what="--test_data")
    teacher, tok = task_models.load(c.teacher, c.task)
    label2id = task_models.label2id(teacher.config)
    task_data.check_labels(test, label2id, "--test_data", c.teacher)
    arms = [("teacher", teacher)] + [(s, task_models.load(s, c.task, "--students")[0]) for s in c.students]
    baseline = c.label_only or label_only_beside(c.students)
    if baseline:
        arms.append(("label-only student", task_models.load(baseline, c.task, "--label_only")[0]))
    device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    features = task_data.encode(test, tok, label2id, c.max_seq_len, c.doc_stride)
    rows = compare(arms, test, features, tok.pad_token_id, device, repeats=3)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows, c.task)
    setup = f"{c.task} on {c.test_data} ({len(test)} examples), device {device}"
    atomic_write(out / "report.json", json.dumps({"setup": setup, "rows": rows}, indent=1))
    atomic_write(out / "report.md", f"{text}\n\n{setup}\n")
    print(f"{text}\n\n{setup}\nwritten: {out / 'report.md'}, {out / 'report.json'}")
    return rows
