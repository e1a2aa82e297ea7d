"""Labelled task data: read the three formats, check them against the teacher's labels, encode them into padded
batches for the trainer.

- Sequence classification: CSV / TSV / JSON lines (or a `datasets` name) with a text column, an optional text-pair
  column and a label column; or plain text files (one example per line) as unlabelled text.
- Token classification: JSON lines of {"tokens": [...], "tags": [...]} (IOB2 tag names) or CoNLL files (one
  token per line, its tag in the last column, a blank line between sentences). Only the first sub-word of each
  word carries the word's tag; the others are ignored by the losses and the metrics.
- Question answering: SQuAD format (the nested {"data": [{"paragraphs": ...}]} JSON, or flat JSON lines / a
  `datasets` name with id, question, context and answers {text, answer_start}). Long contexts are cut into
  windows of max_seq_len tokens that overlap by doc_stride; a window that does not contain the answer carries no
  hard label (the teacher's soft targets still teach it).

An example whose label is None is unlabelled: only the teacher's soft targets train on it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastdistil.data import DataError
from fastdistil.tasks import QUESTION_ANSWERING, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

IGNORE = -100  # a position or example without a hard label
IOB2_TAG = re.compile(r"^(O|[BI]-.+)$")


@dataclass
class TaskSet:
    """Examples of one task. `labels[i]` is the example's label (a class, a tag list, or a SQuAD answers dict),
    None where it has none."""

    task: str
    inputs: list  # classification: (text, pair or None); NER: token list; QA: (question, context, id)
    labels: list
    source: str

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, idx) -> TaskSet:
        return TaskSet(self.task, [self.inputs[i] for i in idx], [self.labels[i] for i in idx], self.source)


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_records(spec: str, what: str) -> list[dict]:
    """Rows of a CSV / TSV / JSON / JSON-lines file or a `datasets` name[:config] (its train split)."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # reading a file of examples takes a moment: no bar for it
    try:
        return _load_records(spec, what, datasets)
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _load_records(spec: str, what: str, datasets) -> list[dict]:
    suffix = "".join(Path(spec).suffixes[-2:]).lower().removesuffix(".gz")
    if os.path.isdir(spec):
        raise DataError(f"{what} {spec}: a directory; give a .csv, .tsv, .json or .jsonl file")
    if not os.path.exists(spec) and (os.sep in spec or suffix.endswith((".csv", ".tsv", ".json", ".jsonl"))):
        raise DataError(f"{what} {spec}: no such file")
    try:
        if os.path.isfile(spec):
            if os.path.getsize(spec) == 0:
                raise DataError(f"{what} {spec}: the file is empty")
            if suffix.endswith((".csv", ".tsv")):
                ds = datasets.load_dataset("csv", data_files=spec, split="train",
                                           delimiter="\t" if suffix.endswith(".tsv") else ",")  # fmt: skip
            elif suffix.endswith((".jsonl", ".json")):
                ds = datasets.load_dataset("json", data_files=spec, split="train")
            else:
                raise DataError(f"{what} {spec}: use a .csv, .tsv, .json or .jsonl file")
        else:
            name, _, config = spec.partition(":")
            ds = datasets.load_dataset(name, config or None, split="train")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{what} {spec}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if len(ds) == 0:
        raise DataError(f"{what} {spec}: the set is empty")
    return ds.to_list()


def _column(rows: list[dict], name: str, spec: str, what: str) -> list:
    if name not in rows[0]:
        raise DataError(f"{what} {spec}: no column {name!r} (columns: {sorted(rows[0])})")
    return [r.get(name) for r in rows]


def _plain_lines(path: str) -> list[str]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def read_classification(spec: str, text_column: str, pair_column: str | None, label_column: str,
                        what: str = "--data", labelled: bool = True) -> TaskSet:  # fmt: skip
    """Texts (and text pairs) with their labels; `labelled=False` reads unlabelled text (a plain text file of
    one example per line also works then)."""
    if not labelled and os.path.isfile(spec) and spec.endswith((".txt", ".txt.gz", ".text")):
        texts = _plain_lines(spec)
        if not texts:
            raise DataError(f"{what} {spec}: the file is empty")
        return TaskSet(SEQUENCE_CLASSIFICATION, [(t, None) for t in texts], [None] * len(texts), spec)
    rows = read_records(spec, what)
    texts = _column(rows, text_column, spec, what)
    pairs = _column(rows, pair_column, spec, what) if pair_column else [None] * len(rows)
    for column, values in ((text_column, texts), (pair_column, pairs if pair_column else [])):
        bad = next((i for i, t in enumerate(values) if not isinstance(t, str) or not t.strip()), None)
        if bad is not None:
            raise DataError(f"{what} {spec}: row {bad + 1} has no text in column {column!r}")
    labels = [None] * len(rows)
    if labelled:
        labels = _column(rows, label_column, spec, what)
        missing = next((i for i, v in enumerate(labels) if v is None or v == ""), None)
        if missing is not None:
            raise DataError(f"{what} {spec}: row {missing + 1} has no label in column {label_column!r}")
    return TaskSet(SEQUENCE_CLASSIFICATION, list(zip(texts, pairs)), labels, spec)


def read_conll(path: str, what: str) -> tuple[list, list]:
    """Sentences of a CoNLL file: one token per line with its tag in the last column; blank lines and
    -DOCSTART- lines separate sentences."""
    sentences, tags, tokens, tag = [], [], [], []
    for n, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if tokens:
                sentences.append(tokens)
                tags.append(tag)
            tokens, tag = [], []
            continue
        if len(parts) < 2:
            raise DataError(f"{what} {path}: line {n} has a token but no tag (expected 'token ... tag')")
        tokens.append(parts[0])
        tag.append(parts[-1])
    if tokens:
        sentences.append(tokens)
        tags.append(tag)
    return sentences, tags


def read_token_classification(spec: str, label_column: str, what: str = "--data", labelled: bool = True) -> TaskSet:
    """Sentences (token lists) with one IOB2 tag per token (JSON lines or CoNLL); `labelled=False` ignores the
    tags (a plain text file, one whitespace-tokenised sentence per line, also works then)."""
    is_file = os.path.isfile(spec)
    if is_file and spec.endswith((".conll", ".conllu", ".iob", ".bio")):
        sentences, tags = read_conll(spec, what)
    elif is_file and spec.endswith((".txt", ".txt.gz")) and not labelled:
        sentences, tags = [line.split() for line in _plain_lines(spec)], None
    else:
        rows = read_records(spec, what)
        sentences = _column(rows, "tokens", spec, what)
        tags = _column(rows, label_column, spec, what) if labelled else None
    if not sentences:
        raise DataError(f"{what} {spec}: the set is empty")
    for i, s in enumerate(sentences):
        if not s or not all(isinstance(t, str) and t for t in s):
            raise DataError(f"{what} {spec}: sentence {i + 1} has no tokens or a token that is not text")
    if not labelled:
        return TaskSet(TOKEN_CLASSIFICATION, sentences, [None] * len(sentences), spec)
    for i, (s, t) in enumerate(zip(sentences, tags)):
        if t is None or len(t) != len(s):
            raise DataError(f"{what} {spec}: sentence {i + 1} has {len(s)} tokens but {len(t or [])} tags")
        bad = next((x for x in t if not isinstance(x, str) or not IOB2_TAG.match(x)), None)
        if bad is not None:
            raise DataError(f"{what} {spec}: sentence {i + 1} has the tag {bad!r}; tags must be IOB2 names "
                            "(O, B-TYPE, I-TYPE)")  # fmt: skip
    return TaskSet(TOKEN_CLASSIFICATION, sentences, list(tags), spec)


def _squad_rows(spec: str, what: str) -> list[dict]:
    """SQuAD's nested JSON flattened to rows of id, question, context, answers; other sources as they are."""
    if os.path.isfile(spec) and spec.endswith(".json"):
        try:
            doc = json.loads(Path(spec).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{what} {spec}: not valid JSON ({str(e).splitlines()[0][:200]})") from e
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            rows = []
            for article in doc["data"]:
                for para in article.get("paragraphs", []):
                    for qa in para.get("qas", []):
                        answers = qa.get("answers") or []
                        rows.append({"id": str(qa.get("id", len(rows))), "question": qa.get("question"),
                                     "context": para.get("context"),
                                     "answers": {"text": [a["text"] for a in answers],
                                                 "answer_start": [a["answer_start"] for a in answers]}})  # fmt: skip
            if not rows:
                raise DataError(f"{what} {spec}: the set is empty")
            return rows
    return read_records(spec, what)


def read_question_answering(spec: str, what: str = "--data", labelled: bool = True) -> TaskSet:
    """Questions with their contexts and answers (SQuAD format); every answer must be found in its context at
    answer_start. `labelled=False` ignores the answers."""
    rows = _squad_rows(spec, what)
    for col in ("question", "context") + (("answers",) if labelled else ()):
        _column(rows, col, spec, what)
    inputs, labels = [], []
    for i, r in enumerate(rows):
        qid, question, context = str(r.get("id", i)), r.get("question"), r.get("context")
        if not isinstance(question, str) or not question.strip() or not isinstance(context, str) or not context:
            raise DataError(f"{what} {spec}: question {qid} has no question text or no context")
        inputs.append((question.strip(), context, qid))
        labels.append(_checked_answers(r.get("answers"), context, qid, spec, what) if labelled else None)
    return TaskSet(QUESTION_ANSWERING, inputs, labels, spec)


def _checked_answers(answers, context: str, qid: str, spec: str, what: str) -> dict:
    if not isinstance(answers, dict) or not answers.get("text"):
        raise DataError(f"{what} {spec}: question {qid} has no answer (answers needs text and answer_start)")
    texts, starts = list(answers["text"]), list(answers.get("answer_start") or [])
    if len(texts) != len(starts):
        raise DataError(f"{what} {spec}: question {qid} has {len(texts)} answer texts but {len(starts)} starts")
    for text, start in zip(texts, starts):
        if not isinstance(start, int) or context[start : start + len(text)] != text:
            raise DataError(f"{what} {spec}: question {qid}: the answer {text!r} is not in its context at "
                            f"answer_start {start}")  # fmt: skip
    return {"text": texts, "answer_start": starts}


def read_task(task: str, spec: str, c, what: str = "--data", labelled: bool = True) -> TaskSet:
    if task == SEQUENCE_CLASSIFICATION:
        return read_classification(spec, c.text_column, c.text_pair_column, c.label_column or "label", what, labelled)
    if task == TOKEN_CLASSIFICATION:
        return read_token_classification(spec, c.label_column or "tags", what, labelled)
    return read_question_answering(spec, what, labelled)


# ---------------------------------------------------------------------------------------------------------
# Labels


def label_names(data: TaskSet) -> list[str]:
    """The label set a fine-tuned model gets from its data: the classes (sorted), or the IOB2 tags (O first)."""
    if data.task == SEQUENCE_CLASSIFICATION:
        return [str(v) for v in sorted({lab for lab in data.labels if lab is not None}, key=_sort_key)]
    if data.task == TOKEN_CLASSIFICATION:
        tags = {t for tags in data.labels if tags for t in tags}
        return ["O"] + sorted(tags - {"O"}, key=lambda t: (t[2:], t[0]))
    return []


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, np.integer)) else (1, 0, str(v))


def check_labels(data: TaskSet, label2id: dict, what: str, teacher: str) -> None:
    """Every label of the data is one the teacher knows; a training set has as many classes as the teacher."""
    if data.task == QUESTION_ANSWERING:
        return
    seen = set(label_names(data))
    unknown = sorted(seen - set(label2id))
    if unknown:
        raise DataError(f"{what} {data.source}: label(s) {unknown[:5]} are not among the teacher's {teacher} labels "
                        f"{sorted(label2id)[:10]}")  # fmt: skip
    n_classes = len(set(label2id.values()))  # a class may answer to two names (LABEL_k and k)
    if data.task == SEQUENCE_CLASSIFICATION and what == "--data" and len(seen) != n_classes:
        raise DataError(f"{what} {data.source}: {len(seen)} classes, but the teacher {teacher} has {n_classes} "
                        f"({sorted(label2id)[:10]})")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Encoding


@dataclass
class Features:
    """Encoded examples, one row per model input (a QA example may give several windows). Columns: input_ids,
    token_type_ids (where the tokenizer makes them) and the targets of the task."""

    task: str
    columns: dict
    example: list  # the TaskSet index of each row
    offsets: list = field(default_factory=list)  # QA: per row, (start, end) characters of each context token

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(r) for r in self.columns["input_ids"]], dtype=np.int64)


def encode(data: TaskSet, tokenizer, label2id: dict, max_len: int, doc_stride: int = 32) -> Features:
    if data.task == SEQUENCE_CLASSIFICATION:
        return _encode_classification(data, tokenizer, label2id, max_len)
    if data.task == TOKEN_CLASSIFICATION:
        return _encode_tokens(data, tokenizer, label2id, max_len)
    return _encode_qa(data, tokenizer, max_len, doc_stride)


def _kept(enc, tokenizer) -> dict:
    """input_ids, and token_type_ids where the tokenizer's models take them (BERT; not DistilBERT or RoBERTa)."""
    keep = ["input_ids"] + (["token_type_ids"] if "token_type_ids" in tokenizer.model_input_names else [])
    return {k: enc[k] for k in keep if k in enc}


def _encode_classification(data: TaskSet, tokenizer, label2id: dict, max_len: int) -> Features:
    texts = [t for t, _ in data.inputs]
    pairs = [p for _, p in data.inputs]
    enc = tokenizer(texts, pairs if any(p is not None for p in pairs) else None, truncation=True, max_length=max_len)
    cols = _kept(enc, tokenizer)
    cols["labels"] = [IGNORE if lab is None else label2id[str(lab)] for lab in data.labels]
    return Features(data.task, cols, list(range(len(data))))


def _encode_tokens(data: TaskSet, tokenizer, label2id: dict, max_len: int) -> Features:
    enc = tokenizer(data.inputs, is_split_into_words=True, truncation=True, max_length=max_len)
    labels, word_starts = [], []
    for i, tags in enumerate(data.labels):
        row, starts, previous = [], [], None
        for w in enc.word_ids(i):
            first = w is not None and w != previous
            starts.append(first)
            row.append(label2id[tags[w]] if first and tags is not None else IGNORE)
            previous = w
        labels.append(row)
        word_starts.append(starts)
    cols = _kept(enc, tokenizer)
    cols.update(labels=labels, word_starts=word_starts)
    return Features(data.task, cols, list(range(len(data))))


def _encode_qa(data: TaskSet, tokenizer, max_len: int, doc_stride: int) -> Features:
    questions = [q for q, _, _ in data.inputs]
    contexts = [c for _, c, _ in data.inputs]
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_len, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)  # fmt: skip
    cols = _kept(enc, tokenizer)
    cols.update(start_positions=[], end_positions=[], span_mask=[])
    offsets, examples = [], list(enc["overflow_to_sample_mapping"])
    for row, ex in enumerate(examples):
        seq_ids = enc.sequence_ids(row)
        span = [s == 1 for s in seq_ids]  # the context's tokens: where an answer can start and end
        offsets.append([tuple(o) if s else None for o, s in zip(enc["offset_mapping"][row], span)])
        start, end = _answer_tokens(data.labels[ex], offsets[-1])
        cols["start_positions"].append(start)
        cols["end_positions"].append(end)
        cols["span_mask"].append(span)
    return Features(data.task, cols, examples, offsets)


def _answer_tokens(answers: dict | None, offsets: list) -> tuple[int, int]:
    """Token positions of the first answer inside this window, or IGNORE when it has no (whole) answer."""
    if not answers:
        return IGNORE, IGNORE
    a_start = answers["answer_start"][0]
    a_end = a_start + len(answers["text"][0])
    start = next((i for i, o in enumerate(offsets) if o is not None and o[0] <= a_start < o[1]), None)
    end = next((i for i, o in enumerate(offsets) if o is not None and o[0] < a_end <= o[1]), None)
    if start is None or end is None or end < start:
        return IGNORE, IGNORE
    return start, end


# ---------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class TaskBatch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    targets: dict  # name -> tensor: labels / word_starts / start_positions / end_positions / span_mask / token_type_ids

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _padded(rows: list, L: int, fill, dtype) -> torch.Tensor:
    out = torch.full((len(rows), L), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def collate(features: Features, idx, pad_id: int) -> TaskBatch:
    """The rows `idx` of `features`, right-padded; padded positions carry no label and no span."""
    idx = [int(i) for i in idx]
    cols = features.columns
    ids = [cols["input_ids"][i] for i in idx]
    L = max(len(r) for r in ids)
    input_ids = _padded(ids, L, pad_id, torch.long)
    mask = _padded([[1] * len(r) for r in ids], L, 0, torch.long)
    targets = {}
    if "token_type_ids" in cols:
        targets["token_type_ids"] = _padded([cols["token_type_ids"][i] for i in idx], L, 0, torch.long)
    for name in ("word_starts", "span_mask"):
        if name in cols:
            targets[name] = _padded([cols[name][i] for i in idx], L, False, torch.bool)
    if features.task == TOKEN_CLASSIFICATION:
        targets["labels"] = _padded([cols["labels"][i] for i in idx], L, IGNORE, torch.long)
    elif features.task == SEQUENCE_CLASSIFICATION:
        targets["labels"] = torch.tensor([cols["labels"][i] for i in idx], dtype=torch.long)
    else:
        for name in ("start_positions", "end_positions"):
            targets[name] = torch.tensor([cols[name][i] for i in idx], dtype=torch.long)
    return TaskBatch(input_ids, mask, targets)
