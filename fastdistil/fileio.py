"""Crash-safe file writes: a crash or kill -9 at any moment leaves either the old file (or directory) whole or
the new one, never a part of either."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from fastdistil.errors import UsageError


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
    temporary file beside it, fsynced, renamed over it, then the directory fsynced. A full disk is a
    DiskFullError (the old file stays whole, the temporary one is removed)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_full(final, len(payload), e) if _is_disk_full(e) else e
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_directory(final: Path, *, marker: str | None = None, expected_bytes: int | None = None):
    """Yield a hidden temporary directory beside `final` to write into. When the block ends without an error,
    every file in it is fsynced, it replaces `final` by a rename, and the parent is fsynced: a crash at any
    earlier moment leaves `final` as it was and only a `.<name>.tmp` directory behind.

    `final` is replaced only when it is empty or holds `marker` (an artefact of ours); anything else is refused
    (UsageError), never deleted. A full disk while writing removes the temporary directory and is a
    DiskFullError naming the path and the space needed (`expected_bytes`, else what was written by then)."""
    final = Path(final)
    if not replaceable(final, marker):
        raise UsageError(f"{final} holds files that are not a fastdistil output (no {marker}); it is not replaced")
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
    except OSError as e:
        written = tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full(final, expected_bytes or written, e) if _is_disk_full(e) else e
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


# ---------------------------------------------------------------------------------------------------------
# Destinations: what a writer may replace, and a full disk said in one line


class DiskFullError(UsageError):
    """A write failed for lack of space (names the path, the space needed and the space free)."""


def _is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_full(path: Path, needed_bytes: int | None, e: OSError) -> DiskFullError:
    free = shutil.disk_usage(_nearest_existing(Path(path).parent)).free
    need = f"about {_size(needed_bytes)} needed, " if needed_bytes else ""
    return DiskFullError(f"cannot write {path}: no space left on device ({need}{_size(free)} free there)")


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{max(1, round(n / 2**10))} KB"


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` is a directory this process can write into."""
    path = Path(path)
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write into {parent} (permission denied)")


def check_destination(final: Path, flag: str, *, marker: str, inputs: tuple = ()) -> None:
    """Before any long work: `final` may receive an artefact of ours only when it is missing, an empty directory,
    or a directory holding `marker` (an earlier artefact of ours); never a regular file, anything else, or a
    directory that is or contains one of `inputs`. Otherwise one UsageError."""
    final = Path(final)
    check_writable_parent(final, flag)
    for given in inputs:
        src, dst = Path(given).resolve(), final.resolve()
        if src == dst:
            raise UsageError(f"{flag} must differ from the input {given} (it is read, and kept)")
        if dst in src.parents:
            raise UsageError(f"{flag} {final} holds the input {given}; write the output somewhere else")
    if final.exists() and not final.is_dir():
        raise UsageError(f"{flag} {final} is a file; give a directory to write into")
    if not replaceable(final, marker):
        raise UsageError(
            f"{flag} {final} is not empty and holds no fastdistil output (no {marker}); nothing of it is replaced: "
            "choose another directory"
        )


def replaceable(final: Path, marker: str | None) -> bool:
    """Missing, empty, or holding `marker`: a directory fastdistil may replace."""
    final = Path(final)
    if not final.exists():
        return True
    if not final.is_dir():
        return False
    return not any(final.iterdir()) or (marker is not None and (final / marker).exists())
