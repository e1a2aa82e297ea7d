"""Task-specific distillation (fastdistil.tasks): the task losses against a float64 reference, the readers of the
three formats, the metrics against hand-computed cases (seqeval and SQuAD conventions), students that round-trip
through their AutoModelFor... class, the end-to-end job of each task on tiny in-process teachers, and every bad
input as one `error:` line with exit code 2 and nothing written."""

import json
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdistil import evaluate as fd_eval  # noqa: E402
from fastdistil import finetune as fd_finetune  # noqa: E402
from fastdistil import train as fd_train  # noqa: E402
from fastdistil.objectives.task_logits import TaskObjective  # noqa: E402
from fastdistil.tasks import QUESTION_ANSWERING, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION  # noqa: E402
from fastdistil.tasks import data as task_data  # noqa: E402
from fastdistil.tasks import metrics as task_metrics  # noqa: E402
from tests.test_train import WORDS, _tokenizer  # noqa: E402

CLASSES = ["royal", "sea"]
TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
PLACES, PEOPLE = ("city", "land", "sea", "house"), ("king", "man", "people")
HEADS = {
    SEQUENCE_CLASSIFICATION: transformers.BertForSequenceClassification,
    TOKEN_CLASSIFICATION: transformers.BertForTokenClassification,
    QUESTION_ANSWERING: transformers.BertForQuestionAnswering,
}


def _config(tok, labels=None, layers=4):
    kw = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
          "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}  # fmt: skip
    return transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers,
                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                                   initializer_range=0.3, **kw)  # fmt: skip


def _teacher(tmp_path, task, labels=None, name="teacher"):
    tok = _tokenizer(tmp_path)
    torch.manual_seed(0)
    labels = labels or {SEQUENCE_CLASSIFICATION: CLASSES, TOKEN_CLASSIFICATION: TAGS}.get(task)
    model = HEADS[task](_config(tok, labels))
    path = tmp_path / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _sentence(rng, n=None):
    return [rng.choice(WORDS) for _ in range(n or rng.randint(5, 14))]


def _classification_file(tmp_path, n=60, seed=0, name="cls.csv", labels=CLASSES):
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        label = labels[i % len(labels)]
        words = _sentence(rng) + [("king" if label == labels[0] else "sea")]
        lines.append(f"{' '.join(words)},{label}")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _ner_rows(n=40, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = _sentence(rng)
        tags = ["B-LOC" if t in PLACES else "B-PER" if t in PEOPLE else "O" for t in tokens]
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def _ner_file(tmp_path, n=40, name="ner.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in _ner_rows(n)))
    return path


def _squad_file(tmp_path, n=30, seed=0, name="squad.json", long=False):
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        words = _sentence(rng, 60 if long else None)
        answer = rng.choice(PLACES)
        words.insert(rng.randrange(len(words)), answer)
        context = " ".join(words)
        start = context.index(f" {answer}") + 1 if not context.startswith(answer) else 0
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": "where is the place",
                           "answers": [{"text": answer, "answer_start": start}]}]})  # fmt: skip
    path = tmp_path / name
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


# ---------------------------------------------------------------------------------------------------------
# Losses against float64


def _batch(task, tok, rng):
    texts = [_sentence(rng) for _ in range(5)]
    if task == SEQUENCE_CLASSIFICATION:
        labels = [CLASSES[i % 2] for i in range(4)] + [None]
        data = task_data.TaskSet(task, [(" ".join(t), None) for t in texts], labels, "mem")
    elif task == TOKEN_CLASSIFICATION:
        data = task_data.TaskSet(task, texts, [[rng.choice(TAGS) for _ in t] for t in texts[:4]] + [None], "mem")
    else:
        ctxs = [" ".join(t + ["sea"]) for t in texts]
        answers = [{"text": ["sea"], "answer_start": [len(c) - 3]} for c in ctxs[:4]] + [None]
        data = task_data.TaskSet(task, [("where is it", c, str(i)) for i, c in enumerate(ctxs)], answers, "mem")
    names = {SEQUENCE_CLASSIFICATION: CLASSES, TOKEN_CLASSIFICATION: TAGS}.get(task, [])
    label2id = {n: i for i, n in enumerate(names)}
    feats = task_data.encode(data, tok, label2id, 64)
    return task_data.collate(feats, np.arange(len(feats)), tok.pad_token_id)


def _reference64(task, s_out, t_out, b, T):
    """The documented normalisation, written out in float64 from the two models' logits."""
    def kl_rows(s, t):  # per-row KL(p || q), rows with p = 0 entries contributing 0
        log_q, log_p = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)

    def ce(logits, labels):
        keep = labels != -100
        return torch.nn.functional.cross_entropy(logits[keep], labels[keep]) if keep.any() else logits.sum() * 0

    if task == SEQUENCE_CLASSIFICATION:
        s, t = s_out.logits.double(), t_out.logits.double()
        return T * T * kl_rows(s, t).mean(), ce(s, b.targets["labels"])
    if task == TOKEN_CLASSIFICATION:
        rows = b.targets["word_starts"]
        s, t = s_out.logits.double()[rows], t_out.logits.double()[rows]
        return T * T * kl_rows(s, t).mean(), ce(s_out.logits.double().flatten(0, 1), b.targets["labels"].flatten())
    span = b.targets["span_mask"]
    kd, lab = [], []
    for name, pos in (("start_logits", "start_positions"), ("end_logits", "end_positions")):
        s = getattr(s_out, name).double().masked_fill(~span, float("-inf"))
        t = getattr(t_out, name).double().masked_fill(~span, float("-inf"))
        kd.append(T * T * kl_rows(s, t).mean())
        lab.append(ce(s, b.targets[pos]))
    return sum(kd) / 2, sum(lab) / 2


@pytest.mark.parametrize("task", [SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_task_losses_match_a_float64_reference(tmp_path, task, T):
    tok = _tokenizer(tmp_path)
    labels = {SEQUENCE_CLASSIFICATION: CLASSES, TOKEN_CLASSIFICATION: TAGS}.get(task)
    torch.manual_seed(1)
    teacher, student = HEADS[task](_config(tok, labels)).eval(), HEADS[task](_config(tok, labels, layers=2)).eval()
    b = _batch(task, tok, random.Random(2))
    obj = TaskObjective(student, teacher, task, temperature=T, alpha_kd=0.7, alpha_label=0.3)
    terms = obj.terms(b.input_ids, b.attention_mask, b.targets)
    obj.combine(terms).total.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    kw = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.targets["token_type_ids"]}
    with torch.no_grad():
        t_out = teacher(**kw)
    kd64, label64 = _reference64(task, student(**kw), t_out, b, T)
    assert terms["loss_kd"].item() == pytest.approx(kd64.item(), rel=1e-5, abs=1e-7)
    assert terms["loss_label"].item() == pytest.approx(label64.item(), rel=1e-5, abs=1e-7)
    assert kd64.item() > 0 and label64.item() > 0
    (0.7 * kd64 + 0.3 * label64).backward()
    for n, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_a_batch_without_labels_gives_zero_label_loss_and_the_teacher_alone_teaches(tmp_path):
    tok = _tokenizer(tmp_path)
    teacher = HEADS[SEQUENCE_CLASSIFICATION](_config(tok, CLASSES)).eval()
    student = HEADS[SEQUENCE_CLASSIFICATION](_config(tok, CLASSES, layers=2)).eval()
    b = _batch(SEQUENCE_CLASSIFICATION, tok, random.Random(3))
    b.targets["labels"][:] = task_data.IGNORE
    terms = TaskObjective(student, teacher, SEQUENCE_CLASSIFICATION).terms(b.input_ids, b.attention_mask, b.targets)
    assert terms["loss_label"].item() == 0.0 and terms["loss_kd"].item() > 0
    same = TaskObjective(teacher, teacher, SEQUENCE_CLASSIFICATION).terms(b.input_ids, b.attention_mask, b.targets)
    assert same["loss_kd"].item() == pytest.approx(0.0, abs=1e-6)  # KL(x || x) = 0


# ---------------------------------------------------------------------------------------------------------
# Metrics


def test_entity_spans_follow_the_conlleval_reading_of_iob2():
    assert task_metrics.iob2_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert task_metrics.iob2_spans(["I-PER", "I-PER"]) == {("PER", 0, 1)}  # I- after O starts an entity
    assert task_metrics.iob2_spans(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}  # a type change splits
    assert task_metrics.iob2_spans(["B-PER", "B-PER"]) == {("PER", 0, 0), ("PER", 1, 1)}
    assert task_metrics.iob2_spans(["O", "O"]) == set()


def test_entity_metrics_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "B-PER"]]
    # gold entities: PER(0,1), LOC(3), LOC(0) = 3; predicted: PER(0,0), LOC(3), LOC(0), PER(1) = 4; found: 2
    m = task_metrics.entity_metrics(gold, pred)
    assert m["precision"] == pytest.approx(2 / 4) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["token_accuracy"] == pytest.approx(4 / 6)


def test_squad_metrics_by_hand():
    assert task_metrics.normalize_answer("The  Cat, sat!") == "cat sat"
    m = task_metrics.squad_metrics(["the cat", "a dog ran", "bird"], [["Cat"], ["dog", "the dog sat"], ["fish"]])
    # EM: 1, 0, 0. F1: 1; max(2*(1/2)(1/1)/(3/2), 2*(1/2)(1/2)/1) = 2/3; 0
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_best_span_takes_the_highest_scoring_span_over_windows():
    contexts = ["red blue green"]
    offsets = [[None, (0, 3), (4, 8)], [None, (4, 8), (9, 14)]]  # two windows sharing "blue"
    start = [np.array([9.0, 1.0, 2.0]), np.array([9.0, 0.0, 3.0])]  # [CLS] scores never count
    end = [np.array([9.0, 0.0, 1.0]), np.array([9.0, 0.0, 4.0])]
    assert task_metrics.best_spans(start, end, offsets, [0, 0], contexts) == ["green"]


# ---------------------------------------------------------------------------------------------------------
# Readers


def test_readers_of_the_three_formats(tmp_path):
    cls = task_data.read_classification(str(_classification_file(tmp_path, n=6)), "text", None, "label")
    assert len(cls) == 6 and cls.labels[:2] == CLASSES
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a\tb\ty\nthe king\tthe sea\tyes\nthe land\tthe man\tno\n")
    pairs = task_data.read_classification(str(tsv), "a", "b", "y")
    assert pairs.inputs[0] == ("the king", "the sea") and pairs.labels == ["yes", "no"]
    tsv.write_text("a\tb\ty\nthe king\tthe sea\tyes\nthe land\t\tno\n")
    with pytest.raises(task_data.DataError, match="row 2 has no text in column 'b'"):
        task_data.read_classification(str(tsv), "a", "b", "y")
    conll = tmp_path / "ner.conll"
    conll.write_text("-DOCSTART- O\n\nthe O\nking B-PER\n\nin O\ncity B-LOC\n")
    ner = task_data.read_token_classification(str(conll), "tags")
    assert ner.inputs == [["the", "king"], ["in", "city"]] and ner.labels == [["O", "B-PER"], ["O", "B-LOC"]]
    qa = task_data.read_question_answering(str(_squad_file(tmp_path, n=3)))
    assert len(qa) == 3 and qa.labels[0]["text"][0] in PLACES
    text = tmp_path / "extra.txt"
    text.write_text("the king and the sea\n\nthe land\n")
    assert len(task_data.read_classification(str(text), "text", None, "label", labelled=False)) == 2


def test_ner_labels_sit_on_the_first_sub_word(tmp_path):
    tok = _tokenizer(tmp_path)
    data = task_data.TaskSet(TOKEN_CLASSIFICATION, [["king", "xyz", "sea"]], [["B-PER", "O", "B-LOC"]], "mem")
    f = task_data.encode(data, tok, {t: i for i, t in enumerate(TAGS)}, 32)
    ids, labels, starts = f.columns["input_ids"][0], f.columns["labels"][0], f.columns["word_starts"][0]
    words = tok.convert_ids_to_tokens(ids)
    assert words[0] == "[CLS]" and words[-1] == "[SEP]" and "##y" in words  # xyz is split into sub-words
    assert [lab for lab in labels if lab != -100] == [TAGS.index("B-PER"), 0, TAGS.index("B-LOC")]
    assert sum(starts) == 3 and all(lab == -100 for lab, s in zip(labels, starts) if not s)


def test_long_qa_contexts_become_windows_with_the_answer_where_it_is(tmp_path):
    tok = _tokenizer(tmp_path)
    qa = task_data.read_question_answering(str(_squad_file(tmp_path, n=4, long=True)))
    f = task_data.encode(qa, tok, {}, 48, doc_stride=16)
    assert len(f) > len(qa)  # several windows per example
    found = 0
    for row, ex in enumerate(f.example):
        s, e = f.columns["start_positions"][row], f.columns["end_positions"][row]
        if s == -100:
            continue
        found += 1
        a, b = f.offsets[row][s][0], f.offsets[row][e][1]
        assert qa.inputs[ex][1][a:b] == qa.labels[ex]["text"][0]
    assert found >= len(qa)


# ---------------------------------------------------------------------------------------------------------
# End to end


def _run_args(tmp_path, task, teacher, data, *extra):
    return ["--task", task, "--teacher", str(teacher), "--data", str(data), "--dump_path", str(tmp_path / "run"),
            "--max_steps", "6", "--batch_size", "8", "--max_seq_len", "48", "--checkpoint_interval", "0",
            "--test_fraction", "0.25", "--doc_stride", "16", *extra]  # fmt: skip


@pytest.mark.parametrize("task", [SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING])
def test_each_task_distils_and_the_student_round_trips_through_its_auto_class(tmp_path, task, capsys):
    teacher = _teacher(tmp_path, task)
    data = {SEQUENCE_CLASSIFICATION: lambda: _classification_file(tmp_path), TOKEN_CLASSIFICATION: lambda:
            _ner_file(tmp_path), QUESTION_ANSWERING: lambda: _squad_file(tmp_path)}[task]()  # fmt: skip
    extra = tmp_path / "extra.txt"
    extra.write_text("".join(" ".join(_sentence(random.Random(i))) + "\n" for i in range(16)))
    unlabelled = ["--unlabelled", str(extra)] if task != QUESTION_ANSWERING else []
    result = fd_train.train(fd_train.resolve_config(_run_args(tmp_path, task, teacher, data, *unlabelled)))
    assert result.exit_code == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert [r["role"] for r in summary["rows"]] == ["teacher", "student (2 layers)", "label-only student"]
    loaded = getattr(transformers, summary["auto_class"]).from_pretrained(run / "student").eval()
    assert loaded.config.id2label == result.student.config.id2label and loaded.config.num_hidden_layers == 2
    result.student.eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        a, b = result.student(input_ids=ids), loaded(input_ids=ids)
    key = "start_logits" if task == QUESTION_ANSWERING else "logits"
    torch.testing.assert_close(getattr(a, key), getattr(b, key))
    assert (run / "label-only-student" / "config.json").is_file()
    metrics = [json.loads(line) for line in (run / "runs" / "student" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "step" in m and "loss_kd" in m]
    assert len(steps) == 6 and all(np.isfinite(m["loss_kd"]) and m["loss_kd"] > 0 for m in steps)
    assert "| teacher |" in capsys.readouterr().out
    report = tmp_path / "report"
    args = ["--task", task, "--teacher", str(teacher), "--students", str(run / "student"), "--test_data", str(data),
            "--out", str(report), "--max_seq_len", "48", "--doc_stride", "16", "--quiet"]  # fmt: skip
    assert fd_eval.main(args) == 0  # any labelled set: here the training file itself
    rows = json.loads((report / "report.json").read_text())["rows"]
    assert [r["role"] for r in rows] == ["teacher", str(run / "student"), "label-only student"]
    assert all(r["speedup"] > 0 for r in rows[1:])


def test_finetune_gives_a_teacher_that_train_accepts(tmp_path):
    encoder = tmp_path / "encoder"
    tok = _tokenizer(tmp_path)
    transformers.BertModel(_config(tok)).save_pretrained(encoder)
    tok.save_pretrained(encoder)
    data = _ner_file(tmp_path)
    args = ["--task", TOKEN_CLASSIFICATION, "--teacher", str(encoder), "--data", str(data), "--dump_path",
            str(tmp_path / "ft"), "--max_steps", "4", "--batch_size", "8", "--test_fraction", "0.25"]  # fmt: skip
    assert fd_finetune.main(args) == 0
    model = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "ft" / "model")
    assert set(model.config.label2id) == {"O", "B-LOC", "B-PER"}
    # without fine-tuning, train refuses the base encoder and names the command to run
    assert fd_train.main(_run_args(tmp_path, TOKEN_CLASSIFICATION, encoder, data)) == 2
    # the fine-tuned teacher's config names its task: --task may be left out
    no_task = _run_args(tmp_path, TOKEN_CLASSIFICATION, tmp_path / "ft" / "model", data)[2:]
    assert fd_train.resolve_config(no_task).task == TOKEN_CLASSIFICATION
    assert fd_train.main(no_task) == 0


# ---------------------------------------------------------------------------------------------------------
# Bad input


def _bad_inputs(tmp_path):
    cls_teacher = _teacher(tmp_path, SEQUENCE_CLASSIFICATION, name="cls-teacher")
    ner_teacher = _teacher(tmp_path, TOKEN_CLASSIFICATION, name="ner-teacher")
    qa_teacher = _teacher(tmp_path, QUESTION_ANSWERING, name="qa-teacher")
    other_labels = _classification_file(tmp_path, name="other.csv", labels=["x", "y"])
    three = _classification_file(tmp_path, name="three.csv", labels=["royal", "sea", "x"])
    odd_tags = tmp_path / "odd.jsonl"
    rows = _ner_rows(8) + [{"tokens": ["the", "king"], "tags": ["O", "B-ORG"]}]
    odd_tags.write_text("".join(json.dumps(r) + "\n" for r in rows))
    not_iob = tmp_path / "not-iob.jsonl"
    not_iob.write_text(json.dumps({"tokens": ["the", "king"], "tags": ["O", "PER"]}) + "\n")
    squad = json.loads(_squad_file(tmp_path).read_text())
    squad["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 1
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(squad))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cls = _classification_file(tmp_path)
    return [
        (SEQUENCE_CLASSIFICATION, cls_teacher, other_labels, [], "not among the teacher"),
        (SEQUENCE_CLASSIFICATION, cls_teacher, three, [], "not among the teacher"),
        (TOKEN_CLASSIFICATION, ner_teacher, odd_tags, [], "not among the teacher"),
        (TOKEN_CLASSIFICATION, ner_teacher, not_iob, [], "IOB2"),
        (QUESTION_ANSWERING, qa_teacher, moved, [], "is not in its context"),
        (SEQUENCE_CLASSIFICATION, cls_teacher, empty, [], "empty"),
        (SEQUENCE_CLASSIFICATION, cls_teacher, cls, ["--text_column", "sentence"], "no column 'sentence'"),
        (TOKEN_CLASSIFICATION, cls_teacher, _ner_file(tmp_path), [], "not --task token-classification"),
        (SEQUENCE_CLASSIFICATION, cls_teacher, cls, ["--test_fraction", "0.001"], "too few"),
        (SEQUENCE_CLASSIFICATION, cls_teacher, tmp_path / "missing.csv", [], "no such file"),
        (SEQUENCE_CLASSIFICATION, cls_teacher, cls, ["--test_data", str(empty)], "empty"),
        (SEQUENCE_CLASSIFICATION, cls_teacher, cls, ["--student_layers", "0,9"], "layers 0..3"),
    ]


def test_bad_task_input_is_one_error_line_and_nothing_is_written(tmp_path, capsys):
    for task, teacher, data, extra, message in _bad_inputs(tmp_path):
        capsys.readouterr()
        assert fd_train.main(_run_args(tmp_path, task, teacher, data, *extra)) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (message, err)
        assert not (tmp_path / "run").exists(), message


def test_two_classes_of_a_three_class_teacher_are_refused(tmp_path, capsys):
    teacher = _teacher(tmp_path, SEQUENCE_CLASSIFICATION, labels=["royal", "sea", "x"], name="three")
    assert fd_train.main(_run_args(tmp_path, SEQUENCE_CLASSIFICATION, teacher, _classification_file(tmp_path))) == 2
    assert "2 classes, but the teacher" in capsys.readouterr().err


def test_integer_labels_match_placeholder_label_names_in_training_and_scoring(tmp_path):
    """A teacher whose id2label is transformers' LABEL_0, LABEL_1 takes data labelled 0 and 1, in the job and in
    the metrics (a label that matched no name would count as wrong for every model)."""
    from fastdistil.tasks import evaluation

    teacher = _teacher(tmp_path, SEQUENCE_CLASSIFICATION, labels=["LABEL_0", "LABEL_1"], name="placeholder")
    data = _classification_file(tmp_path, labels=[0, 1])
    assert fd_train.main(_run_args(tmp_path, SEQUENCE_CLASSIFICATION, teacher, data)) == 0
    test = task_data.TaskSet(SEQUENCE_CLASSIFICATION, [("a", None)] * 3, [0, 1, 1], "mem")
    logits = [np.array([2.0, 0.0]), np.array([0.0, 1.0]), np.array([3.0, 0.0])]
    m = evaluation.score(test, None, logits, {0: "LABEL_0", 1: "LABEL_1"})
    assert m["accuracy"] == pytest.approx(2 / 3)
