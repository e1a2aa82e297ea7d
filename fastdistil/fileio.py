"""Crash-safe file writes: a crash or kill -9 at any moment leaves either the old file (or directory) whole or
the new one, never a part of either."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then `path` itself."""
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(final: Path, data: str | bytes) -> None:
    """Write a whole file so that a crash leaves either the old file or the new one, never a part: a hidden
    temporary file beside it, fsynced, renamed over it, then the directory fsynced."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a hidden temporary directory beside `final` to write into. When the block ends without an error,
    every file in it is fsynced, it replaces `final` by a rename, and the parent is fsynced: a crash at any
    earlier moment leaves `final` as it was and only a `.<name>.tmp` directory behind."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
