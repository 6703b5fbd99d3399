"""The sha256 of shard files already read, by (absolute path, size, mtime_ns): verified reads without re-hashing.

Training checks every shard it reads against the sha256 its manifest records (``hrtem_core.dataset.iter_shard``).
Hashing a shard costs a full read of it; this cache remembers the digest of a local file for as long as its size and
``mtime_ns`` stay what they were when it was hashed, so an unchanged dataset is hashed once, not on every run. What
is remembered is the digest of the file as found, not a verdict: a changed file has another size or mtime and is
hashed again, and a cached digest that differs from the manifest's is refused like a freshly computed one.

It lives in a cache folder, never beside the data (a dataset may be read-only, or on object storage, where nothing
is cached): ``$HRTEM_CACHE_DIR/shard-hashes.json``, else ``~/.cache/hrtem-curation/shard-hashes.json``. The caller
creates the cache and hands it to the reader (``ShardHashCache.default()``, or ``ShardHashCache(None)`` for one that
is kept in memory only) and saves it when done.

The file is ``{"version": 1, "files": {absolute path: {"size": int, "mtime_ns": int, "sha256": hex}}}``, replaced
atomically (``hrtem_core.files``). Saving merges this process's new digests into what the file holds at that moment,
drops the entries of files that are gone or changed, and renames; two processes that save at once each write a
whole, valid file, and the last rename wins (what is lost is at most a digest, that is one more hash later). A file
that cannot be read or parsed, or an entry of the wrong shape, is ignored; a cache folder that cannot be written
is not an error: the cache is only ever an optimisation.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from .files import CACHE_ENV, cache_dir, write_atomic

FILE_NAME = "shard-hashes.json"
VERSION = 1
ENV = CACHE_ENV
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SAVE = threading.Lock()  # atomic writes name their temporary file by pid: one saver per process at a time


def default_path() -> Path | None:
    """``$HRTEM_CACHE_DIR/shard-hashes.json``, else ``~/.cache/hrtem-curation/shard-hashes.json`` (None when there
    is no home folder to put it in)."""
    folder = cache_dir()
    return None if folder is None else folder / FILE_NAME


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(path)


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and bool(_HEX64.fullmatch(entry["sha256"]))
            and all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) for k in ("size", "mtime_ns")))


def _read(path: Path | None) -> dict[str, dict]:
    """The valid entries of a cache file; {} for a missing, unreadable or corrupt one."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == VERSION else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and _valid(v)}


def _stat_matches(path: str, entry: dict) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == entry["size"] and st.st_mtime_ns == entry["mtime_ns"]


class ShardHashCache:
    """Digests of local files by (absolute path, size, mtime_ns); ``path`` is the JSON file (None: memory only)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self._entries = _read(self.path)
        self._new: dict[str, dict] = {}
        self._lock = threading.Lock()

    @classmethod
    def default(cls) -> ShardHashCache:
        return cls(default_path())

    def lookup(self, path: str | os.PathLike, st: os.stat_result) -> str | None:
        """The sha256 recorded for ``path`` if it was hashed with this size and mtime_ns (``st``), else None."""
        with self._lock:
            entry = self._entries.get(_key(path))
        if entry is not None and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
            return entry["sha256"]
        return None

    def record(self, path: str | os.PathLike, st: os.stat_result, sha256: str) -> None:
        """Remember the digest of ``path`` as it was when ``st`` was taken (before it was read)."""
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
        with self._lock:
            self._entries[_key(path)] = self._new[_key(path)] = entry

    def save(self) -> None:
        """Merge the digests recorded since the last save into the file (see the module docstring); never raises
        for the file or its folder."""
        with self._lock:
            new, self._new = self._new, {}
        if self.path is None or not new:
            return
        with _SAVE:
            merged = {**_read(self.path), **new}
            merged = {k: v for k, v in merged.items() if _stat_matches(k, v)}  # gone or changed since: dropped
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self.path, json.dumps({"version": VERSION, "files": merged}, sort_keys=True).encode())
            except OSError:
                return
        with self._lock:
            self._entries.update(merged)
