"""Distil from Python: the same job as `python -m fastdistil.train`, with model objects or paths and a
`datasets.Dataset`, a list of strings or text files.

    import fastdistil
    result = fastdistil.distil(teacher_model, texts, tokenizer=tokenizer, max_steps=200, dump_path="run")
    result.student.save_pretrained("my-student")

Every option of the CLI is a keyword argument of the same name, checked by the same declaration
(fastdistil.config). A teacher object is used in place: it is put in eval mode, frozen and moved to the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fastdistil import config as fd_config
from fastdistil import job
from fastdistil.errors import UsageError
from fastdistil.models import Teacher, freeze, has_mlm_head


@dataclass
class DistilResult:
    student: nn.Module  # the trained student (a transformers model: save_pretrained writes it)
    summary: dict | None  # held-out metrics before / after, throughput (None when the run stopped early)
    exit_code: int  # 0 done; 130 stopped by a signal; 1 stopped by non-finite steps (a checkpoint was saved)
    dump_path: str


def distil(teacher, data=None, *, tokenizer=None, **options) -> DistilResult:
    """teacher: a checkpoint path or hub name, or a transformers model (BertForMaskedLM, BertModel, ...; then
    `tokenizer` is its fast tokenizer). data: a path / datasets name as --data takes, a datasets.Dataset with
    a "text" column, or a list of strings (default: the built-in corpus). options: any TrainConfig option."""
    overrides = dict(options)
    teacher_obj = _teacher(teacher, tokenizer, overrides)
    texts = _texts(data, overrides)
    c = fd_config.resolve(overrides)
    result = job.run(c, teacher=teacher_obj, texts=texts)
    return DistilResult(result.student, result.summary, result.exit_code, c.dump_path)


def _teacher(teacher, tokenizer, overrides: dict) -> Teacher | None:
    if isinstance(teacher, str):
        overrides["teacher"] = teacher
        return None
    if not isinstance(teacher, nn.Module) or not hasattr(teacher, "config"):
        raise UsageError(f"teacher must be a path, a hub name or a transformers model, got {type(teacher).__name__}")
    if tokenizer is None:
        raise UsageError("a teacher model object needs its tokenizer: distil(model, data, tokenizer=tokenizer)")
    overrides["teacher"] = f"<{type(teacher).__name__} object>"
    return Teacher(freeze(teacher), tokenizer, has_mlm_head(teacher), overrides["teacher"])


def _texts(data, overrides: dict):
    if data is None or isinstance(data, str):
        if data is not None:
            overrides["data"] = data
        return None
    import datasets

    if isinstance(data, (list, tuple)) and all(isinstance(x, str) for x in data):
        data = datasets.Dataset.from_dict({"text": list(data)})
    if not isinstance(data, datasets.Dataset):
        raise UsageError(f"data must be a path, a datasets.Dataset or a list of strings, got {type(data).__name__}")
    if "text" not in data.column_names or len(data) == 0:
        raise UsageError(f"data: the dataset needs a non-empty 'text' column (columns: {data.column_names})")
    overrides["data"] = f"<datasets.Dataset of {len(data)} texts>"
    return data
