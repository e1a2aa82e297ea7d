"""A distillation job from a resolved TrainConfig, in the order that fails fast: check the output directory, load
the teacher, build the student and the objective, push one real batch through all three, and only then tokenise
the whole corpus, train (fastdistil.trainer), save the student, evaluate and summarise. Nothing is written to
dump_path before every check has passed."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdistil import checkpoint as fd_checkpoint
from fastdistil import data as fd_data
from fastdistil import distributed as fd_dist
from fastdistil import heldout, narrow, objectives
from fastdistil import models as fd_models
from fastdistil import patch as fd_patch
from fastdistil.errors import UsageError, first_line
from fastdistil.fileio import DiskFullError, atomic_write, check_writable_parent
from fastdistil.ops import use_kernels
from fastdistil.signals import StopOnSignal
from fastdistil.telemetry import peak_memory_mb
from fastdistil.trainer import TrainData, Trainer, autocast, to_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunResult:
    exit_code: int
    student: torch.nn.Module
    summary: dict | None


@dataclass
class Prepared:
    c: object  # the TrainConfig with the teacher-dependent values filled in
    out: Path
    teacher: fd_models.Teacher
    student: torch.nn.Module
    objective: objectives.Objective
    seqs: object
    attention: str


# ---------------------------------------------------------------------------------------------------------
# Checks and choices that need the teacher


RUN_MARKER = "train_config.json"  # what makes a directory a fastdistil run
UNSTARTED_FILES = {RUN_MARKER, "metrics.jsonl", "tensorboard", "checkpoints"}


def check_dump_path(c) -> Path:
    """The output directory: new, empty, a run that never reached its first step (a signal or a crash during
    loading, tokenisation or the first evaluation), or (with --force) an earlier fastdistil run; the last two are
    replaced. A non-empty directory that is not a fastdistil run is never deleted, --force or not."""
    out = Path(c.dump_path)
    check_writable_parent(out, "--dump_path")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--dump_path {out} is a file")
    if c.resume:
        if c.resume == "latest" and not (out / RUN_MARKER).is_file():
            raise UsageError(f"--resume: {out} holds no fastdistil run to continue")
        if c.resume == "latest" and unstarted_run(out):
            raise UsageError(f"--resume: {out} holds a run that stopped before its first step; run the same command "
                             "without --resume to start it again")  # fmt: skip
        return out
    if out.is_dir() and any(out.iterdir()):
        if not (out / RUN_MARKER).is_file():
            raise UsageError(f"--dump_path {out} is not empty and holds no fastdistil run; choose another path")
        if not c.force and not unstarted_run(out):
            raise UsageError(
                f"--dump_path {out} already holds a run; pass --force to replace it, or choose another path"
            )
    return out


def unstarted_run(out: Path) -> bool:
    """A run directory holding nothing but what a run writes before its first step: no checkpoint, no student,
    no step in its metrics."""
    if not (out / RUN_MARKER).is_file() or fd_checkpoint.complete(out):
        return False
    if not {p.name for p in out.iterdir()} <= UNSTARTED_FILES:
        return False
    metrics = out / "metrics.jsonl"
    return not metrics.is_file() or '"step"' not in metrics.read_text()


# Measured on the default job (README, "Which recipe"): the Bible's narrow vocabulary leaves the student unready
# for other text; mixing in vocabulary sequences gains out of domain more than it costs in domain.
BUILTIN_CORPUS_VOCAB_FRACTION = 0.5


def with_data_defaults(c, texts_given: bool):
    """--vocab_fraction's default: 0.5 for the built-in corpus, 0 for the user's own (texts_given: the Python API's
    texts replace c.data)."""
    if c.vocab_fraction is not None:
        return c
    builtin = c.data == fd_data.BUILTIN_CORPUS and not texts_given
    return dataclasses.replace(c, vocab_fraction=BUILTIN_CORPUS_VOCAB_FRACTION if builtin else 0.0)


def with_teacher_defaults(c, teacher: fd_models.Teacher):
    """The loss weights and checks that depend on whether the teacher has an MLM head."""
    if not teacher.has_mlm_head:
        for name in ("alpha_ce", "alpha_mlm"):
            if getattr(c, name):
                raise UsageError(
                    f"--{name} {getattr(c, name)}: the teacher {c.teacher} has no MLM head, so there is no vocabulary "
                    "loss to distil (it distils hidden states: use --alpha_cos / --alpha_mse)"
                )
        if c.restrict_ce_to_mask:
            raise UsageError("--restrict_ce_to_mask needs a teacher with an MLM head")
        c = dataclasses.replace(c, alpha_ce=0.0, alpha_mlm=0.0)
    else:
        c = dataclasses.replace(
            c,
            alpha_ce=5.0 if c.alpha_ce is None else c.alpha_ce,
            alpha_mlm=2.0 if c.alpha_mlm is None else c.alpha_mlm,
        )
    weights = (c.alpha_ce, c.alpha_mlm, c.alpha_cos, c.alpha_mse, c.alpha_hidden, c.alpha_attention, c.alpha_relation)
    if sum(weights) == 0:
        raise UsageError("every loss weight is 0: nothing to train")
    fd_models.check_positions(teacher.model.config, c.max_seq_len, "max_seq_len")
    return c


def build_student(c, teacher: fd_models.Teacher):
    """The student (fp32 weights, whatever the teacher's dtype) and the config with its layers filled in."""
    if c.student_pretrained:
        student = fd_models.student_pretrained(c.student_pretrained, teacher)
    elif c.student_config:
        student = fd_models.student_from_config(c.student_config, teacher)
    else:
        layers = c.student_layers or fd_models.default_student_layers(fd_models.num_layers(teacher.model))
        c = dataclasses.replace(c, student_layers=layers)
        student = _student_of_layers(c, teacher.model, layers)
    # Across widths the hidden-state terms go through a learned projection; only the pooled MSE cannot.
    fd_models.check_compatible(student, teacher, need_same_hidden=c.alpha_mse > 0)
    return fd_models.as_fp32(student), c


def _student_of_layers(c, teacher_model, layers: list[int]):
    """The teacher's `layers` at its width, or reduced to (or drawn at random in) a narrower shape."""
    if c.student_hidden_size is None and c.student_num_heads is None and c.student_intermediate_size is None:
        return fd_models.student_from_teacher(teacher_model, layers)
    config = narrow.narrow_config(teacher_model, len(layers), c.student_hidden_size, c.student_num_heads,
                                  c.student_intermediate_size)  # fmt: skip
    return narrow.narrow_student(teacher_model, layers, config, c.student_init)


def teacher_compute_dtype(choice: str, teacher_model, device: torch.device) -> torch.dtype:
    """--teacher_dtype: auto keeps a half-precision checkpoint half on CUDA (memory, tensor cores) and computes in
    fp32 on CPU (these CPUs have no fast half-precision matmul); fp32 / bf16 / fp16 force it."""
    if choice != "auto":
        return DTYPES[choice]
    stored = fd_models.stored_dtype(teacher_model)
    return stored if device.type == "cuda" and stored in (torch.float16, torch.bfloat16) else torch.float32


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


# ---------------------------------------------------------------------------------------------------------
# Fail fast: one real batch before the long work


def probe(c, objective: objectives.Objective, tokenizer, sample: list, device: torch.device) -> None:
    """Forward and backward of one small real batch through teacher, student and objective, leaving no trace
    (random streams restored, gradients dropped): a dtype, shape or kernel problem fails here, in seconds."""
    if not sample:
        return  # the first documents yield no sequence; tokenising the corpus will say why
    batch = fd_data.collate_rows(sample, tokenizer.pad_token_id)
    labels = None
    if objective.needs.mlm_labels:
        uniform = fd_data.MLMMasker(np.ones(len(tokenizer), dtype=np.int64), tokenizer.all_special_ids,
                                    tokenizer.mask_token_id)  # fmt: skip
        ids, labels = uniform(batch, torch.Generator().manual_seed(0))
    else:
        ids = batch.input_ids
    probe_batch(c, objective, ids, batch.attention_mask, labels, device)


def probe_batch(c, objective: objectives.Objective, ids, mask, labels, device: torch.device) -> None:
    """probe() of one collated batch (labels: None, a tensor or a dict of tensors, as the objective takes them)."""
    labels = to_device(labels, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            with use_kernels(c.kernels), autocast(c.precision, device):
                losses = objective.combine(objective.terms(ids.to(device), mask.to(device), labels))
            losses.total.backward()
        except (RuntimeError, ValueError, TypeError) as e:
            raise UsageError(f"the first batch fails in the teacher, student or objective: {first_line(e, 300)}") from e
        finally:
            objective.student.zero_grad(set_to_none=True)
            if objective.trainable() is not None:
                objective.trainable().zero_grad(set_to_none=True)
    bad = [k for k, v in losses.terms.items() if not torch.isfinite(v)]
    if bad:
        raise UsageError(
            f"the first batch gives a non-finite {', '.join(bad)}: the teacher's outputs overflow or hold NaN "
            f"(try --teacher_dtype fp32)"
        )


# ---------------------------------------------------------------------------------------------------------
# The job


def prepare(c, world: fd_dist.World, teacher: fd_models.Teacher | None = None, texts=None) -> Prepared:
    """Everything that can fail on bad input, before anything is written to dump_path. `teacher` and `texts`
    (a datasets.Dataset with a "text" column) replace c.teacher / c.data for callers of the Python API."""
    out = check_dump_path(c)
    teacher = teacher or fd_models.load_teacher(c.teacher)
    c = with_data_defaults(with_teacher_defaults(c, teacher), texts_given=texts is not None)
    student, c = build_student(c, teacher)
    device = torch.device(c.device)
    teacher.model.to(device=device, dtype=teacher_compute_dtype(c.teacher_dtype, teacher.model, device))
    student.to(device)
    attention = resolve_attention(c.attention, c.kernels, device)
    for model in (teacher.model, student):
        set_attention(model, attention)
    objective = objectives.for_teacher(c, student, teacher.model, teacher.has_mlm_head)
    cache = Path(c.cache_dir)
    if texts is None:
        texts = fd_data.load_texts(c.data, cache)
    probe(c, objective, teacher.tokenizer, fd_data.sample_sequences(texts, teacher.tokenizer, c.max_seq_len,
                                                                    c.min_seq_len), device)  # fmt: skip
    if not world.is_main:  # the first process tokenises and fills the cache; the others then read it
        world.barrier()
    seqs = fd_data.tokenise(texts, teacher.tokenizer, c.max_seq_len, c.min_seq_len, c.num_proc, f"--data {c.data}")
    if world.is_main:
        world.barrier()
    return Prepared(c, out, teacher, student, objective, seqs, attention)


def with_vocabulary_sequences(p: Prepared, train_idx):
    """--vocab_fraction: vocabulary sequences appended to the corpus' and to the training indices only (the held-out
    split stays the corpus' own text)."""
    n = round(p.c.vocab_fraction * len(train_idx))
    if n == 0:
        return p, train_idx
    import datasets

    extra = fd_data.vocabulary_sequences(p.teacher.tokenizer, n, fd_data.sequence_lengths(p.seqs), p.c.seed)
    seqs = datasets.concatenate_datasets([p.seqs, extra.cast(p.seqs.features)])
    return dataclasses.replace(p, seqs=seqs), np.concatenate([train_idx, np.arange(len(p.seqs), len(seqs))])


def train_data(p: Prepared, train_idx) -> TrainData:
    masker = None
    if p.objective.needs.mlm_labels:
        tok, c = p.teacher.tokenizer, p.c
        counts = fd_data.token_counts(p.seqs, p.teacher.model.config.vocab_size)
        masker = fd_data.MLMMasker(counts, tok.all_special_ids, tok.mask_token_id, mlm_mask_prop=c.mlm_mask_prop,
                                   word_mask=c.word_mask, word_keep=c.word_keep, word_rand=c.word_rand,
                                   mlm_smoothing=c.mlm_smoothing)  # fmt: skip
    return TrainData(p.seqs, fd_data.sequence_lengths(p.seqs), train_idx, masker)


def evaluation(p: Prepared, eval_idx):
    """The held-out evaluation of the run (fastdistil.heldout), as a function the trainer calls."""
    c, tok = p.c, p.teacher.tokenizer
    batches = heldout.heldout_batches(p.seqs, eval_idx, tok, max(1, min(c.batch_size, 16)), c.seed + 1)
    mlm = p.teacher.has_mlm_head

    def evaluate() -> dict:
        was_training = p.student.training
        p.student.eval()
        kw = dict(device=c.device, teacher_mlm=mlm, autocast=lambda: autocast(c.precision, c.device))
        s = heldout.compare(p.student, p.teacher.model, batches, model_mlm=mlm, **kw)
        p.student.train(was_training)
        # cosines only exist between models of one width (None for a narrower student)
        res = {"embedding_cosine": s.get("embedding_cosine"), "token_cosine": s.get("token_cosine"),
               "pairwise_spearman": s.get("pairwise_spearman"), "eval_sequences": len(eval_idx)}  # fmt: skip
        if mlm:
            t = heldout.compare(p.teacher.model, p.teacher.model, batches, model_mlm=True, cosines=False, **kw)
            res.update(student_mlm_loss=s["mlm_loss"], teacher_mlm_loss=t["mlm_loss"], student_mlm_acc=s["mlm_top1"],
                       teacher_mlm_acc=t["mlm_top1"], student_teacher_kl=s["kl_to_teacher"])  # fmt: skip
        return res

    return evaluate


def run(c, teacher: fd_models.Teacher | None = None, texts=None) -> RunResult:
    """The whole job on every process (torchrun or not); the CLI and the Python API both call this."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # ours is the one bar (not one per weight load / save)
    world, device = fd_dist.setup(c.device)
    c = dataclasses.replace(c, device=device)
    signals = StopOnSignal()  # the whole run: a signal before the loop stops at once, in the loop at a step
    try:
        with use_kernels(c.kernels):
            return _run(c, world, teacher, texts, signals)
    except KeyboardInterrupt:  # a signal outside the training loop, or a second one inside it
        if world.is_main:
            name, out = signals.received or "interrupted", Path(c.dump_path)
            if (out / RUN_MARKER).is_file():
                print(f"\n{name}: stopped at once; {out} keeps its checkpoints (--resume continues)", file=sys.stderr)
            else:
                print(f"\n{name} before the first training step: nothing of this run was kept", file=sys.stderr)
        return RunResult(130, None, None)
    finally:
        signals.restore()
        fd_dist.teardown(world)


def _run(c, world: fd_dist.World, teacher, texts, signals: StopOnSignal) -> RunResult:
    torch.manual_seed(c.seed)
    np.random.seed(c.seed)
    p = prepare(c, world, teacher, texts)
    c = p.c
    torch.manual_seed(c.seed + world.rank)  # dropout differs between processes (DDP syncs the weights)
    train_idx, eval_idx = fd_data.split_train_eval(len(p.seqs), c.eval_fraction, c.seed)
    n_corpus_train = len(train_idx)
    p, train_idx = with_vocabulary_sequences(p, train_idx)
    trainer = Trainer(c, p.student, p.objective, train_data(p, train_idx), p.teacher.tokenizer, world=world,
                      device=c.device, out=p.out, evaluate=evaluation(p, eval_idx), signals=signals)  # fmt: skip
    if c.resume:
        loaded = fd_checkpoint.choose(p.out, c.resume)
        trainer.load_checkpoint(loaded)
        if world.is_main:
            print(f"fastdistil: resuming from {loaded.path} (step {loaded.state['step']})", flush=True)
    elif world.is_main and p.out.is_dir() and any(p.out.iterdir()):  # an earlier run: --force, or never started
        shutil.rmtree(p.out)
    with _forget_if_unstarted(p.out, trainer, world, resumed=bool(c.resume)):
        if world.is_main:
            p.out.mkdir(parents=True, exist_ok=True)
            write_config(p, trainer, len(train_idx), len(eval_idx), world)
            announce(p, trainer, len(train_idx), len(eval_idx), len(train_idx) - n_corpus_train, world)
        world.barrier()
        fit = _fit_or_rescue(p, trainer)
    if fit.stop_reason:
        return RunResult(130 if fit.stop_reason == "interrupted" else 1, p.student, None)
    if not world.is_main:
        world.barrier()  # the first process evaluates and writes the student
        return RunResult(0, p.student, None)
    with signals.deferred():  # the steps are done: saving and the last evaluation finish whatever arrives
        summary = finish(p, trainer, fit.wall_time_s)
    if signals.received:
        print(f"{signals.received} arrived after the last step: the run was completed and saved", file=sys.stderr)
    world.barrier()
    return RunResult(0, p.student, summary)


@contextlib.contextmanager
def _forget_if_unstarted(out: Path, trainer: Trainer, world, resumed: bool):
    """A run stopped by a signal or an error before its first step (and before any checkpoint) leaves nothing
    behind: the same command then starts afresh instead of finding 'a run' in its way."""
    try:
        yield
    except BaseException:
        if world.is_main and not resumed and trainer.step == 0 and out.is_dir() and unstarted_run(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _fit_or_rescue(p: Prepared, trainer: Trainer):
    """fit(); when the checkpoint of a stopped run cannot be written (a full disk), the trained weights are saved
    elsewhere rather than lost."""
    try:
        return trainer.fit()
    except DiskFullError as e:
        raise rescue(p, e) from e


def write_config(p: Prepared, trainer: Trainer, n_train: int, n_eval: int, world) -> None:
    resolved = dataclasses.asdict(p.c)
    resolved.update(teacher_has_mlm_head=p.teacher.has_mlm_head, train_sequences=n_train, eval_sequences=n_eval,
                    total_steps=trainer.plan.total_steps, world_size=world.size)  # fmt: skip
    atomic_write(p.out / "train_config.json", json.dumps(resolved, indent=2, default=str))


def announce(p: Prepared, trainer: Trainer, n_train: int, n_eval: int, n_vocab: int, world) -> None:
    c, teacher = p.c, p.teacher
    head = "" if teacher.has_mlm_head else " (the teacher has no MLM head: hidden states only)"
    terms = " + ".join(f"{w:g} {k}" for k, w in p.objective.weights.items() if w)
    layers = f" {c.student_layers}" if c.student_layers else ""
    s_width, t_width = fd_models.hidden_size(p.student), fd_models.hidden_size(teacher.model)
    init = "--student_pretrained" if c.student_pretrained else "random" if c.student_config else c.student_init
    width = f" x {s_width} wide (the teacher: {t_width}; initialised {init})" if s_width != t_width else ""
    processes = f", {world.size} processes x {c.batch_size} sequences" if world.active else ""
    vocab = f" ({n_vocab} of them vocabulary sequences, --vocab_fraction {c.vocab_fraction:g})" if n_vocab else ""
    print(
        f"fastdistil: teacher {c.teacher} ({fd_models.num_layers(teacher.model)} layers){head} -> student "
        f"{fd_models.num_layers(p.student)} layers{layers}{width}; loss = {terms}; {n_train} training{vocab} / "
        f"{n_eval} held-out sequences; {trainer.plan.total_steps} steps; kernels={c.kernels}, attention={p.attention}, "
        f"precision={c.precision}, device={c.device}{processes}",
        flush=True,
    )


def finish(p: Prepared, trainer: Trainer, wall: float) -> dict:
    """Save the student, evaluate it, write summary.json / summary.md and print the table."""
    out = p.out
    try:
        fd_models.save_student(p.student, p.teacher.tokenizer, out / "student")
    except (OSError, DiskFullError) as e:  # the trained weights must not be lost with the process
        raise rescue(p, e) from e
    after = trainer.evaluate()
    summary = {
        "steps": trainer.step,
        "tokens": trainer.tokens_seen,
        "wall_time_s": wall,
        "tokens_per_s": trainer.tokens_seen / max(wall, 1e-9),
        "peak_mem_mb": peak_memory_mb(p.c.device),
        "before": trainer.before,
        "after": after,
        "student": str(out / "student"),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    table = summary_table(summary, p.teacher.has_mlm_head)
    atomic_write(out / "summary.md", table + "\n")
    print("\n" + table)
    auto = "ModelForMaskedLM" if p.teacher.has_mlm_head else "Model"
    print(f"\nstudent saved to {out / 'student'} (load it with transformers.Auto{auto}.from_pretrained)")
    return summary


def rescue(p: Prepared, error: Exception) -> UsageError:
    """Save the trained student in a fresh temporary directory (usually another file system) after a failed save;
    the error to report says where it went, or that it could not be saved at all."""
    place = Path(tempfile.mkdtemp(prefix="fastdistil-rescued-student-"))
    try:
        p.student.save_pretrained(place, safe_serialization=True)
        p.teacher.tokenizer.save_pretrained(place)
    except OSError as again:
        shutil.rmtree(place, ignore_errors=True)
        return UsageError(f"{error}; saving the trained student elsewhere failed too ({again}): free some space and "
                          "--resume from the last checkpoint")  # fmt: skip
    return UsageError(f"{error}; the trained student was saved to {place} instead")


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_table(s: dict, mlm: bool) -> str:
    rows = [("held-out embedding cosine to teacher", "embedding_cosine"), ("held-out token cosine to teacher",
            "token_cosine"), ("held-out pairwise-similarity Spearman", "pairwise_spearman")]  # fmt: skip
    if mlm:
        rows += [("student MLM loss", "student_mlm_loss"), ("student MLM top-1 accuracy", "student_mlm_acc"),
                 ("student-teacher KL (T=1, masked tokens)", "student_teacher_kl")]  # fmt: skip
    lines = ["| metric | before | after |", "|---|---|---|"]
    lines += [f"| {label} | {_cell(s['before'].get(k))} | {_cell(s['after'].get(k))} |" for label, k in rows]
    if mlm:
        lines += [f"| teacher MLM loss | {s['after']['teacher_mlm_loss']:.4f} | |",
                  f"| teacher MLM top-1 accuracy | {s['after']['teacher_mlm_acc']:.4f} | |"]  # fmt: skip
    lines += [
        f"\n{s['steps']} steps, {s['tokens']} tokens in {s['wall_time_s']:.0f} s "
        f"({s['tokens_per_s']:.0f} tokens/s), peak memory {s['peak_mem_mb']:.0f} MB"
    ]
    return "\n".join(lines)
