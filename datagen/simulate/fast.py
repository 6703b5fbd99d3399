"""The fast engine: abTEM's plane-wave multislice of a scene and of its particle alone, in one batched pass that
computes nothing twice and starts the full scene from stored substrate exit waves (``substrate_waves``)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..recipe import Simulation
from ..structures import Scene
from .backend import atoms_in_cell, slice_labels, slice_thicknesses

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


class SlicedAtoms:
    """The atoms of one part of a scene (particle, or substrate) sorted by slice, per phonon configuration."""

    def __init__(self, positions: np.ndarray, numbers: np.ndarray, displacements: np.ndarray, cell_A,
                 thicknesses: tuple[float, ...], sampling_A: float):
        self.per_config = []
        self.numbers = np.unique(numbers)
        self.first = len(thicknesses)
        occupied = np.zeros(len(thicknesses), bool)
        for d in displacements:
            pos = atoms_in_cell(positions + d, cell_A)
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


class WaveBatch:
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
    def potential_spectrum(self, group: SlicedAtoms, j: int):
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
    def scene_exit_waves(self, scene: Scene, displacements: np.ndarray, sim: Simulation, substrate_waves=None):
        """Exit waves (config, x, y) of the full scene and of its particle alone (None without a particle).

        ``substrate_waves`` (a ``substrate_waves.SubstrateWaves`` of the bank the scene's substrate was placed from,
        on this engine's grid) lets the full scene start from a stored block wave; without it every slice is
        computed."""
        xp = self.xp
        n_configs = displacements.shape[0]
        thicknesses = slice_thicknesses(scene.cell_A[2], sim.slice_thickness_A)
        n_slices = len(thicknesses)
        is_p = scene.is_particle
        sub = ~is_p
        particle = SlicedAtoms(scene.positions[is_p], scene.numbers[is_p], displacements[:, is_p], scene.cell_A,
                               thicknesses, self.sampling)
        substrate = SlicedAtoms(scene.positions[sub], scene.numbers[sub], displacements[:, sub], scene.cell_A,
                                thicknesses, self.sampling)
        full, part = WaveBatch(self), WaveBatch(self)
        start = min(particle.first, substrate.first)
        placement = scene.substrate
        if placement is not None and len(placement.atoms) and substrate_waves is not None:
            dirty = min(particle.first, substrate_waves.first_difference(placement, displacements[:, sub],
                                                                         scene.cell_A, thicknesses))
            depth, waves = substrate_waves.start(placement.index, min(dirty, n_slices - 1))
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
