"""Stage 2, simulate: plane-wave multislice exit waves of a scene, with frozen phonons.

Both the full scene and the particle-only scene are simulated on the identical grid and slicing; the particle atoms are
displaced identically in both (the displacements are drawn here, from the sample's seed stream, not by the backend),
so the mask is made from exactly the particle that is imaged.

Exit waves are returned as complex64 arrays ``[phonon, row, col]`` (rows along y), i.e. already in the image
convention of DESIGN.md; each backend (abTEM and Prismatic both index ``(x, y)``) transposes its own output.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass

import numpy as np

from .recipe import Simulation
from .seeding import Streams
from .structures import Scene


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


def grid_points(extent_A: float, sampling_A: float) -> int:
    """Grid points per side: the sampling is honoured to within rounding; the exact value is recorded."""
    return max(int(round(extent_A / sampling_A)), 2)


def phonon_displacements(n_atoms: int, sim: Simulation, streams: Streams) -> np.ndarray:
    """Frozen-phonon displacements (phonon, atom, xyz) in Å, Gaussian with std ``phonon_sigma_A`` per axis."""
    rng = streams.rng("simulation.phonons")
    if sim.phonon_sigma_A == 0:
        return np.zeros((sim.n_phonons, n_atoms, 3))
    return rng.normal(0.0, sim.phonon_sigma_A, size=(sim.n_phonons, n_atoms, 3))


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


class AbtemBackend(Backend):
    """abTEM multislice. FFTW is planned with FFTW_ESTIMATE: FFTW_MEASURE makes the last bits vary between runs."""

    name = "abtem"

    def __init__(self):
        import abtem

        self.abtem = abtem
        abtem.config.set({"fftw.planning_effort": "FFTW_ESTIMATE", "diagnostics.progress_bar": False,
                          "fftw.threads": 1})

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
            ensemble, gpts=(gpts, gpts), slice_thickness=sim.slice_thickness_A, parametrization=sim.parametrization,
            projection="infinite", device=device,
        )
        wave = abtem.PlaneWave(energy=sim.energy_eV, normalize=False, device=device)
        with warnings.catch_warnings():
            # we want every configuration's wave (the mask votes over them); abTEM warns that this is unusual
            warnings.filterwarnings("ignore", message="ensemble_mean=False")
            exit_wave = wave.multislice(potential).compute(scheduler="synchronous", progress_bar=False)
        array = exit_wave.to_cpu().array if device == "gpu" else exit_wave.array
        array = np.asarray(array, np.complex64).reshape(n_phonons, gpts, gpts)
        return np.ascontiguousarray(np.swapaxes(array, -1, -2))  # abTEM is (x, y); we are [row=y, col=x]


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
    disp = phonon_displacements(len(scene.numbers), sim, streams)
    full = backend.exit_waves(scene, disp, sim, gpts, device)
    particle = None
    if scene.is_particle.any():
        part = scene.particle_only()
        particle = backend.exit_waves(part, disp[:, scene.is_particle], sim, gpts, device)
    n_slices = int(math.ceil(scene.cell_A[2] / sim.slice_thickness_A))
    meta = {
        "backend": backend.name,
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
