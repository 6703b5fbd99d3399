"""Stage 2, simulate: plane-wave multislice exit waves of a scene, with frozen phonons.

Both the full scene and the particle-only scene are simulated on the identical grid and slicing; the particle atoms are
displaced identically in both (the displacements are drawn here, from the sample's seed stream, not by the backend),
so the mask is made from exactly the particle that is imaged.

The abTEM backend has two engines (``simulation.engine``): ``plain`` runs abTEM's ``Potential`` and
``PlaneWave.multislice`` on each scene from scratch; ``fast`` (the default, :class:`FastEngine`) runs the same
multislice, built from abTEM's own functions, once for both scenes, starting the full scene from the substrate bank's
stored exit waves. Both give the same waves to rounding (~1e-6 relative; tests/test_simulate_fast.py).

Exit waves are returned as complex64 arrays ``[phonon, row, col]`` (rows along y), i.e. already in the image
convention of DESIGN.md; each backend (abTEM and Prismatic both index ``(x, y)``) transposes its own output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .recipe import Simulation
from .seeding import Streams
from .structures import Scene, grid_points  # noqa: F401  (grid_points is part of this module's API)


def electron_wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength in Å."""
    m0c2 = 510998.95  # eV
    hc = 12398.419843320026  # eV Å
    return hc / math.sqrt(energy_eV * (2 * m0c2 + energy_eV))


@dataclass
class ExitWaves:
    full: np.ndarray  # complex64 [phonon, row, col]
    particle: np.ndarray | None  # same grid; None where the scene has no particle
    sampling_A: float
    metadata: dict


def slice_thicknesses(depth_A: float, slice_thickness_A: float) -> tuple[float, ...]:
    """Slices of the scene along the beam, in Å: whole slices of ``slice_thickness_A`` from the entrance face, the last
    one taking what is left. Slice boundaries therefore sit at the same depths in every scene of a dataset whatever
    its depth, which lets the substrate's slices be computed once for the dataset (both engines use this slicing)."""
    n = max(1, math.ceil(depth_A / slice_thickness_A - 1e-9))
    return (float(slice_thickness_A),) * (n - 1) + (float(depth_A - (n - 1) * slice_thickness_A),)


def phonon_displacements(scene: Scene, sim: Simulation, streams: Streams) -> np.ndarray:
    """Frozen-phonon displacements (phonon, atom, xyz) in Å, Gaussian with std ``phonon_sigma_A`` per axis.

    Substrate atoms placed from the substrate bank take their block's own configuration ``i`` for phonon ``i``,
    turned with the block (see ``structures.SubstrateBank``); every other atom gets fresh draws from the sample's seed
    stream."""
    n, sigma = sim.n_phonons, sim.phonon_sigma_A
    out = np.zeros((n, len(scene.numbers), 3))
    placed = np.zeros(len(scene.numbers), bool)
    p = scene.substrate
    if p is not None and len(p.atoms):
        placed = ~scene.is_particle
        d = p.bank.displacements(p.index, n, sigma)[:, p.atoms]
        d[..., :2] = p.rotate_vectors(d[..., :2])
        out[:, placed] = d
    fresh = ~placed
    if sigma > 0 and fresh.any():
        out[:, fresh] = streams.rng("simulation.phonons").normal(0.0, sigma, size=(n, int(fresh.sum()), 3))
    return out


def resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    has_cupy = importlib.util.find_spec("cupy") is not None
    if device == "gpu":
        if not has_cupy:
            raise RuntimeError("simulation.device=gpu needs CuPy (pip install cupy-cuda12x) and a CUDA GPU")
        return "gpu"
    if has_cupy:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                return "gpu"
        except Exception:  # no driver or no device: the CPU it is
            pass
    return "cpu"


class Backend:
    name = "base"

    def exit_waves(self, scene: Scene, displacements: np.ndarray, sim: Simulation, gpts: int,
                   device: str) -> np.ndarray:
        """complex64 [phonon, row, col] exit waves of ``scene`` with its atoms displaced per phonon."""
        raise NotImplementedError

    def versions(self) -> dict:
        return {}


def _atoms_in_cell(positions: np.ndarray, cell_A) -> np.ndarray:
    """Positions wrapped into the cell the way abTEM does before slicing (``abtem.atoms._wrap_and_snap_atoms``)."""
    cell = np.asarray(cell_A, float)
    if np.all((positions >= 0.0) & (positions < cell - 1e-10)):
        return positions
    positions = np.mod(positions, cell)
    for ax in range(3):
        positions[positions[:, ax] > cell[ax] - 1e-10, ax] = 0.0
        positions[np.abs(positions[:, ax]) < 1e-10, ax] = 0.0
    return positions


def slice_labels(z_A: np.ndarray, thicknesses: tuple[float, ...]) -> np.ndarray:
    """Slice index of atoms at depths ``z_A`` (already in the cell), as abTEM's ``SliceIndexedAtoms`` assigns it."""
    edges = np.array(thicknesses).cumsum() - 1e-12
    return np.digitize(z_A, edges)


class AbtemBackend(Backend):
    """abTEM multislice: ``exit_waves`` is plain abTEM (one scene from scratch), ``scene_exit_waves`` the fast engine
    (both scenes at once, :class:`FastEngine`). abTEM's FFTW is planned with FFTW_ESTIMATE: FFTW_MEASURE makes the
    last bits vary between runs."""

    name = "abtem"

    def __init__(self):
        import abtem

        self.abtem = abtem
        abtem.config.set({"fftw.planning_effort": "FFTW_ESTIMATE", "diagnostics.progress_bar": False,
                          "fftw.threads": 1})
        self._engines: dict[tuple, FastEngine] = {}

    def versions(self):
        return {"abtem": self.abtem.__version__}

    def exit_waves(self, scene, displacements, sim, gpts, device):
        import ase

        abtem = self.abtem
        n_phonons = displacements.shape[0]
        if len(scene.numbers) == 0:
            return np.ones((n_phonons, gpts, gpts), np.complex64)
        configs = [
            ase.Atoms(numbers=scene.numbers, positions=scene.positions + displacements[i], cell=scene.cell_A,
                      pbc=(True, True, False))
            for i in range(n_phonons)
        ]
        from abtem.inelastic.phonons import AtomsEnsemble

        ensemble = AtomsEnsemble(configs, ensemble_mean=False)
        potential = abtem.Potential(
            ensemble, gpts=(gpts, gpts), slice_thickness=slice_thicknesses(scene.cell_A[2], sim.slice_thickness_A),
            parametrization=sim.parametrization, projection="infinite", device=device,
        )
        wave = abtem.PlaneWave(energy=sim.energy_eV, normalize=False, device=device)
        with warnings.catch_warnings():
            # we want every configuration's wave (the mask votes over them); abTEM warns that this is unusual
            warnings.filterwarnings("ignore", message="ensemble_mean=False")
            exit_wave = wave.multislice(potential).compute(scheduler="synchronous", progress_bar=False)
        array = exit_wave.to_cpu().array if device == "gpu" else exit_wave.array
        array = np.asarray(array, np.complex64).reshape(n_phonons, gpts, gpts)
        return np.ascontiguousarray(np.swapaxes(array, -1, -2))  # abTEM is (x, y); we are [row=y, col=x]

    def engine(self, sim: Simulation, extent_A: float, gpts: int, device: str) -> "FastEngine":
        key = (sim.energy_eV, sim.parametrization, extent_A, gpts, device)
        if key not in self._engines:
            self._engines[key] = FastEngine(sim.energy_eV, sim.parametrization, extent_A, gpts, device)
        return self._engines[key]

    def scene_exit_waves(self, scene: Scene, displacements: np.ndarray, sim: Simulation, gpts: int,
                         device: str) -> tuple[np.ndarray, np.ndarray | None]:
        """complex64 [phonon, row, col] exit waves of the full scene and of its particle alone (None without one)."""
        engine = self.engine(sim, scene.cell_A[0], gpts, device)
        full, particle = engine.scene_exit_waves(scene, displacements, sim)
        to_image = lambda a: None if a is None else np.ascontiguousarray(np.swapaxes(a, -1, -2))  # noqa: E731
        return to_image(full), to_image(particle)


# ------------------------------------------------------------------------------------------------- fast engine
#
# The same multislice as abTEM's (its projected-potential integrals, transmission function, antialias aperture and
# Fresnel propagator, built by abTEM's own functions), run as one tight loop over a batch of phonon configurations
# and arranged so that nothing is computed twice:
#
# * Both scenes at once. Below the substrate the two scenes hold the same atoms, so a slice's projected potential
#   and band-limited transmission function serve both; the particle-only wave starts at the first slice that holds
#   a particle atom (a plane wave crosses vacuum unchanged) and leading vacuum is skipped in the full scene too.
# * The substrate once per dataset. A placed block is the bank's block moved by an operation that maps the grid onto
#   itself (whole-pixel shift, quarter turn, mirror; ``structures.SubstratePlacement``). Potentials, the aperture and
#   the propagator are invariant under these, so the exit wave of a plane wave through the placed block is the block's
#   own exit wave, moved. The bank keeps each block's waves (per phonon configuration) at a few depths
#   (checkpoints); a structure starts from the deepest checkpoint above the first slice where its scene differs from
#   the bare block (the cut at its thickness, the carbon removed around an embedded particle, the particle), and only
#   the slices from there on are computed.
# * Vacuum slices after the last atoms are merged into one propagation (Fresnel propagators compose).
# * FFTs by scipy.fft (pocketfft): deterministic (no timing-based planning), and as fast as FFTW_ESTIMATE at 640²
#   and faster at 1280²; real-to-complex transforms for the (real) projected potentials.
#
# Results equal plain abTEM's to rounding (tests/test_simulate_fast.py, benchmarks); they are bit-for-bit
# reproducible for a given recipe, seed and machine, because the checkpoint depths are a function of the recipe only.

FAST_ENGINE_VERSION = 1
"""Part of the key of stored substrate waves: raise it when a change to the engine changes its results' bits."""

WAVE_BANK_BUDGET_BYTES = 2 * 2**30
"""Largest size of one dataset's substrate exit-wave bank: checkpoints are spaced so the bank fits (fixed, so that
the checkpoint depths, and with them the last bits of the results, depend on the recipe only)."""


def _fft_functions(xp):
    if xp is np:
        import scipy.fft as sfft

        kw = {"workers": 1, "overwrite_x": True}
    else:  # CuPy
        import cupyx.scipy.fft as sfft

        kw = {"overwrite_x": True}
    return (lambda a: sfft.fft2(a, axes=(-2, -1), **kw), lambda a: sfft.ifft2(a, axes=(-2, -1), **kw),
            lambda a: sfft.rfft2(a, axes=(-2, -1), **kw),
            lambda a, n: sfft.irfft2(a, s=(n, n), axes=(-2, -1), **kw))


_EXP_KERNEL = None


def _exp_i_sigma_unpacked(packed: np.ndarray, sigma: np.float32, out: np.ndarray) -> None:
    """``out[2m] = exp(i sigma Re packed[m])``, ``out[2m + 1] = exp(i sigma Im packed[m])`` in float32, as abTEM's
    ``complex_exponential(sigma * V)`` computes it, in one pass (numba)."""
    global _EXP_KERNEL
    if _EXP_KERNEL is None:
        import numba

        @numba.njit(nogil=True, cache=False)
        def kernel(packed, sigma, out):
            n_out = out.shape[0]
            flat = out.reshape(n_out, -1)
            for m in range(packed.shape[0]):
                src = packed[m].ravel()
                for k in range(src.shape[0]):
                    v = src[k]
                    x = sigma * np.float32(v.real)
                    flat[2 * m, k] = complex(np.cos(x), np.sin(x))
                    if 2 * m + 1 < n_out:
                        y = sigma * np.float32(v.imag)
                        flat[2 * m + 1, k] = complex(np.cos(y), np.sin(y))

        _EXP_KERNEL = kernel
    _EXP_KERNEL(packed, sigma, out)


def _negate_index(a, axis: int, xp):
    """``b[i] = a[-i mod n]`` along ``axis``: the mirror of a periodic grid through its origin."""
    return xp.roll(xp.flip(a, axis=axis), 1, axis=axis)


def place_on_grid(a, rot90: int, flip: bool, shift_px: tuple[int, int], xp=np):
    """Move arrays indexed (..., x, y) on the periodic grid as ``SubstratePlacement`` moves atoms: ``rot90`` quarter
    turns ``(i, j) -> (-j, i)``, then the mirror ``(i, j) -> (-i, j)``, then the shift by ``shift_px``."""
    for _ in range(rot90 % 4):
        a = _negate_index(xp.swapaxes(a, -1, -2), -2, xp)  # b[i, j] = a[j, -i]
    if flip:
        a = _negate_index(a, -2, xp)
    return xp.ascontiguousarray(xp.roll(a, tuple(int(s) for s in shift_px), axis=(-2, -1)))


class _Group:
    """The atoms of one part of a scene (particle, or substrate) sorted by slice, per phonon configuration."""

    def __init__(self, positions: np.ndarray, numbers: np.ndarray, displacements: np.ndarray, cell_A,
                 thicknesses: tuple[float, ...], sampling_A: float):
        self.per_config = []
        self.numbers = np.unique(numbers)
        self.first = len(thicknesses)
        occupied = np.zeros(len(thicknesses), bool)
        for d in displacements:
            pos = _atoms_in_cell(positions + d, cell_A)
            labels = slice_labels(pos[:, 2], thicknesses)
            order = np.argsort(labels, kind="stable")
            bounds_ = np.searchsorted(labels[order], np.arange(len(thicknesses) + 1))
            px = (pos[order, :2] / sampling_A).astype(np.float32)  # as abTEM's integrate_on_grid
            self.per_config.append((px, numbers[order], bounds_))
            occupied |= np.diff(bounds_) > 0
        self.occupied = occupied
        if occupied.any():
            self.first = int(np.argmax(occupied))

    def in_slice(self, config: int, j: int):
        px, numbers, b = self.per_config[config]
        return px[b[j]:b[j + 1]], numbers[b[j]:b[j + 1]]


class _Wave:
    """A batch of waves (config, x, y) through the slices; ``None`` while it is still the unit plane wave.

    Propagation is deferred until the next transmission (or ``flush``) so that runs of vacuum slices cost one pair of
    FFTs."""

    def __init__(self, engine: "FastEngine", array=None):
        self.engine = engine
        self.array = array
        self.pending: list[float] = []

    def flush(self):
        if self.pending and self.array is not None:
            e = self.engine
            e.counts["propagations"] += 1
            a = e.fft2(self.array)
            a *= e.propagator(tuple(self.pending))
            self.array = e.ifft2(a)
        self.pending = []

    def transmit(self, transmission, thickness: float):
        self.engine.counts["wave_slices"] += 1
        self.flush()
        if self.array is None:
            self.array = transmission.copy()
        else:
            self.array *= transmission
        self.pending.append(thickness)

    def vacuum(self, thickness: float):
        if self.array is not None:  # a plane wave crosses vacuum unchanged
            self.pending.append(thickness)

    def result(self, n_configs: int, gpts: int):
        self.flush()
        xp = self.engine.xp
        if self.array is None:
            return xp.ones((n_configs, gpts, gpts), xp.complex64)
        return self.array


class FastEngine:
    """abTEM's plane-wave multislice (infinite projection, first-order Fourier propagator) on one grid, batched over
    phonon configurations. Arrays are abTEM's (config, x, y)."""

    def __init__(self, energy_eV: float, parametrization: str, extent_A: float, gpts: int, device: str = "cpu"):
        from abtem.antialias import antialias_aperture
        from abtem.core.backend import get_array_module
        from abtem.core.energy import energy2sigma
        from abtem.integrals import ScatteringFactorProjectionIntegrals, sinc

        self.device = device
        self.xp = xp = get_array_module(device)
        self.energy = energy_eV
        self.gpts = gpts
        self.sampling = extent_A / gpts
        self.grid = ((gpts, gpts), (self.sampling, self.sampling))
        self.fft2, self.ifft2, self.rfft2, self._irfft2 = _fft_functions(xp)
        self.sigma = xp.array(energy2sigma(energy_eV), dtype=np.float32)  # as abTEM's transmission function
        self.aperture = antialias_aperture(*self.grid, xp)
        # real kernels held as complex64: numpy multiplies complex64 by complex64 faster than by float32 (same values)
        self._aperture_c = self.aperture.astype(np.complex64)
        self._integrals = ScatteringFactorProjectionIntegrals(parametrization)
        self._sinc = sinc(*self.grid, device)
        self._kernels: dict[int, object] = {}
        self._propagators: dict[tuple, object] = {}
        # batches (of all phonon configurations) through each step, for benchmarks: wave_slices (a wave through a
        # slice with atoms), propagations (FFT pairs of waves), transmissions (band-limited exp(i sigma V)),
        # potentials (slice spectra per element)
        self.counts: Counter = Counter()

    # -- abTEM's building blocks, cached
    def kernel(self, number: int):
        """Projected scattering factor over abTEM's pixel sinc (what abTEM's ``integrate_on_grid`` multiplies by)."""
        if number not in self._kernels:
            from ase.data import chemical_symbols

            f = self._integrals.get_scattering_factor(chemical_symbols[number], *self.grid, self.device)
            self._kernels[number] = (f / self._sinc).astype(np.complex64)
        return self._kernels[number]

    def propagator(self, thicknesses: tuple[float, ...]):
        """Product of abTEM's Fresnel propagator times antialias aperture over consecutive slices."""
        if thicknesses not in self._propagators:
            from abtem.multislice import _fresnel_propagator_array

            out = None
            for dz in thicknesses:
                p = _fresnel_propagator_array(dz, *self.grid, self.energy, self.device)
                p *= self.aperture
                out = p if out is None else out * p
            self._propagators[thicknesses] = out
        return self._propagators[thicknesses]

    # -- one slice
    def potential_spectrum(self, group: _Group, j: int):
        """Spectrum of the slice's projected potential, two phonon configurations packed per array (config 2m in the
        real part, 2m + 1 in the imaginary part: the kernels are real and even, so the inverse transform keeps them
        apart), shape (ceil(config / 2), x, y); None where the slice is empty."""
        from abtem.integrals import superpose_deltas

        xp = self.xp
        n_configs = len(group.per_config)
        total = None
        for number in group.numbers:
            deltas = xp.zeros(((n_configs + 1) // 2, self.gpts, self.gpts), np.complex64)
            parts = (deltas.real, deltas.imag)
            found = False
            for i in range(n_configs):
                px, numbers = group.in_slice(i, j)
                px = px[numbers == number]
                if len(px):
                    superpose_deltas(px, parts[i % 2][i // 2])
                    found = True
            if not found:
                continue
            self.counts["potentials"] += 1
            spectrum = self.fft2(deltas)
            spectrum *= self.kernel(int(number))
            total = spectrum if total is None else total + spectrum
        return total

    def transmission(self, spectrum, n_configs: int):
        """Band-limited transmission functions exp(i sigma V) (config, x, y) of a slice from its potential spectrum."""
        self.counts["transmissions"] += 1
        packed = self.ifft2(spectrum)  # V of config 2m + i V of config 2m + 1
        if self.xp is np:
            t = np.empty((n_configs, self.gpts, self.gpts), np.complex64)
            _exp_i_sigma_unpacked(packed, np.float32(self.sigma), t)
        else:
            t = self.xp.empty((n_configs, self.gpts, self.gpts), np.complex64)
            t[0::2] = self.xp.exp(1j * (self.sigma * packed.real))
            t[1::2] = self.xp.exp(1j * (self.sigma * packed.imag))[: n_configs // 2]
        t = self.fft2(t)
        t *= self._aperture_c
        return self.ifft2(t)

    # -- whole scenes
    def scene_exit_waves(self, scene: Scene, displacements: np.ndarray, sim: Simulation):
        """Exit waves (config, x, y) of the full scene and of its particle alone (None without a particle)."""
        xp = self.xp
        n_configs = displacements.shape[0]
        thicknesses = slice_thicknesses(scene.cell_A[2], sim.slice_thickness_A)
        n_slices = len(thicknesses)
        is_p = scene.is_particle
        sub = ~is_p
        particle = _Group(scene.positions[is_p], scene.numbers[is_p], displacements[:, is_p], scene.cell_A,
                          thicknesses, self.sampling)
        substrate = _Group(scene.positions[sub], scene.numbers[sub], displacements[:, sub], scene.cell_A,
                           thicknesses, self.sampling)
        full, part = _Wave(self), _Wave(self)
        start = min(particle.first, substrate.first)
        placement = scene.substrate
        if placement is not None and len(placement.atoms):
            bank = substrate_waves(self, placement.bank, sim)
            dirty = min(particle.first, bank.first_difference(placement, displacements[:, sub], scene.cell_A,
                                                              thicknesses))
            depth, waves = bank.start(placement.index, min(dirty, n_slices - 1))
            if depth > 0:
                start = depth
                full.array = place_on_grid(xp.asarray(waves), placement.rot90, placement.flip, placement.shift_px,
                                           xp)
        same = not substrate.occupied.any()  # no substrate: the two scenes are one, simulated once
        for j in range(start, n_slices):
            dz = thicknesses[j]
            sp = self.potential_spectrum(particle, j) if particle.occupied[j] else None
            tf = None
            if substrate.occupied[j]:  # (transforms overwrite their input: the sum first)
                ss = self.potential_spectrum(substrate, j)
                tf = self.transmission(ss if sp is None else ss + sp, n_configs)
            tp = None if sp is None else self.transmission(sp, n_configs)
            if not substrate.occupied[j]:
                tf = tp
            for wave, t in ((full, tf),) if same else ((full, tf), (part, tp)):
                if t is None:
                    wave.vacuum(dz)
                else:
                    wave.transmit(t, dz)
        full_out = full.result(n_configs, self.gpts)
        part_out = None
        if is_p.any():
            part_out = full_out.copy() if same else part.result(n_configs, self.gpts)
        if self.device == "gpu":
            full_out = xp.asnumpy(full_out)
            part_out = None if part_out is None else xp.asnumpy(part_out)
        return full_out, part_out


class SubstrateWaves:
    """A bank's substrate blocks' exit waves at the checkpoint depths, per block: (checkpoint, config, x, y).

    A checkpoint ``c`` holds the wave entering slice ``c`` of a block placed at the scene's depth (under the scene's
    vacuum), with the block's phonon configurations. Kept as .npy files in the bank's cache folder (memory-mapped, so
    worker processes share one copy through the page cache), else in memory."""

    def __init__(self, engine: FastEngine, bank, sim: Simulation):
        from .distributions import bounds

        r = bank.recipe
        self.engine, self.bank, self.sim = engine, bank, sim
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
            self._labels[index] = [slice_labels(_atoms_in_cell(block + d, self._cell())[:, 2], self.thicknesses)
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
            scene_labels = slice_labels(_atoms_in_cell(pos, cell_A)[:, 2], thicknesses)
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

    def _path(self, index: int) -> Path | None:
        if self.bank.cache_dir is None:
            return None
        e = self.engine
        text = repr((self.bank.key(index), e.energy, e.sampling, e.gpts, self.sim.parametrization,
                     self.sim.slice_thickness_A, self.vacuum_A, self.n_configs, self.sim.phonon_sigma_A,
                     self.checkpoints, e.device, self.engine_version()))
        return self.bank.cache_dir / f"waves-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npy"

    @staticmethod
    def engine_version() -> str:
        import abtem
        import scipy

        return f"fast engine {FAST_ENGINE_VERSION}, abtem {abtem.__version__}, scipy {scipy.__version__}, " \
               f"numpy {np.__version__}"

    def waves(self, index: int) -> np.ndarray:
        if index in self._waves:
            return self._waves[index]
        path = self._path(index)
        shape = (len(self.checkpoints), self.n_configs, self.engine.gpts, self.engine.gpts)
        if path is None:
            waves = self.compute(index, np.empty(shape, np.complex64))
        else:
            if not path.exists():  # computed straight into the file; renamed when complete
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.partial")
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.complex64, shape=shape)
                self.compute(index, out)
                out.flush()
                del out
                os.replace(tmp, path)
            waves = np.load(path, mmap_mode="r")
        self._waves[index] = waves
        return waves

    def compute(self, index: int, out: np.ndarray) -> np.ndarray:
        """Multislice of the bare block (all its phonon configurations at once), kept at the checkpoints in ``out``
        (checkpoint, config, x, y)."""
        e = self.engine
        block, disp = self._block_atoms(index)
        numbers = np.full(len(block), _substrate_number(self.bank))
        group = _Group(block, numbers, disp, self._cell(), self.thicknesses, e.sampling)
        wave = _Wave(e)
        for j in range(self.checkpoints[-1]):
            if group.occupied[j]:
                wave.transmit(e.transmission(e.potential_spectrum(group, j), self.n_configs), self.thicknesses[j])
            else:
                wave.vacuum(self.thicknesses[j])
            if j + 1 in self.checkpoints:
                a = wave.result(self.n_configs, e.gpts)
                out[self.checkpoints.index(j + 1)] = a if e.xp is np else e.xp.asnumpy(a)
        return out


def _substrate_number(bank) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[bank.s.element]


def substrate_waves(engine: FastEngine, bank, sim: Simulation) -> SubstrateWaves:
    """The bank's exit waves for this engine and simulation, one object per (bank, engine, settings) and process."""
    cache = bank.simulation_cache
    key = (id(engine), sim.slice_thickness_A, sim.n_phonons, sim.phonon_sigma_A, sim.parametrization)
    if key not in cache:
        cache[key] = SubstrateWaves(engine, bank, sim)
    return cache[key]


def warm_substrate_waves(bank) -> None:
    """Compute and store the bank's substrate waves (fast engine only; called by the driver before workers start)."""
    sim = bank.recipe.simulation
    if sim.backend != "abtem" or sim.engine != "fast" or bank.cache_dir is None or bank.max_thickness <= 0:
        return
    gpts = grid_points(bank.extent, sim.sampling_A)
    engine = FastEngine(sim.energy_eV, sim.parametrization, bank.extent, gpts, resolve_device(sim.device))
    waves = substrate_waves(engine, bank, sim)
    for i in range(bank.s.bank_size):
        waves.waves(i)
    bank.simulation_cache.clear()  # the engine was only for this: workers read the files


def get_backend(name: str) -> Backend:
    if name == "abtem":
        return AbtemBackend()
    if name == "prismatic":
        from .prismatic import PrismaticBackend

        return PrismaticBackend()
    raise ValueError(f"simulation.backend={name!r}; allowed: abtem, prismatic")


def simulate(scene: Scene, sim: Simulation, streams: Streams, backend: Backend) -> ExitWaves:
    L = scene.cell_A[0]
    gpts = grid_points(L, sim.sampling_A)
    device = resolve_device(sim.device)
    disp = phonon_displacements(scene, sim, streams)
    fast = sim.engine == "fast" and hasattr(backend, "scene_exit_waves")
    if fast:
        full, particle = backend.scene_exit_waves(scene, disp, sim, gpts, device)
    else:
        full = backend.exit_waves(scene, disp, sim, gpts, device)
        particle = None
        if scene.is_particle.any():
            part = scene.particle_only()
            particle = backend.exit_waves(part, disp[:, scene.is_particle], sim, gpts, device)
    n_slices = len(slice_thicknesses(scene.cell_A[2], sim.slice_thickness_A))
    meta = {
        "backend": backend.name,
        "engine": "fast" if fast else "plain",
        **{f"{k}_version": v for k, v in backend.versions().items()},
        "energy_eV": sim.energy_eV,
        "wavelength_A": electron_wavelength_A(sim.energy_eV),
        "sampling_A": L / gpts,
        "gpts": [gpts, gpts],
        "slice_thickness_A": sim.slice_thickness_A,
        "n_slices": n_slices,
        "n_phonons": sim.n_phonons,
        "phonon_sigma_A": sim.phonon_sigma_A,
        "parametrization": sim.parametrization,
        "device": device,
    }
    return ExitWaves(full, particle, L / gpts, meta)
