"""The abTEM backend. Engine ``plain`` runs abTEM's ``Potential`` and ``PlaneWave.multislice`` on each scene from
scratch; engine ``fast`` (``fast.FastEngine``) runs the same multislice once for both scenes, starting the full scene
from the substrate bank's stored exit waves (``substrate_waves``). Both give the same waves to rounding (~1e-6
relative; tests/test_simulate_fast.py).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..recipe import Simulation
from ..structures import Scene, SubstrateBank
from .backend import Backend, slice_thicknesses
from .fast import FastEngine
from .substrate_waves import SubstrateWaves


class AbtemBackend(Backend):
    """abTEM multislice: ``exit_waves`` is plain abTEM (one scene from scratch), ``scene_exit_waves`` the fast engine
    (both scenes at once, :class:`FastEngine`). abTEM's FFTW is planned with FFTW_ESTIMATE: FFTW_MEASURE makes the
    last bits vary between runs."""

    name = "abtem"

    def __init__(self, cache=None):
        """``cache``: where the substrate bank's exit waves are kept (an ``ArrayCache``), or None for memory."""
        import abtem

        self.abtem = abtem
        abtem.config.set({"fftw.planning_effort": "FFTW_ESTIMATE", "diagnostics.progress_bar": False,
                          "fftw.threads": 1})
        self.cache = cache
        self._engines: dict[tuple, FastEngine] = {}
        self._substrate_waves: dict[tuple, SubstrateWaves] = {}

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

    def engine(self, sim: Simulation, extent_A: float, gpts: int, device: str) -> FastEngine:
        key = (sim.energy_eV, sim.parametrization, extent_A, gpts, device)
        if key not in self._engines:
            self._engines[key] = FastEngine(sim.energy_eV, sim.parametrization, extent_A, gpts, device)
        return self._engines[key]

    def substrate_waves(self, engine: FastEngine, bank: SubstrateBank, sim: Simulation) -> SubstrateWaves:
        """The bank's exit waves for this engine and simulation: one object per (bank, engine, settings), kept for
        the structures to come (each reads them from this backend's cache, or computes them once in memory)."""
        key = (bank, engine, sim.slice_thickness_A, sim.n_phonons, sim.phonon_sigma_A, sim.parametrization)
        if key not in self._substrate_waves:
            self._substrate_waves[key] = SubstrateWaves(engine, bank, sim, self.cache)
        return self._substrate_waves[key]

    def scene_exit_waves(self, scene: Scene, displacements: np.ndarray, sim: Simulation, gpts: int,
                         device: str) -> tuple[np.ndarray, np.ndarray | None]:
        """complex64 [phonon, row, col] exit waves of the full scene and of its particle alone (None without one)."""
        engine = self.engine(sim, scene.cell_A[0], gpts, device)
        placement = scene.substrate
        stored = None
        if placement is not None and len(placement.atoms):
            stored = self.substrate_waves(engine, placement.bank, sim)
        full, particle = engine.scene_exit_waves(scene, displacements, sim, stored)
        to_image = lambda a: None if a is None else np.ascontiguousarray(np.swapaxes(a, -1, -2))  # noqa: E731
        return to_image(full), to_image(particle)
