"""Seed streams.

Every random draw of a sample comes from a generator keyed by (dataset seed, structure index, imaging variant,
parameter name). Keying by name keeps parameters independent: changing the distribution of one (say the dose) does not
change the draws of any other, so two datasets that differ in one recipe value share everything else — the
controlled comparison a curation study needs. Nothing here depends on which process or machine does the work.
"""

from __future__ import annotations

import zlib

import numpy as np

STRUCTURE_VARIANT = -1  # imaging variants are 0, 1, ...; structure-level draws use this slot


class Streams:
    def __init__(self, seed: int, structure_index: int, variant: int = STRUCTURE_VARIANT):
        self.seed = int(seed)
        self.structure_index = int(structure_index)
        self.variant = int(variant)

    def rng(self, name: str) -> np.random.Generator:
        # offsets keep the slot values -1 (dataset-level, structure-level) non-negative, as SeedSequence requires
        entropy = [self.seed, self.structure_index + 1, self.variant + 1, zlib.crc32(name.encode())]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))

    def int_seed(self, name: str) -> int:
        """A 32-bit seed, for libraries that only take one (czone's use of numpy's global RNG)."""
        return int(self.rng(name).integers(0, 2**32 - 1))

    def for_variant(self, variant: int) -> "Streams":
        return Streams(self.seed, self.structure_index, variant)
