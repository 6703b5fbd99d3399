"""Stage 2, simulate: plane-wave multislice exit waves of a scene, with frozen phonons.

Both the full scene and the particle-only scene are simulated on the identical grid and slicing; the particle atoms are
displaced identically in both (the displacements are drawn here, from the sample's seed stream, not by the backend),
so the mask is made from exactly the particle that is imaged.

The modules, in the order they depend on each other:

* ``backend``: the backend interface, the exit-wave record, and what every backend shares (wavelength, slicing,
  phonon displacements);
* ``device``: cpu or gpu;
* ``fast``: the fast engine, abTEM's multislice for both scenes in one batched pass (``simulation.engine: fast``);
* ``substrate_waves``: the substrate bank's exit waves that the fast engine starts from, computed once per dataset;
* ``plain``: the abTEM backend, running plain abTEM (``simulation.engine: plain``) or the fast engine;
* ``prismatic``: the Prismatic 2.x backend;
* this package: :func:`simulate` and the choice of backend by name.

Exit waves are returned as complex64 arrays ``[phonon, row, col]`` (rows along y), i.e. already in the image
convention of docs/architecture.md; each backend (abTEM and Prismatic both index ``(x, y)``) transposes its own output.
"""

from __future__ import annotations

from hrtem_core.errors import InputError

from ..recipe import Simulation
from ..seeding import Streams
from ..structures import Scene, grid_points
from .backend import Backend, ExitWaves, electron_wavelength_A, phonon_displacements, slice_thicknesses
from .device import resolve_device
from .plain import AbtemBackend
from .prismatic import PrismaticBackend
from .substrate_waves import warm_substrate_waves

__all__ = ["BACKENDS", "Backend", "ExitWaves", "electron_wavelength_A", "get_backend", "simulate",
           "warm_substrate_waves"]

BACKENDS = ("abtem", "prismatic")


def get_backend(name: str, cache=None) -> Backend:
    """The backend ``simulation.backend`` names. ``cache`` (an ``ArrayCache``, or None for memory) keeps what a
    backend computes once per dataset: the abTEM backend's substrate exit waves."""
    if name == "abtem":
        return AbtemBackend(cache)
    if name == "prismatic":
        return PrismaticBackend()
    raise InputError(f"simulation.backend={name!r}; allowed: {', '.join(BACKENDS)}")


def simulate(scene: Scene, sim: Simulation, streams: Streams, backend: Backend) -> ExitWaves:
    """Exit waves of ``scene`` and of its particle alone, with the metadata of the simulation."""
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
    if sim.particle_phonon_sigma != "recipe":  # only then: samples of earlier recipes keep their metadata
        meta["particle_phonon_sigma"] = sim.particle_phonon_sigma
    return ExitWaves(full, particle, L / gpts, meta)
