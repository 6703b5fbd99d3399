"""The simulation backend interface and what every backend shares: the electron wavelength, the slicing of a scene
along the beam, and the frozen-phonon displacements of its atoms.

Exit waves are returned as complex64 arrays ``[phonon, row, col]`` (rows along y), i.e. already in the image
convention of docs/architecture.md; each backend (abTEM and Prismatic both index ``(x, y)``) transposes its own output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ase.data import chemical_symbols

from ..recipe import FCC_METALS, Simulation, phonon_sigma_A
from ..seeding import Streams
from ..structures import Scene


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


def atoms_in_cell(positions: np.ndarray, cell_A) -> np.ndarray:
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
    if sim.particle_phonon_sigma == "element":
        # one draw per value as below, scaled per atom: the same stream, each metal with its own Debye-Waller sigma
        per_atom = atom_sigmas(scene.numbers[fresh], sigma)
        if fresh.any() and per_atom.any():
            out[:, fresh] = streams.rng("simulation.phonons").normal(0.0, per_atom[None, :, None],
                                                                     size=(n, int(fresh.sum()), 3))
    elif sigma > 0 and fresh.any():
        out[:, fresh] = streams.rng("simulation.phonons").normal(0.0, sigma, size=(n, int(fresh.sum()), 3))
    return out


def atom_sigmas(numbers: np.ndarray, default_A: float) -> np.ndarray:
    """Per-atom thermal displacement sigma (Å): the table's room-temperature value for the FCC metals of
    ``recipe.FCC_METALS``, ``default_A`` for every other element."""
    table = {z: phonon_sigma_A(chemical_symbols[z]) for z in {int(v) for v in np.unique(numbers)}
             if chemical_symbols[z] in FCC_METALS}
    return np.array([table.get(int(z), default_A) for z in numbers], float)


class Backend:
    """A multislice code. ``exit_waves`` simulates one scene from scratch; a backend may also offer
    ``scene_exit_waves`` (the full scene and its particle alone at once), which ``simulate`` uses for
    ``simulation.engine: fast``."""

    name = "base"

    def exit_waves(self, scene: Scene, displacements: np.ndarray, sim: Simulation, gpts: int,
                   device: str) -> np.ndarray:
        """complex64 [phonon, row, col] exit waves of ``scene`` with its atoms displaced per phonon."""
        raise NotImplementedError

    def versions(self) -> dict:
        return {}
