"""A folder of arrays computed once per dataset and shared by the processes that make it: the substrate bank's
blocks (``structures.SubstrateBank``) and their exit waves (``simulate.substrate_waves``).

The pipeline makes one per dataset (in its ``.progress`` folder) and passes it to the physics code, which takes "a
cache or None" and never touches the disk itself. Arrays are .npy files named by the caller's key (a hash of
everything their bits depend on), written atomically: a reader sees a whole file or none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from hrtem_core.files import atomic_writer, partial_path


class ArrayCache:
    """Arrays by name in ``folder`` (``<name>.npy``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

    def get(self, name: str) -> np.ndarray | None:
        """The stored array, read into memory; None if there is none."""
        path = self.path(name)
        return np.load(path) if path.exists() else None

    def put(self, name: str, array: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_writer(self.path(name)) as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)

    def get_or_fill(self, name: str, shape: tuple[int, ...], dtype, fill: Callable[[np.ndarray], object]) -> np.ndarray:
        """The stored array, memory-mapped read-only (processes share one copy through the page cache). If missing,
        ``fill(out)`` first writes it into ``out``, a memory map of a new file renamed into place when complete, so
        a large array is never held in memory whole."""
        path = self.path(name)
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = partial_path(path)
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            fill(out)
            out.flush()
            del out
            os.replace(tmp, path)
        return np.load(path, mmap_mode="r")
