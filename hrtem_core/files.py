"""Atomic file writes: a reader never sees a half-written file, and a killed writer leaves no truncated one."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before the rename: ``<name>.<pid>.partial`` beside it (cleaned up on resume)."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


@contextmanager
def atomic_writer(path: str | Path):
    """An open binary file that becomes ``path`` (fsynced, renamed) only if the block completes."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as fh:
        fh.write(data)
