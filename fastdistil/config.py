"""The training configuration, declared once.

Every option is one `Option` (name, type, default, help, check). The command line (`build_parser`), `--config`
files (`read_config_file`) and the Python API (`resolve(overrides)`) are all built from that declaration, and
every value, whatever its source, goes through the same type and range checks. The result is a frozen
`TrainConfig`: later stages derive new values with `dataclasses.replace`, never by writing into it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastdistil.data import BUILTIN_CORPUS
from fastdistil.errors import UsageError
from fastdistil.models import BUILTIN_TEACHER
from fastdistil.ops._common import MAX_TEMPERATURE
from fastdistil.tasks import TASKS, task_of_checkpoint

BUILTIN_MAX_STEPS = 150  # the no-argument job: about six minutes on two CPU cores
TASK_LEARNING_RATE = 2e-4  # --task: measured on the built-in job (teacher fine-tuning and distillation)


# ---------------------------------------------------------------------------------------------------------
# Checks: each returns None when the value is acceptable, else what it must be.


def positive(v) -> str | None:
    return None if v >= 1 else "must be a positive integer"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def finite_non_negative(v) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def finite_positive(v) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def in_range(lo, hi, lo_open=False, hi_open=False) -> Callable:
    def check(v):
        ok = math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    return check


def device_name(v) -> str | None:
    return None if v is None or re.fullmatch(r"cpu|cuda(:\d+)?", v) else "must be cpu, cuda or cuda:N"


def layer_list(v) -> str | None:
    if v is None:
        return None
    if not v:
        return "must list at least one layer, e.g. 0,2,5"
    return None if all(x >= 0 for x in v) else "must list layer indices >= 0"


def parse_layers(text: str) -> list[int]:
    """'0, 2,5' -> [0, 2, 5] (the CLI and config files may give a string)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise UsageError(f"--student_layers {text!r}: expected comma-separated integers") from e


# ---------------------------------------------------------------------------------------------------------
# The declaration


@dataclass(frozen=True)
class Option:
    name: str
    type: type  # int, float, str, bool, or list (of ints)
    default: Any
    help: str
    group: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple | None = None
    optional: bool = False  # None is a legal value (resolved later from the teacher, the device, ...)
    metavar: str | None = None


def _options() -> list[Option]:
    O = Option  # noqa: E741, N806  (one letter: the table below stays readable)
    run, models, data, obj, optim = "run", "models", "data", "objective (DistilBERT names)", "optimisation"
    return [
        O("config", str, None, "JSON or YAML file with any of these options (flags override it)", run, optional=True),
        O("dump_path", str, "fastdistil-run", "output directory (default: fastdistil-run)", run),
        O("force", bool, False, "overwrite a dump_path that holds another run", run),
        O("resume", str, None, "continue the run in dump_path from its newest complete checkpoint (or from the "
          "checkpoint PATH)", run, optional=True, metavar="PATH"),
        O("tensorboard", bool, False, "also log every step to <dump_path>/tensorboard", run),
        O("keep_checkpoints", int, 3, "keep the newest K checkpoints (default 3; 0 = all)", run, non_negative),
        O("max_bad_steps", int, 10, "stop after this many non-finite steps in a row (default 10)", run, positive),
        O("device", str, None, "cpu or cuda[:N] (default: cuda when available)", run, device_name, optional=True),
        O("kernels", str, "fused", "fused ops (default) or the pure-PyTorch baseline", run,
          choices=("fused", "reference")),
        O("precision", str, "fp32", "autocast precision (default fp32)", run, choices=("fp32", "bf16", "fp16")),
        O("attention", str, "auto", "attention of teacher and student: fastdistil's op on padded batches, "
          "fastdistil_varlen on the unpadded tokens, or transformers' sdpa / eager (default auto: "
          "fastdistil_varlen on CUDA with --kernels fused, else sdpa)", run,
          choices=("auto", "fastdistil", "fastdistil_varlen", "sdpa", "eager")),
        O("seed", int, 56, "random seed (default 56)", run, non_negative),
        O("cache_dir", str, None, "tokenised-data cache (default: $FASTDISTIL_CACHE or ~/.cache/fastdistil)", run,
          optional=True),
        O("num_proc", int, None, "tokenisation processes (default: CPU count, at most 8)", run, positive,
          optional=True),
        O("teacher", str, BUILTIN_TEACHER, f"checkpoint directory or hub name (default: {BUILTIN_TEACHER})", models),
        O("teacher_dtype", str, "auto", "dtype the teacher computes in: auto = fp32 on CPU, the checkpoint's own "
          "dtype on CUDA (half-precision checkpoints stay half); the student always trains fp32 weights",
          models, choices=("auto", "fp32", "bf16", "fp16")),
        O("student_layers", list, None, "teacher layers the student starts from, e.g. 0,2,4,7,9,11 (default: every "
          "other)", models, layer_list, optional=True),
        O("student_config", str, None, "config (file or directory) of a freshly initialised student", models,
          optional=True),
        O("student_pretrained", str, None, "directory of a student checkpoint to start from", models, optional=True),
        O("data", str, BUILTIN_CORPUS, "text file, directory of text files, or datasets name[:config] (default: "
          f"{BUILTIN_CORPUS})", data),
        O("max_seq_len", int, 128, "tokens per sequence, [CLS] and [SEP] included (default 128)", data,
          in_range(3, 512)),
        O("min_seq_len", int, 12, "shorter sequences are dropped (default 12)", data, positive),
        O("vocab_fraction", float, None, "add this share (of the training sequences) of sequences of whole words drawn "
          "uniformly from the teacher's vocabulary, so the student also meets words its corpus lacks (default 0.5 "
          "with the built-in corpus, whose vocabulary is narrow, else 0)", data, in_range(0, 10), optional=True),
        O("eval_fraction", float, 0.02, "held-out share of the sequences (default 0.02, at most 2000)", data,
          in_range(0, 1, lo_open=True, hi_open=True)),
        O("temperature", float, 2.0, f"softmax temperature of loss_ce, in (0, {MAX_TEMPERATURE:g}] (default 2.0)", obj,
          in_range(0, MAX_TEMPERATURE, lo_open=True)),
        O("alpha_ce", float, None, "weight of the vocabulary KL (default 5.0 with an MLM head, else 0)", obj,
          finite_non_negative, optional=True),
        O("alpha_mlm", float, None, "weight of the MLM loss (default 2.0 with an MLM head, else 0)", obj,
          finite_non_negative, optional=True),
        O("alpha_cos", float, 1.0, "weight of the hidden-state cosine loss (default 1.0)", obj, finite_non_negative),
        O("alpha_mse", float, 0.0, "weight of the MSE of mean-pooled embeddings (default 0.0)", obj,
          finite_non_negative),
        O("restrict_ce_to_mask", bool, False, "loss_ce on the masked tokens only", obj),
        O("mlm_mask_prop", float, 0.15, "share of tokens to predict (default 0.15)", obj,
          in_range(0, 1, lo_open=True)),
        O("word_mask", float, 0.8, "of those: replaced by [MASK] (default 0.8)", obj, in_range(0, 1)),
        O("word_keep", float, 0.1, "kept (default 0.1)", obj, in_range(0, 1)),
        O("word_rand", float, 0.1, "replaced by a random token (default 0.1)", obj, in_range(0, 1)),
        O("mlm_smoothing", float, 0.7, "token-frequency smoothing exponent (default 0.7)", obj, finite_non_negative),
        O("n_epoch", int, 1, "epochs (default 1)", optim, positive),
        O("max_steps", int, None, f"stop after this many optimizer steps (default: n_epoch epochs; "
          f"{BUILTIN_MAX_STEPS} on built-in data)", optim, positive, optional=True),
        O("batch_size", int, 32, "sequences per forward pass (default 32)", optim, positive),
        O("gradient_accumulation_steps", int, 1, "forward passes per optimizer step (default 1)", optim, positive),
        O("learning_rate", float, 5e-4, "peak AdamW learning rate (default 5e-4; 2e-4 with --task)", optim,
          finite_non_negative),
        O("warmup_prop", float, 0.05, "linear warm-up share of the steps (default 0.05)", optim, in_range(0, 1)),
        O("weight_decay", float, 0.0, "AdamW weight decay (default 0.0)", optim, finite_non_negative),
        O("adam_epsilon", float, 1e-6, "AdamW epsilon (default 1e-6)", optim, finite_positive),
        O("max_grad_norm", float, 5.0, "gradient clipping norm (default 5.0)", optim, finite_non_negative),
        O("checkpoint_interval", int, 500, "save a checkpoint every N steps (default 500; 0 = never)", optim,
          non_negative),
        O("eval_interval", int, 0, "held-out evaluation every N steps (default 0 = at the end only)", optim,
          non_negative),
        O("log_interval", int, 1, "progress-bar refresh every N steps (default 1)", optim, positive),
    ]  # fmt: skip


def _task_options() -> list[Option]:
    O, task = Option, "task-specific distillation (--task)"  # noqa: E741, N806
    return [
        O("task", str, None, "distil a fine-tuned teacher for this task (default: task-agnostic distillation); "
          "with no --data, sequence-classification runs the built-in job", task, choices=TASKS, optional=True),
        O("text_column", str, "text", "classification: column of the text (default text)", task),
        O("text_pair_column", str, None, "classification: column of the second text of a pair", task,
          optional=True),
        O("label_column", str, None, "column of the labels (default: label; NER: tags)", task, optional=True),
        O("unlabelled", str, None, "unlabelled in-domain examples (the --data format without labels; plain text "
          "for classification and NER): the teacher's soft targets train the student on them", task, optional=True),
        O("test_data", str, None, "the labelled test set (default: --test_fraction of --data held out)", task,
          optional=True),
        O("test_fraction", float, 0.1, "share of --data held out for testing without --test_data (default 0.1)",
          task, in_range(0, 1, lo_open=True, hi_open=True)),
        O("doc_stride", int, 32, "QA: tokens shared by consecutive windows of a long context (default 32)", task,
          positive),
        O("alpha_kd", float, None, "weight of the KL on the task logits (default 1.0)", task, finite_non_negative,
          optional=True),
        O("alpha_label", float, None, "weight of the hard-label cross-entropy (default 0.5)", task,
          finite_non_negative, optional=True),
        O("finetune_epochs", int, 5, "epochs of fine-tuning the built-in teacher on the labelled set (default 5)",
          task, positive),
        O("skip_label_only", bool, False, "do not train the label-only baseline (the same student on the labels "
          "alone, same data and steps)", task),
    ]  # fmt: skip


def _shape_options() -> list[Option]:
    O, shape, layers = Option, "student shape", "layer-wise distillation"  # noqa: E741, N806
    return [
        O("student_hidden_size", int, None, "a narrower student: its hidden size (default: the teacher's)", shape,
          positive, optional=True),
        O("student_num_heads", int, None, "its attention heads (default: hidden size / the teacher's head size)",
          shape, positive, optional=True),
        O("student_intermediate_size", int, None, "its FFN size (default: 4 x hidden size)", shape, positive,
          optional=True),
        O("student_init", str, "reduce", "a narrower student starts from the teacher's weights reduced to its shape "
          "(the most important hidden dimensions, heads and FFN neurons of the --student_layers) or random "
          "(default reduce)", shape, choices=("reduce", "random")),
        O("layer_map", str, None, "student:teacher hidden-state pairs for --alpha_hidden / --alpha_attention, 0 = "
          "the embeddings, m = layer m's output, e.g. 0:0,1:2,2:4,3:6 (default: TinyBERT's uniform map)", layers,
          optional=True),
        O("alpha_hidden", float, 0.0, "weight of the layer-mapped hidden-state loss (default 0.0)", layers,
          finite_non_negative),
        O("hidden_loss", str, "mse", "that loss: MSE (TinyBERT) or 1 - cosine (default mse)", layers,
          choices=("mse", "cosine")),
        O("alpha_attention", float, 0.0, "weight of the attention-map KL of the mapped layers (same head count; "
          "default 0.0)", layers, finite_non_negative),
        O("alpha_relation", float, 0.0, "weight of MiniLMv2's Q-Q, K-K, V-V relation KL (any shape; default 0.0)",
          layers, finite_non_negative),
        O("relation_heads", int, None, "relation heads R; each model's width splits into R (default: the teacher's "
          "attention heads, or the largest number below that divides both widths)", layers, positive, optional=True),
        O("relation_layers", str, "-1:-1", "student:teacher layers of the relations, 0-based, negative from the end "
          "(default -1:-1, the last of each; MiniLMv2 takes an upper-middle teacher layer for large teachers)",
          layers),
    ]  # fmt: skip


OPTIONS: dict[str, Option] = {o.name: o for o in _options() + _shape_options() + _task_options()}
DEFAULTS: dict[str, Any] = {name: o.default for name, o in OPTIONS.items()}

TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(o.name, Any, dataclasses.field(default=o.default)) for o in OPTIONS.values()],
    frozen=True,
    namespace={"__doc__": "A resolved, checked training configuration (frozen; see fastdistil.config)."},
)


# ---------------------------------------------------------------------------------------------------------
# Values from any source


def coerce(name: str, value, source: str):
    """`value` for option `name`, checked against its declaration; UsageError naming the source otherwise."""
    if name not in OPTIONS:
        raise UsageError(f"{source}: unknown option {name!r}")
    o = OPTIONS[name]
    where = f"--{name}" if source == "command line" else f"{source}: {name}"
    if value is None:
        if o.optional:
            return None
        raise UsageError(f"{where} cannot be null")
    if o.type is list and isinstance(value, str):
        value = parse_layers(value)
    value = _of_type(o, value, where)
    if o.choices is not None and value not in o.choices:
        raise UsageError(f"{where} must be one of {', '.join(o.choices)}, got {value!r}")
    problem = o.check(value) if o.check is not None else None
    if problem:
        raise UsageError(f"{where} {problem}, got {value!r}")
    return value


def _of_type(o: Option, value, where: str):
    kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list of integers"}
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value),
    }[o.type]
    if not ok:
        raise UsageError(f"{where} must be {kind[o.type]}, got {value!r} ({type(value).__name__})")
    return float(value) if o.type is float else value


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise UsageError(f"--config {path}: not a readable UTF-8 text file ({type(e).__name__})") from e
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:
        raise UsageError(f"--config {path}: cannot parse it ({str(e).splitlines()[0]})") from e
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    unknown = sorted(set(values) - set(OPTIONS))
    if unknown:
        raise UsageError(f"--config {path}: unknown option(s) {unknown}")
    if "config" in values:
        raise UsageError(f"--config {path}: a config file cannot name another config file")
    return {k: coerce(k, v, f"--config {path}") for k, v in values.items()}


# ---------------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit 2, as every other usage error
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(description: str = "", prog: str = "python -m fastdistil.train") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only what the user typed overrides --config and the defaults
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in OPTIONS.values():
        g = groups.get(o.group) or groups.setdefault(o.group, p.add_argument_group(o.group))
        flag = f"--{o.name}"
        if o.type is bool:
            g.add_argument(flag, action="store_true", help=o.help)
        elif o.name == "resume":
            g.add_argument(flag, nargs="?", const="latest", help=o.help, metavar=o.metavar)
        else:
            metavar = o.metavar or (None if o.choices else o.name.upper())  # choices show themselves
            g.add_argument(flag, help=o.help, metavar=metavar, choices=o.choices, type=_cli_type(o))
    return p


def _cli_type(o: Option):
    if o.type is list:
        return parse_layers
    if o.type in (int, float):

        def number(text, kind=o.type):
            try:
                return kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}") from None

        number.__name__ = o.type.__name__
        return number
    return str


# ---------------------------------------------------------------------------------------------------------
# Resolution


def resolve(overrides: dict | None = None, argv: list[str] | None = None, description: str = "",
            prog: str = "python -m fastdistil.train"):
    """The checked, frozen TrainConfig of: the defaults, then a --config file, then `overrides` (the Python API)
    or the command line `argv`. Values derived from the machine (device, cache, processes) and the built-in
    job's step count are filled in here; those that depend on the teacher are filled in by the job."""
    given = dict(overrides or {})
    if argv is not None:
        given.update(vars(build_parser(description, prog).parse_args(argv)))
    source = "command line" if argv is not None else "options"
    given = {k: coerce(k, v, source) for k, v in given.items()}
    from_file = read_config_file(given["config"]) if given.get("config") else {}
    values = {**DEFAULTS, **from_file, **given}
    explicit = set(from_file) | set(given)
    values.update(_machine_defaults(values, explicit))
    c = TrainConfig(**values)
    check_together(c)
    return c


def _machine_defaults(v: dict, explicit: set) -> dict:
    import torch

    out = {}
    if v["task"] is None and "task" not in explicit:  # a fine-tuned teacher says its task
        v = {**v, "task": task_of_checkpoint(v["teacher"])}
        out["task"] = v["task"]
    if v["task"] is not None and "learning_rate" not in explicit:
        out["learning_rate"] = TASK_LEARNING_RATE
    if v["task"] is None and v["data"] == BUILTIN_CORPUS and v["max_steps"] is None and "n_epoch" not in explicit:
        out["max_steps"] = BUILTIN_MAX_STEPS  # the embedded default job: sized to finish in minutes (0.6 epoch)
    if v["device"] is None:
        out["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if v["cache_dir"] is None:
        out["cache_dir"] = os.environ.get("FASTDISTIL_CACHE") or str(Path.home() / ".cache" / "fastdistil")
    if v["num_proc"] is None:
        out["num_proc"] = min(8, os.cpu_count() or 1)
    return out


def check_together(c) -> None:
    """Checks that involve several options or the machine."""
    import torch

    if not math.isclose(c.word_mask + c.word_keep + c.word_rand, 1.0, abs_tol=1e-6):
        raise UsageError("--word_mask + --word_keep + --word_rand must sum to 1")
    if c.student_config and c.student_pretrained:
        raise UsageError("give at most one of --student_config and --student_pretrained")
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {c.device}: no CUDA device here")
    if c.precision == "fp16" and not c.device.startswith("cuda"):
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 on CPU")
    if c.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as e:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from e


def to_json_dict(c) -> dict:
    return dataclasses.asdict(c)
