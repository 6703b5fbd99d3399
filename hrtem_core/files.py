"""Atomic file writes: a reader never sees a half-written file, and a killed writer leaves no truncated one; a folder
of outputs appears whole or not at all (:func:`staged_folder`)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


CACHE_ENV = "HRTEM_CACHE_DIR"


def cache_dir() -> Path | None:
    """This user's cache folder for the platform: ``$HRTEM_CACHE_DIR``, else ``~/.cache/hrtem-curation`` (None when
    there is no home folder). Not created here."""
    folder = os.environ.get(CACHE_ENV)
    if folder:
        return Path(folder).expanduser()
    try:
        return Path.home() / ".cache" / "hrtem-curation"
    except RuntimeError:  # no HOME, no passwd entry
        return None


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


def check_output_folder(out: str | Path, what: str) -> Path:
    """``out`` if a folder can be written there (it is a folder, or nothing yet below a folder); else InputError
    ``<what>: <out>: <why>; ...``. Creates nothing."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        kind = "is a file" if out.is_file() else "exists and is not a folder"
        raise InputError(f"{what}: {out}: {kind}; give a folder (a new one, or an existing one to add the outputs to)")
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise InputError(f"{what}: {out}: {base} is a file, not a folder; give a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{what}: {out}: {base} is not writable; give a folder you may write to")
    return out


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as a file or a folder)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


@contextmanager
def staged_folder(out: str | Path):
    """A fresh, hidden folder to write outputs into; they appear in ``out`` only once the block completes.

    A new ``out`` is written as ``.<name>.<pid>.partial`` beside it (beside its nearest existing ancestor when its
    parents do not exist yet) and renamed into place at the end: one atomic rename, missing parents created only then.
    An existing folder ``out`` gets a ``.<pid>.partial`` folder inside it, whose files are then moved up one by one
    (each rename atomic; same-named files in ``out`` are replaced). If the block raises (bad input found late, a full
    disk, Ctrl-C), the staging folder is deleted and ``out`` is as it was. Check ``out`` first with
    :func:`check_output_folder`. A killed process leaves its staging folder behind (named by its pid).
    """
    out = Path(out)
    existing = out.is_dir()
    stage = out / f".{os.getpid()}.partial" if existing else \
        _existing_ancestor(out.parent) / f".{out.name}.{os.getpid()}.partial"
    shutil.rmtree(stage, ignore_errors=True)  # only a dead process with this pid can have left one
    stage.mkdir()
    made: list[Path] = []
    try:
        yield stage
        if existing:
            for item in sorted(stage.iterdir()):
                os.replace(item, out / item.name)
            stage.rmdir()
        else:
            for d in [p for p in Path(os.path.abspath(out)).parents if not p.exists()][::-1]:
                d.mkdir()
                made.append(d)
            # an empty folder that appeared meanwhile is replaced; a non-empty one makes this fail (nothing mixed)
            os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                break
        raise
