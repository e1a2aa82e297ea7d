"""Crash-safe training checkpoints: everything needed to continue a run as if it had not stopped.

A checkpoint is a directory <dump_path>/checkpoints/step-N holding the student (save_pretrained: safetensors,
config, tokenizer) and trainer_state.pt (optimizer, scheduler, GradScaler, step, epoch, position in the epoch's
batch order, every RNG state). It is written into a hidden temporary directory, every file is fsynced, a
COMPLETE marker is written, and only then is the directory renamed into place (and its parent fsynced):
a crash or kill -9 at any moment leaves either the previous checkpoints alone or a new complete one.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdistil.errors import UsageError, first_line
from fastdistil.fileio import atomic_directory
from fastdistil.models import tied_keys

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(UsageError):
    """A checkpoint that cannot be used (names the file)."""


def rng_states(mask_generator: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "mask": mask_generator.get_state(),
    }


def restore_rng_states(states: dict, mask_generator: torch.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    mask_generator.set_state(states["mask"])


def save(run_dir: Path, step: int, student, tokenizer, trainer_state: dict, keep: int = 0) -> Path:
    """Write checkpoint step-<step> atomically; keep only the newest `keep` complete ones (0 = all)."""
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    with atomic_directory(final, marker=MARKER) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        (tmp / MARKER).write_text(f"step {step}\n")
    if keep > 0:
        for old in complete(run_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, newest first (half-written ones, without the marker, are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


@dataclass
class Loaded:
    """A checkpoint read whole: every file that resuming needs, checked before anything is applied."""

    path: Path
    state: dict  # trainer_state.pt
    weights: dict  # model.safetensors


def _unreadable(f: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{f} is unreadable ({type(e).__name__}: {first_line(e, 160)})")


def load_state(path: Path) -> dict:
    """trainer_state.pt of a checkpoint, with a clear error naming the file when it is missing or corrupt."""
    f = Path(path) / STATE_FILE
    if not (Path(path) / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:
        raise _unreadable(f, e) from e
    for key in ("step", "epoch", "batch_in_epoch", "optimizer", "scheduler", "rng"):
        if key not in state:
            raise CheckpointError(f"{f} has no {key!r}: not a checkpoint of this trainer")
    return state


def read_weights(path: Path) -> dict:
    """model.safetensors of a checkpoint (every tensor read, so a truncated or damaged file is found here)."""
    from safetensors.torch import load_file

    f = Path(path) / "model.safetensors"
    try:
        return load_file(f)
    except Exception as e:
        raise _unreadable(f, e) from e


def load(path: Path) -> Loaded:
    return Loaded(Path(path), load_state(path), read_weights(path))


def apply_weights(loaded: Loaded, student) -> None:
    """Copy a checkpoint's weights into `student` (same architecture), with a clear error naming the file."""
    missing, unexpected = student.load_state_dict(loaded.weights, strict=False)
    missing = [k for k in missing if k not in tied_keys(student)]
    if missing or unexpected:
        f = loaded.path / "model.safetensors"
        raise CheckpointError(f"{f} does not match the student: missing {missing[:3]}, unexpected {unexpected[:3]}")
    student.tie_weights()


def choose(run_dir: Path, resume: str) -> Loaded:
    """The checkpoint --resume continues from, read whole: PATH, or ("latest") the newest complete one whose
    every file reads (an unreadable file is reported by name, and the previous checkpoint is tried)."""
    if resume != "latest":
        path = Path(resume)
        try:
            return load(path)
        except CheckpointError as e:
            raise CheckpointError(f"--resume {path}: {e}") from e
    candidates = complete(run_dir)
    if not candidates:
        raise CheckpointError(f"--resume: {run_dir} has no complete checkpoint")
    for i, path in enumerate(candidates):
        try:
            return load(path)
        except CheckpointError as e:
            fallback = f"; falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else ""
            print(f"warning: checkpoint {e}{fallback}", file=sys.stderr)
    raise CheckpointError(f"--resume: no checkpoint of {run_dir} is readable")
