"""Task teachers and students: load a fine-tuned checkpoint with its task head, give a base encoder a fresh
head for fine-tuning, and build a student from a subset of the teacher's layers with the task head copied."""

from __future__ import annotations

import os
import re

from fastdistil import models as fd_models
from fastdistil.errors import first_line
from fastdistil.models import ModelError
from fastdistil.tasks import ARCHITECTURE_SUFFIX, AUTO_CLASS, QUESTION_ANSWERING, auto_class, task_of_architectures

_DEFAULT_LABEL = re.compile(r"^LABEL_(\d+)$")


def checkpoint_path(name_or_path: str, what: str) -> str:
    path = fd_models.builtin_teacher_path() if name_or_path == fd_models.BUILTIN_TEACHER else name_or_path
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{what} {name_or_path}: not a transformers checkpoint directory (no config.json)")
    return path


def read_config(name_or_path: str, what: str):
    return fd_models.read_config(checkpoint_path(name_or_path, what), name_or_path, what)


def checkpoint_task(config) -> str | None:
    return task_of_architectures(getattr(config, "architectures", None))


def check_task(config, task: str, name: str) -> None:
    """A fine-tuned teacher's head must be the head of --task."""
    found = checkpoint_task(config)
    if found is None:
        arch = (config.architectures or ["?"])[0]
        raise ModelError(f"--teacher {name}: a base encoder without a task head ({arch}); "
                         f"fine-tune it first: python -m fastdistil.finetune --task {task} --teacher {name} "
                         "--data ...")  # fmt: skip
    if found != task:
        raise ModelError(f"--teacher {name}: its head is for {found} ({config.architectures[0]}), not --task {task}")


def load(name_or_path: str, task: str, what: str = "--teacher"):
    """A fine-tuned model of `task` and its tokenizer."""
    import transformers

    config = read_config(name_or_path, what)
    check_task(config, task, name_or_path)
    path = checkpoint_path(name_or_path, what)
    try:
        with fd_models.quiet(transformers):
            model = auto_class(task).from_pretrained(path)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:
        raise ModelError(f"{what} {name_or_path}: cannot load it as {AUTO_CLASS[task]} ({first_line(e)})") from e
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{what} {name_or_path}: its tokenizer is not a fast tokenizer")
    return model, tokenizer


def with_new_head(name_or_path: str, task: str, labels: list[str]):
    """A base encoder with a freshly initialised head of `task` for `labels` (fine-tuning starts here)."""
    import transformers

    config = read_config(name_or_path, "--teacher")
    path = checkpoint_path(name_or_path, "--teacher")
    kw = {} if task == QUESTION_ANSWERING else {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                                                "label2id": {n: i for i, n in enumerate(labels)}}  # fmt: skip
    try:
        with fd_models.quiet(transformers):
            model = auto_class(task).from_pretrained(path, **kw)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:
        raise ModelError(f"--teacher {name_or_path}: cannot give it a {task} head ({first_line(e)})") from e
    arch = type(model).__name__
    if not arch.endswith(ARCHITECTURE_SUFFIX[task]):
        raise ModelError(f"--teacher {name_or_path}: {config.model_type} has no {task} head class")
    return fd_models.as_fp32(model).train(), tokenizer


def label2id(config) -> dict[str, int]:
    """Label name -> index of a fine-tuned model (label_ids of its id2label)."""
    return label_ids(config.id2label)


def label_ids(id2label: dict) -> dict[str, int]:
    """Label name -> index; transformers' placeholder names LABEL_k also answer to k (data labelled 0..K-1)."""
    out = {str(name): int(i) for i, name in id2label.items()}
    for name, i in list(out.items()):
        m = _DEFAULT_LABEL.match(name)
        if m and int(m.group(1)) == i:
            out[str(i)] = i
    return out


def student_from_teacher(teacher, layers: list[int] | None):
    """The teacher's task architecture with only `layers` (default: every other, keeping the first and the last),
    initialised from the teacher: embeddings, those layers, the pooler and the task head; id2label kept."""
    n = fd_models.num_layers(teacher)
    layers = layers or fd_models.default_student_layers(n)
    return fd_models.as_fp32(fd_models.student_from_teacher(teacher, layers)).train(), layers
