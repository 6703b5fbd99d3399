"""The substrate bank's exit waves: each block's plane-wave exit waves at a few depths (checkpoints), computed once
per dataset by the fast engine so that a structure's full scene starts from them (see ``fast``).

The waves are physics (a pure function of recipe and dataset seed); where they are kept is the caller's choice: an
``ArrayCache`` passed in (the pipeline's, filled by the driver before workers start) or memory.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from ..distributions import bounds
from ..recipe import Simulation
from ..structures import SubstrateBank, grid_points
from .backend import atoms_in_cell, slice_labels, slice_thicknesses
from .device import resolve_device
from .fast import FAST_ENGINE_VERSION, FastEngine, SlicedAtoms, WaveBatch

WAVE_BANK_BUDGET_BYTES = 2 * 2**30
"""Largest size of one dataset's substrate exit-wave bank: checkpoints are spaced so the bank fits (fixed, so that
the checkpoint depths, and with them the last bits of the results, depend on the recipe only)."""


class SubstrateWaves:
    """A bank's substrate blocks' exit waves at the checkpoint depths, per block: (checkpoint, config, x, y).

    A checkpoint ``c`` holds the wave entering slice ``c`` of a block placed at the scene's depth (under the scene's
    vacuum), with the block's phonon configurations. Kept in ``cache`` where one is given (an ``ArrayCache``: files
    that worker processes memory-map, sharing one copy through the page cache), else in memory."""

    def __init__(self, engine: FastEngine, bank: SubstrateBank, sim: Simulation, cache=None):
        r = bank.recipe
        self.engine, self.bank, self.sim, self.cache = engine, bank, sim, cache
        self.n_configs = sim.n_phonons
        self.vacuum_A = r.structure.cell.vacuum_A
        depth = self.vacuum_A + bank.max_thickness + self.vacuum_A
        self.thicknesses = slice_thicknesses(depth, sim.slice_thickness_A)
        dz = sim.slice_thickness_A
        lo_t = max(bounds(r.structure.substrate.thickness_A)[0], 0.0)
        p = r.structure.particle
        embed = bounds(p.embed_A)[1] if p.kind != "none" else 0.0
        # the shallowest depth where a structure can differ from the bare block: its thinnest cut, less the carbon
        # removed around an embedded particle, less a margin for thermal displacements
        first = math.floor((self.vacuum_A + lo_t - embed - r.structure.substrate.min_distance_A - 1.0) / dz)
        last = min(math.floor((self.vacuum_A + bank.max_thickness) / dz), len(self.thicknesses) - 1)
        first = min(max(first, 1), last)
        per_checkpoint = r.structure.substrate.bank_size * self.n_configs * engine.gpts**2 * 8
        step = max(1, math.ceil((last - first + 1) * per_checkpoint / WAVE_BANK_BUDGET_BYTES))
        self.checkpoints = list(range(last, first - 1, -step))[::-1] if last >= 1 else []
        self._waves: dict[int, np.ndarray] = {}
        self._labels: dict[int, list[np.ndarray]] = {}

    def _block_atoms(self, index: int):
        block = self.bank.block(index).copy()
        block[:, 2] += self.vacuum_A
        return block, self.bank.displacements(index, self.n_configs, self.sim.phonon_sigma_A)

    def _cell(self):
        return (self.bank.extent, self.bank.extent, float(sum(self.thicknesses)))

    def labels(self, index: int) -> list[np.ndarray]:
        """Slice index of every block atom (per configuration) where the bank put it."""
        if index not in self._labels:
            block, disp = self._block_atoms(index)
            self._labels[index] = [slice_labels(atoms_in_cell(block + d, self._cell())[:, 2], self.thicknesses)
                                   for d in disp]
        return self._labels[index]

    def first_difference(self, placement, displacements: np.ndarray, cell_A, thicknesses) -> int:
        """First slice in which the placed substrate differs from the bank's block: a block atom left out (the cut
        at the scene's thickness, carbon removed around the particle), or a placed atom that the scene's cell puts in
        another slice than the block's (only possible near the ends of the cells, which differ in depth)."""
        first = len(thicknesses)
        left_out = np.ones(len(self.bank.block(placement.index)), bool)
        left_out[placement.atoms] = False
        block, disp = self._block_atoms(placement.index)
        for i, block_labels in enumerate(self.labels(placement.index)):
            if left_out.any():
                first = min(first, int(block_labels[left_out].min()))
            # the scene's own positions differ from the block's by the placement only, which leaves z unchanged
            z = block[placement.atoms, 2] + disp[i, placement.atoms, 2]
            pos = np.zeros((len(z), 3))
            pos[:, 2] = z
            scene_labels = slice_labels(atoms_in_cell(pos, cell_A)[:, 2], thicknesses)
            mine = block_labels[placement.atoms]
            moved = scene_labels != mine
            if moved.any():
                first = min(first, int(np.minimum(scene_labels[moved], mine[moved]).min()))
        return first

    def start(self, index: int, limit: int):
        """(depth, waves) of the deepest checkpoint at or above slice ``limit``; depth 0 (and no waves) if none."""
        usable = [c for c in self.checkpoints if c <= limit]
        if not usable:  # (also where the substrate is too thin for any checkpoint)
            return 0, None
        c = usable[-1]
        return c, np.asarray(self.waves(index)[self.checkpoints.index(c)])

    def cache_name(self, index: int) -> str:
        """Name of block ``index``'s waves in the cache: a hash of everything their bits depend on."""
        e = self.engine
        text = repr((self.bank.key(index), e.energy, e.sampling, e.gpts, self.sim.parametrization,
                     self.sim.slice_thickness_A, self.vacuum_A, self.n_configs, self.sim.phonon_sigma_A,
                     self.checkpoints, e.device, self.engine_version()))
        return f"waves-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    @staticmethod
    def engine_version() -> str:
        import abtem
        import scipy

        return f"fast engine {FAST_ENGINE_VERSION}, abtem {abtem.__version__}, scipy {scipy.__version__}, " \
               f"numpy {np.__version__}"

    def waves(self, index: int) -> np.ndarray:
        if index not in self._waves:
            shape = (len(self.checkpoints), self.n_configs, self.engine.gpts, self.engine.gpts)
            if self.cache is None:
                self._waves[index] = self.compute(index, np.empty(shape, np.complex64))
            else:  # (computed straight into the cache's file, so the bank never needs to fit in memory)
                self._waves[index] = self.cache.get_or_fill(self.cache_name(index), shape, np.complex64,
                                                            lambda out: self.compute(index, out))
        return self._waves[index]

    def compute(self, index: int, out: np.ndarray) -> np.ndarray:
        """Multislice of the bare block (all its phonon configurations at once), kept at the checkpoints in ``out``
        (checkpoint, config, x, y)."""
        e = self.engine
        block, disp = self._block_atoms(index)
        numbers = np.full(len(block), _substrate_number(self.bank))
        group = SlicedAtoms(block, numbers, disp, self._cell(), self.thicknesses, e.sampling)
        wave = WaveBatch(e)
        for j in range(self.checkpoints[-1]):
            if group.occupied[j]:
                wave.transmit(e.transmission(e.potential_spectrum(group, j), self.n_configs), self.thicknesses[j])
            else:
                wave.vacuum(self.thicknesses[j])
            if j + 1 in self.checkpoints:
                a = wave.result(self.n_configs, e.gpts)
                out[self.checkpoints.index(j + 1)] = a if e.xp is np else e.xp.asnumpy(a)
        return out


def _substrate_number(bank: SubstrateBank) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[bank.s.element]


def warm_substrate_waves(bank: SubstrateBank, cache) -> None:
    """Compute every block's waves into ``cache`` (fast engine only; called by the driver before workers start, which
    then read them from the cache)."""
    sim = bank.recipe.simulation
    if sim.backend != "abtem" or sim.engine != "fast" or cache is None or bank.max_thickness <= 0:
        return
    gpts = grid_points(bank.extent, sim.sampling_A)
    engine = FastEngine(sim.energy_eV, sim.parametrization, bank.extent, gpts, resolve_device(sim.device))
    waves = SubstrateWaves(engine, bank, sim, cache)
    for i in range(bank.s.bank_size):
        waves.waves(i)
