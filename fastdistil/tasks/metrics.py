"""Task metrics, with the conventions users compare against:

- classification: accuracy and macro precision / recall / F1 over the classes present in the gold labels or the
  predictions (a class never predicted has precision 0: scikit-learn's zero_division=0);
- token classification: entity-level micro precision / recall / F1 over IOB2 spans, as seqeval's default
  (conlleval) mode reads them: an entity starts at B-X, or at I-X after O or after another type, and runs over the
  following I-X; an entity counts as found only with the same type, start and end;
- question answering: exact match and token F1 of SQuAD v1.1's evaluation script (lower case, punctuation and the
  articles a / an / the removed, whitespace collapsed; the best over the gold answers), as fractions in [0, 1].
"""

from __future__ import annotations

import collections
import re
import string

import numpy as np

from fastdistil.errors import UsageError


def classification_metrics(y_true, y_pred) -> dict:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        raise UsageError("no examples to score")
    p, r, f = [], [], []
    for k in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == k) & (y_true == k))
        fp = np.sum((y_pred == k) & (y_true != k))
        fn = np.sum((y_pred != k) & (y_true == k))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        p.append(prec)
        r.append(rec)
        f.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {"accuracy": float(np.mean(y_true == y_pred)), "precision_macro": float(np.mean(p)),
            "recall_macro": float(np.mean(r)), "f1_macro": float(np.mean(f))}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Entities


def iob2_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """The entities of one tag sequence as (type, first token, last token)."""
    spans, kind, start = set(), None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, typ = tag.partition("-") if tag != "O" else ("O", "", "")
        continues = prefix == "I" and typ == kind
        if kind is not None and not continues:
            spans.add((kind, start, i - 1))
            kind = None
        if prefix == "B" or (prefix == "I" and not continues):
            kind, start = typ, i
    return spans


def entity_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    if not gold:
        raise UsageError("no sentences to score")
    n_gold = n_pred = n_hit = 0
    for g, p in zip(gold, predicted, strict=True):
        gs, ps = iob2_spans(g), iob2_spans(p)
        n_gold, n_pred, n_hit = n_gold + len(gs), n_pred + len(ps), n_hit + len(gs & ps)
    precision = n_hit / n_pred if n_pred else 0.0
    recall = n_hit / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    tokens = [(a == b) for g, p in zip(gold, predicted) for a, b in zip(g, p)]
    return {"precision": precision, "recall": recall, "f1": f1, "token_accuracy": float(np.mean(tokens))}


# ---------------------------------------------------------------------------------------------------------
# Answers


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], gold_answers: list[list[str]]) -> dict:
    if not predictions:
        raise UsageError("no questions to score")
    pairs = list(zip(predictions, gold_answers, strict=True))
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs) for p, gs in pairs]
    f1 = [max(answer_f1(p, g) for g in gs) for p, gs in pairs]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}


def best_spans(start_logits: list, end_logits: list, offsets: list, examples: list, contexts: list,
               max_answer_tokens: int = 30) -> list[str]:  # fmt: skip
    """The answer text of each example: over all its windows, the context span (start <= end, at most
    max_answer_tokens) with the highest start + end logit."""
    best: dict[int, tuple[float, str]] = {}
    for s, e, off, ex in zip(start_logits, end_logits, offsets, examples):
        ctx = [i for i, o in enumerate(off) if o is not None]
        if not ctx:
            continue
        s, e = np.asarray(s, dtype=np.float64), np.asarray(e, dtype=np.float64)
        starts = sorted(ctx, key=lambda i: -s[i])[:20]
        ends = sorted(ctx, key=lambda i: -e[i])[:20]
        for i in starts:
            for j in ends:
                if i <= j < i + max_answer_tokens and (ex not in best or s[i] + e[j] > best[ex][0]):
                    best[ex] = (s[i] + e[j], contexts[ex][off[i][0] : off[j][1]])
    return [best.get(ex, (0.0, ""))[1] for ex in range(len(contexts))]
