"""`python -m fastdistil.train --task ...`: distil a fine-tuned teacher into a smaller student of the same task, and
train the label-only baseline beside it, in the order that fails fast:

1. check the output directory and the flags; read the labelled, unlabelled and test data and check their labels
   against the teacher's (a base encoder is fine-tuned first only for the built-in job; other base encoders are
   refused with the finetune command to run);
2. [built-in teacher] fine-tune it on the labelled set (loss_label only) -> <dump_path>/teacher;
3. the student (a subset of the teacher's layers, its task head copied) on labelled + unlabelled examples with
   fastdistil.objectives.TaskObjective -> <dump_path>/student;
4. the label-only baseline: the same student architecture, initialised the same way, trained on the labelled
   examples alone for the same number of steps -> <dump_path>/label-only-student;
5. teacher, student and baseline on the test set: task metrics, retention, examples/s -> summary.json / .md.

Each training phase runs fastdistil.trainer.Trainer in its own directory (<dump_path>/runs/<phase>: metrics.jsonl,
checkpoints). One real batch goes forward and backward through every phase's models before the phase trains."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdistil import data as fd_data
from fastdistil import distributed as fd_dist
from fastdistil import job as fd_job
from fastdistil import models as fd_models
from fastdistil.errors import UsageError
from fastdistil.fileio import atomic_write
from fastdistil.objectives.task_logits import TaskObjective
from fastdistil.ops import use_kernels
from fastdistil.signals import StopOnSignal
from fastdistil.tasks import AUTO_CLASS, QUESTION_ANSWERING, SEQUENCE_CLASSIFICATION, builtin, evaluation
from fastdistil.tasks import data as task_data
from fastdistil.tasks import models as task_models
from fastdistil.trainer import TrainData, Trainer

DEV_EXAMPLES = 256  # the test examples scored before training and at --eval_interval (a progress signal only)


@dataclass
class Sets:
    train: task_data.TaskSet  # labelled
    extra: task_data.TaskSet | None  # unlabelled
    test: task_data.TaskSet


class Stopped(Exception):
    """A phase stopped early (a signal, or too many non-finite steps); the job ends with this exit code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


# ---------------------------------------------------------------------------------------------------------
# Checks and data


def is_builtin(c) -> bool:
    return c.data in (fd_data.BUILTIN_CORPUS, builtin.BUILTIN_TASK_DATA)


# Options of the task-agnostic job that --task does not take yet (each given a non-default value is refused).
UNTASKED = ("student_hidden_size", "student_num_heads", "student_intermediate_size", "alpha_hidden", "alpha_attention",
            "alpha_relation", "layer_map")


def check_flags(c):
    """The task job's flag checks; returns the config with the task loss weights' defaults filled in."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--task runs in one process for now; launch it without torchrun")
    if c.resume:
        raise UsageError("--resume is not supported with --task yet: rerun the command (with --force)")
    if is_builtin(c) and c.task != SEQUENCE_CLASSIFICATION:
        raise UsageError(f"--task {c.task} has no built-in data: give --data (and --test_data or --test_fraction)")
    if c.student_config or c.student_pretrained:
        raise UsageError("--task students start from the teacher's layers: use --student_layers")
    shaped = [f"--{k}" for k in UNTASKED if getattr(c, k)]
    if shaped:
        raise UsageError(f"{', '.join(shaped)}: narrower students and layer-wise losses are not supported with --task "
                         "yet (its students are layer subsets of the teacher, distilled on the task logits)")
    c = dataclasses.replace(c, alpha_kd=1.0 if c.alpha_kd is None else c.alpha_kd,
                            alpha_label=0.5 if c.alpha_label is None else c.alpha_label)  # fmt: skip
    if c.alpha_kd + c.alpha_label + c.alpha_cos == 0:
        raise UsageError("every loss weight is 0: nothing to train")
    return c


def read_sets(c) -> Sets:
    """The labelled training set, the unlabelled text and the test set (read and checked, not yet encoded)."""
    if is_builtin(c):
        train, extra, test = builtin.bible_genre(c.seed)
    else:
        full = task_data.read_task(c.task, c.data, c)
        if c.test_data:
            train, test = full, task_data.read_task(c.task, c.test_data, c, what="--test_data")
        else:
            order = np.random.default_rng(c.seed).permutation(len(full))
            n_test = round(len(full) * c.test_fraction)
            if n_test < 1 or n_test >= len(full):
                raise UsageError(f"--data {c.data}: {len(full)} examples are too few to hold out --test_fraction "
                                 f"{c.test_fraction:g} for testing (give --test_data)")  # fmt: skip
            train, test = full.subset(np.sort(order[n_test:])), full.subset(np.sort(order[:n_test]))
        extra = None
    if c.unlabelled:
        extra = task_data.read_task(c.task, c.unlabelled, c, what="--unlabelled", labelled=False)
    return Sets(train, extra, test)


def check_sets(sets: Sets, label2id: dict, teacher: str) -> None:
    task_data.check_labels(sets.train, label2id, "--data", teacher)
    task_data.check_labels(sets.test, label2id, "--test_data", teacher)


def check_positions(c, config) -> None:
    fd_models.check_positions(config, c.max_seq_len, "max_seq_len")
    if c.task == QUESTION_ANSWERING and c.doc_stride >= c.max_seq_len // 2:
        raise UsageError(f"--doc_stride {c.doc_stride} must be below half of --max_seq_len {c.max_seq_len}")


def combined(train: task_data.TaskSet, extra: task_data.TaskSet | None) -> task_data.TaskSet:
    if extra is None:
        return train
    return task_data.TaskSet(train.task, train.inputs + extra.inputs, train.labels + extra.labels, train.source)


# ---------------------------------------------------------------------------------------------------------
# One training phase


def train_phase(c, name: str, model, objective, features: task_data.Features, tokenizer, out: Path, dev,
                signals: StopOnSignal) -> int:  # fmt: skip
    """Train `model` with `objective` on `features` (one real batch first); returns the steps it made."""
    device = torch.device(c.device)
    probe(c, objective, features, tokenizer)
    data = TrainData(features, features.lengths, np.arange(len(features)), None, task_data.collate)
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(c, model, objective, data, tokenizer, world=fd_dist.World(), device=device, out=run_dir,
                      evaluate=dev(model), signals=signals)  # fmt: skip
    print(f"fastdistil: {name}: {len(features)} examples ({_labelled(features)} labelled), "
          f"{trainer.plan.total_steps} steps", flush=True)  # fmt: skip
    fit = trainer.fit()
    if fit.stop_reason:
        raise Stopped(130 if fit.stop_reason == "interrupted" else 1)
    return trainer.step


def probe(c, objective, features: task_data.Features, tokenizer) -> None:
    """One real batch forward and backward, leaving no trace (fastdistil.job.probe_batch)."""
    first = task_data.collate(features, np.arange(min(4, len(features))), tokenizer.pad_token_id)
    fd_job.probe_batch(c, objective, first.input_ids, first.attention_mask, first.targets, torch.device(c.device))


def _distillation(c, student, teacher) -> TaskObjective:
    same_width = fd_models.hidden_size(student) == fd_models.hidden_size(teacher)
    return TaskObjective(student, teacher, c.task, temperature=c.temperature, alpha_kd=c.alpha_kd,
                         alpha_label=c.alpha_label, alpha_cos=c.alpha_cos if same_width else 0.0)  # fmt: skip


def labels_only(model, task: str) -> TaskObjective:
    """The hard-label objective without a teacher: fine-tuning a teacher, and the label-only baseline."""
    return TaskObjective(model, None, task, alpha_label=1.0)


def _labelled(features: task_data.Features) -> int:
    cols = features.columns
    if "labels" in cols:
        rows = cols["labels"]
        return sum((r != task_data.IGNORE) if isinstance(r, int) else any(x != task_data.IGNORE for x in r)
                   for r in rows)  # fmt: skip
    return sum(s != task_data.IGNORE for s in cols["start_positions"])


def dev_scorer(sets: Sets, features: task_data.Features, pad_id: int, device):
    """A function of a model that scores it on the first DEV_EXAMPLES test examples (the trainer's before /
    --eval_interval numbers)."""
    n = min(DEV_EXAMPLES, len(sets.test))
    small = sets.test.subset(range(n))
    rows = [i for i, ex in enumerate(features.example) if ex < n]
    sub = task_data.Features(features.task, {k: [v[i] for i in rows] for k, v in features.columns.items()},
                             [features.example[i] for i in rows], [features.offsets[i] for i in rows]
                             if features.offsets else [])  # fmt: skip

    def for_model(model):
        def evaluate() -> dict:
            was = model.training
            logits = evaluation.predict(model, sub, pad_id, device)
            model.train(was)
            return evaluation.score(small, sub, logits, model.config.id2label)

        return evaluate

    return for_model


# ---------------------------------------------------------------------------------------------------------
# The job


def run(c) -> fd_job.RunResult:
    return _guarded(c, _run)


def finetune_run(c) -> fd_job.RunResult:
    """`python -m fastdistil.finetune`: a base encoder with a fresh task head, fine-tuned on the labelled set
    (loss_label) -> <dump_path>/model, scored on the test set."""
    return _guarded(c, _finetune)


def _guarded(c, body) -> fd_job.RunResult:
    """body(c, signals) under one signal handler for the whole run: an early stop or a signal is one message
    and an exit code, never a traceback."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    signals = StopOnSignal()
    try:
        with use_kernels(c.kernels):
            return body(c, signals)
    except Stopped as e:
        print(f"the run stopped early; {c.dump_path}/runs holds the checkpoints of the phase it was in",
              file=sys.stderr)
        return fd_job.RunResult(e.code, None, None)
    except KeyboardInterrupt:
        print(f"\n{signals.received or 'interrupted'}: stopped", file=sys.stderr)
        return fd_job.RunResult(130, None, None)
    finally:
        signals.restore()


def load_teacher(c, sets: Sets):
    """(teacher model, tokenizer, whether it still needs fine-tuning): a fine-tuned checkpoint of --task, or the
    built-in base encoder with a fresh head for the built-in job."""
    config = task_models.read_config(c.teacher, "--teacher")
    check_positions(c, config)
    if c.teacher == fd_models.BUILTIN_TEACHER and task_models.checkpoint_task(config) is None:
        labels = task_data.label_names(sets.train)
        model, tok = task_models.with_new_head(c.teacher, c.task, labels)
        return model, tok, True
    model, tok = task_models.load(c.teacher, c.task)  # refuses a head of another task, or none
    check_sets(sets, task_models.label2id(model.config), c.teacher)
    return fd_models.freeze(model), tok, False


def _run(c, signals: StopOnSignal) -> fd_job.RunResult:
    torch.manual_seed(c.seed)
    c = check_flags(c)
    out = fd_job.check_dump_path(c)
    sets = read_sets(c)
    teacher, tok, needs_finetune = load_teacher(c, sets)
    device = torch.device(c.device)
    teacher.to(device)
    label2id = task_models.label2id(teacher.config)
    encode = lambda s: task_data.encode(s, tok, label2id, c.max_seq_len, c.doc_stride)  # noqa: E731
    train_f, both_f, test_f = encode(sets.train), encode(combined(sets.train, sets.extra)), encode(sets.test)
    dev = dev_scorer(sets, test_f, tok.pad_token_id, device)
    student, layers = task_models.student_from_teacher(teacher, c.student_layers)
    probe(c, _distillation(c, student.to(device), teacher), both_f, tok)  # fails now, before any training
    _fresh(out, c)  # --force, or a run that never started, is replaced
    if needs_finetune:
        teacher = finetune(c, teacher, tok, train_f, out, dev, signals)
        fd_models.save_student(teacher, tok, out / "teacher")
        student, _ = task_models.student_from_teacher(teacher, layers)  # from the fine-tuned teacher
    steps = train_phase(c, "student", student, _distillation(c, student.to(device), teacher), both_f, tok, out, dev,
                        signals)  # fmt: skip
    fd_models.save_student(student, tok, out / "student")
    arms = [("teacher", teacher), (f"student ({len(layers)} layers)", student)]
    if not c.skip_label_only:
        baseline, _ = task_models.student_from_teacher(teacher, layers)
        train_phase(dataclasses.replace(c, max_steps=steps), "label-only", baseline,
                    labels_only(baseline.to(device), c.task), train_f, tok, out, dev, signals)  # fmt: skip
        fd_models.save_student(baseline, tok, out / "label-only-student")
        arms.append(("label-only student", baseline))
    return fd_job.RunResult(0, student, summarise(c, out, arms, sets, test_f, tok))


def finetune(c, model, tok, features, out: Path, dev, signals: StopOnSignal):
    """Fine-tune `model` on the labelled features (loss_label) for --finetune_epochs; returns it frozen."""
    fc = dataclasses.replace(c, n_epoch=c.finetune_epochs, max_steps=None)
    train_phase(fc, "teacher", model, labels_only(model, c.task), features, tok, out, dev, signals)
    return fd_models.freeze(model)


def _finetune(c, signals: StopOnSignal) -> fd_job.RunResult:
    c = check_flags(c)
    out = fd_job.check_dump_path(c)
    sets = read_sets(c)
    config = task_models.read_config(c.teacher, "--teacher")
    check_positions(c, config)
    found = task_models.checkpoint_task(config)
    if found is not None and found != c.task:
        raise UsageError(f"--teacher {c.teacher}: already fine-tuned for {found}, not --task {c.task}")
    model, tok = task_models.with_new_head(c.teacher, c.task, task_data.label_names(sets.train))
    device = torch.device(c.device)
    model.to(device)
    label2id = task_models.label2id(model.config)
    task_data.check_labels(sets.test, label2id, "--test_data", "being fine-tuned")
    train_f = task_data.encode(sets.train, tok, label2id, c.max_seq_len, c.doc_stride)
    test_f = task_data.encode(sets.test, tok, label2id, c.max_seq_len, c.doc_stride)
    dev = dev_scorer(sets, test_f, tok.pad_token_id, device)
    _fresh(out, c)
    train_phase(c, "finetune", model, labels_only(model, c.task), train_f, tok, out, dev, signals)
    fd_models.save_student(model, tok, out / "model")
    rows = evaluation.compare([("fine-tuned", model)], sets.test, test_f, tok.pad_token_id, device, repeats=1)
    print(f"\n{evaluation.table(rows, c.task)}\n\nmodel saved to {out / 'model'} (distil it with python -m "
          f"fastdistil.train --task {c.task} --teacher {out / 'model'} --data ...)")  # fmt: skip
    return fd_job.RunResult(0, model, {"rows": rows})


def _fresh(out: Path, c) -> None:
    """An empty run directory with its marker (what check_dump_path allowed to replace is replaced)."""
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / fd_job.RUN_MARKER, json.dumps(dataclasses.asdict(c), indent=2, default=str))


def summarise(c, out: Path, arms, sets: Sets, test_f, tok) -> dict:
    print("fastdistil: scoring teacher, student and baseline on the test set", flush=True)
    rows = evaluation.compare(arms, sets.test, test_f, tok.pad_token_id, torch.device(c.device))
    table = evaluation.table(rows, c.task)
    n_extra = len(sets.extra) if sets.extra is not None else 0
    setup = (f"{c.task} on {c.data}: {len(sets.train)} labelled + {n_extra} unlabelled training examples, "
             f"{len(sets.test)} test examples; device {c.device}")  # fmt: skip
    summary = {"task": c.task, "setup": setup, "rows": rows, "auto_class": AUTO_CLASS[c.task]}
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write(out / "summary.md", f"{table}\n\n{setup}\n")
    print(f"\n{table}\n\n{setup}")
    print(f"\nstudent saved to {out / 'student'} (load it with transformers.{AUTO_CLASS[c.task]}.from_pretrained)")
    return summary
