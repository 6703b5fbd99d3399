"""Stage 1, structure: Construction Zone (czone) builds the scene.

A scene is a nanoparticle (FCC sphere with twins/stacking faults on a random {111} variant, or a wurtzite sphere with
basal stacking faults) at a random orientation and lateral position, resting on (or slightly embedded in) a slab of
amorphous carbon. Geometry, with the beam along +z (abTEM propagates from z = 0 to the cell's far face):

    z = 0 .. vacuum                      vacuum
    z = vacuum .. vacuum + t             amorphous carbon substrate (thickness t, may be 0)
    z = vacuum + t - embed .. + 2 r      the particle, touching the substrate's exit face
    last vacuum                          vacuum; the exit plane follows

The particle sits on the exit side of the substrate so that the particle-only exit wave, used for the mask, is taken
right behind the particle in both scenes: no vacuum propagation blurs it.

The substrate comes from a small per-dataset bank of periodic amorphous blocks, placed by operations that map the
simulation grid onto itself: a shift by whole grid pixels, quarter turns about the cell centre and a mirror. A placed
block's projected potential, and the exit wave of a plane wave through it, are then exactly the block's own, moved
(see ``simulate.fast``): the expensive part of a substrate is computed once per dataset, not once per structure.
The scene records where its substrate atoms come from (:class:`SubstratePlacement`) so the simulation can use that.
The bank's blocks are kept in a cache passed in by the caller (the pipeline's ``ArrayCache``), or in memory.

czone's own defect prefab draws from an unseeded RNG and its amorphous generator from numpy's global RNG. Defect
planes are therefore chosen here from our seeded stream and assembled with czone's primitives (generators, volumes,
planes, reflections, translations); the substrate generator runs under a seeded, restored global RNG state.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from .distributions import bounds, sample
from .recipe import Particle, Recipe, Substrate, split_binary
from .seeding import Streams

FCC_111_VARIANTS = ((1, 1, 1), (1, 1, -1), (1, -1, 1), (-1, 1, 1))


def grid_points(extent_A: float, sampling_A: float) -> int:
    """Simulation grid points per side: the sampling is honoured to within rounding; the exact value is recorded."""
    return max(int(round(extent_A / sampling_A)), 2)


@dataclass
class SubstratePlacement:
    """Where a scene's substrate atoms come from: atoms ``atoms`` (indices, in scene order) of block ``index`` of
    ``bank``, turned by ``rot90`` quarter turns about the cell centre, then mirrored in x (``flip``), then shifted by
    ``shift_px`` whole pixels of the ``grid_px``-point simulation grid, then raised by ``z_offset_A`` Å.

    In pixel indices (periodic, ``n = grid_px``) a quarter turn maps ``(i, j) -> (-j, i)``, the mirror
    ``(i, j) -> (-i, j)`` and the shift ``(i, j) -> (i + s0, j + s1)``: every grid point lands on a grid point."""

    bank: "SubstrateBank"
    index: int
    atoms: np.ndarray  # (N_substrate,) int, indices into the block
    rot90: int
    flip: bool
    shift_px: tuple[int, int]
    grid_px: int
    z_offset_A: float

    def rotate_vectors(self, xy: np.ndarray) -> np.ndarray:
        """The linear part of the placement applied to in-plane vectors (..., 2), e.g. phonon displacements."""
        xy = np.array(xy, float, copy=True)
        for _ in range(self.rot90):
            xy = np.stack([-xy[..., 1], xy[..., 0]], axis=-1)
        if self.flip:
            xy[..., 0] = -xy[..., 0]
        return xy


@dataclass(frozen=True)
class ParticleSphere:
    """The sphere a scene's particle was cut from: centre (x, y, z) in Å in the scene's cell, radius in Å."""

    center_A: tuple[float, float, float]
    radius_A: float


@dataclass
class Scene:
    """Atoms of one scene in Å, beam along +z, cell ``[0, Lx) x [0, Ly) x [0, Lz)`` periodic laterally.

    Particle atoms come first, then substrate atoms (in the order of ``substrate.atoms``)."""

    cell_A: tuple[float, float, float]
    positions: np.ndarray  # (N, 3) float64
    numbers: np.ndarray  # (N,) int
    is_particle: np.ndarray  # (N,) bool
    metadata: dict = field(default_factory=dict)
    substrate: SubstratePlacement | None = None
    particle: ParticleSphere | None = None  # None: no particle

    def particle_only(self) -> "Scene":
        keep = self.is_particle
        return Scene(self.cell_A, self.positions[keep], self.numbers[keep], keep[keep], self.metadata,
                     particle=self.particle)


def _atomic_number(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[symbol]  # validated in the recipe


@contextlib.contextmanager
def seeded_global_numpy(seed: int):
    """czone draws from numpy's global RNG: seed it for the call and put the caller's state back afterwards."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def _choose_planes(rng: np.random.Generator, candidates: np.ndarray, n: int, min_sep: int) -> list[int]:
    """Up to ``n`` distinct indices into ``candidates``, pairwise at least ``min_sep`` apart, uniformly at random."""
    chosen: list[int] = []
    available = np.arange(len(candidates))
    for _ in range(n):
        ok = [i for i in available if all(abs(i - c) >= min_sep for c in chosen)]
        if not ok:
            break
        chosen.append(int(rng.choice(ok)))
    return sorted(chosen)


def _planar_defect_volume(generator, sphere, normal, offsets_A, kinds, plane_point, shift_vectors):
    """Assemble the particle as czone volumes separated by defect planes.

    ``offsets_A`` are the plane positions along ``normal`` (sorted descending); each region below a plane takes the
    generator of the region above it transformed by that plane's defect (reflection = twin, translation = stacking
    fault). czone resolves overlaps by priority: a lower number wins.
    """
    from czone.transform import Reflection, Translation
    from czone.volume import MultiVolume, Plane, Volume

    n = len(offsets_A)
    volumes = [Volume(alg_objects=[sphere], generator=generator, priority=n)]
    gen = generator
    for i, (offset, kind) in enumerate(zip(offsets_A, kinds)):
        point = plane_point(offset)
        if kind == "twin":
            t = Reflection(Plane(normal=normal.copy(), point=point))
        else:
            t = Translation(shift=shift_vectors[i])
        gen = gen.from_generator(transformation=[t])
        volumes.append(
            Volume(alg_objects=[sphere, Plane(normal=normal.copy(), point=point)], generator=gen, priority=n - (i + 1))
        )
    mv = MultiVolume(volumes=volumes)
    mv.populate_atoms()
    return mv.atoms, mv.species


def build_particle(p: Particle, streams: Streams) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """Atoms of one particle centred on the origin in the crystal frame (not yet rotated)."""
    import czone  # noqa: F401  (import cost paid once per process)
    from czone.generator import Generator
    from czone.volume import Sphere

    radius = sample(p.radius_A, streams.rng("structure.particle.radius_A"))
    n_requested = int(round(sample(p.defects.n, streams.rng("structure.particle.defects.n"))))
    if n_requested < 0:
        raise ValueError(f"structure.particle.defects.n drew {n_requested}; it must be >= 0")
    rng = streams.rng("structure.particle.defects")
    sphere = Sphere(radius=radius, center=np.zeros(3))
    meta: dict = {"kind": p.kind, "radius_A": radius}

    if p.kind == "fcc_sphere":
        a = p.lattice_A
        z = _atomic_number(p.element)
        gen = Generator.from_spacegroup(Z=[z], coords=np.zeros((1, 3)), cellDims=[a, a, a], cellAngs=[90, 90, 90],
                                        sgn=225)
        hkl = np.array(FCC_111_VARIANTS[int(rng.integers(len(FCC_111_VARIANTS)))])
        normal = hkl / np.linalg.norm(hkl)
        d = a / math.sqrt(3)
        # {111} atomic planes through lattice sites: normal . x = m d
        m = np.arange(math.ceil(-radius / d), math.floor(radius / d) + 1)
        inner = m[(np.abs(m * d) < radius - d)]  # a defect plane needs atoms on both sides
        picks = _choose_planes(rng, inner, n_requested, p.defects.min_separation_planes)
        offsets = sorted((float(inner[i] * d) for i in picks), reverse=True)
        kinds = ["twin" if rng.uniform() < p.defects.twin_fraction else "stacking_fault" for _ in offsets]
        # Shockley partial a/6<112> lying in the chosen {111} plane
        partial = a / 6 * np.array([hkl[0], hkl[1], -2 * hkl[2]], float)
        shifts = [partial] * len(offsets)
        material = {"material": p.element, "lattice": "fcc", "lattice_A": a, "defect_plane_hkl": hkl.tolist()}
        lattice_matrix = np.eye(3) * a
    elif p.kind == "wurtzite_sphere":
        cation, anion = split_binary(p.element)
        a, c, u = p.lattice_A, p.lattice_c_A, p.wurtzite_u
        gen = Generator.from_spacegroup(
            Z=[_atomic_number(cation), _atomic_number(anion)],
            coords=np.array([[1 / 3, 2 / 3, 0.0], [1 / 3, 2 / 3, u]]),
            cellDims=[a, a, c], cellAngs=[90, 90, 120], sgn=186,
        )
        lattice_matrix = np.array(gen.lattice.matrix)
        normal = lattice_matrix[2] / np.linalg.norm(lattice_matrix[2])
        d = c / 2  # one bilayer
        # fault planes sit midway between bilayers: z = ((u + 1/2) / 2 + m / 2) c
        z0 = (u + 0.5) / 2 * c
        m = np.arange(math.ceil((-radius - z0) / d), math.floor((radius - z0) / d) + 1)
        inner = m[np.abs(z0 + m * d) < radius - d]
        picks = _choose_planes(rng, inner, n_requested, p.defects.min_separation_planes)
        offsets = sorted((float(z0 + inner[i] * d) for i in picks), reverse=True)
        kinds = ["stacking_fault"] * len(offsets)
        a1, a2 = lattice_matrix[0], lattice_matrix[1]
        shifts = [(2 * a1 + a2) / 3] * len(offsets)  # 1/3<1-100>: turns ...ABAB... into ...ABCB...
        material = {"material": p.element, "lattice": "wurtzite", "lattice_A": a, "lattice_c_A": c,
                    "defect_plane_hkl": [0, 0, 1]}
    else:  # pragma: no cover - callers check for "none"
        raise ValueError(f"no particle for kind {p.kind!r}")

    positions, species = _planar_defect_volume(
        gen, sphere, normal, offsets, kinds, lambda off: normal * off, shifts
    )
    meta.update(material)
    meta["n_defects_requested"] = n_requested
    meta["n_defects"] = len(offsets)
    meta["defects"] = [{"type": k, "plane_offset_A": o} for k, o in zip(kinds, offsets)]
    meta["n_twins"] = kinds.count("twin")
    meta["n_stacking_faults"] = kinds.count("stacking_fault")
    meta["has_twin"] = meta["n_twins"] > 0
    meta["has_stacking_fault"] = meta["n_stacking_faults"] > 0
    return np.asarray(positions, float), np.asarray(species, int), meta, lattice_matrix


def orientation_matrix(p: Particle, lattice_matrix: np.ndarray, streams: Streams) -> tuple[np.ndarray, dict]:
    """Rotation applied to crystal-frame coordinates (x' = R x)."""
    o = p.orientation
    rng = streams.rng("structure.particle.orientation")
    if o.mode == "random":
        R = Rotation.random(random_state=rng).as_matrix()  # Haar measure: uniform over SO(3)
        return R, {"orientation_mode": "random"}
    direction = np.asarray(o.zone_axis, float) @ lattice_matrix
    align, _ = Rotation.align_vectors([[0.0, 0.0, 1.0]], [direction])
    spin = Rotation.from_euler("z", rng.uniform(0, 2 * math.pi))
    tilt_mrad = sample(o.tilt_mrad, streams.rng("structure.particle.orientation.tilt_mrad"))
    axis_angle = rng.uniform(0, 2 * math.pi)
    tilt = Rotation.from_rotvec(tilt_mrad * 1e-3 * np.array([math.cos(axis_angle), math.sin(axis_angle), 0.0]))
    R = (tilt * spin * align).as_matrix()
    return R, {"orientation_mode": "zone_axis", "zone_axis": list(o.zone_axis), "tilt_mrad": tilt_mrad}


# ---------------------------------------------------------------------------------------------------------------
# amorphous substrate: a small bank of periodic blocks per dataset, reused with random shifts and symmetry ops


def substrate_block_key(s: Substrate, extent_A: float, thickness_A: float, bank_seed: int, index: int) -> str:
    import czone

    text = f"{s.element}|{s.density_per_A3}|{s.min_distance_A}|{extent_A}|{thickness_A}|{bank_seed}|{index}|" \
           f"{getattr(czone, '__version__', '2022.9.20')}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_substrate_block(s: Substrate, extent_A: float, thickness_A: float, seed: int) -> np.ndarray:
    """Periodic (in x, y) amorphous block, positions (N, 3) in Å, from czone's uniform generator."""
    from czone.generator import gen_p_substrate

    with seeded_global_numpy(seed), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        return np.asarray(
            gen_p_substrate([extent_A, extent_A, thickness_A], min_dist=s.min_distance_A, density=s.density_per_A3),
            float,
        )


class SubstrateBank:
    """The dataset's substrate blocks, built once (a pure function of recipe and seed) and kept in ``cache`` (an
    ``ArrayCache``, shared by the processes that make a dataset) or, without one, in memory.

    Each block also carries its own frozen-phonon configurations (:meth:`displacements`): a structure's phonon
    configuration ``i`` displaces its substrate atoms by the block's configuration ``i`` (turned with the block), and
    its particle atoms by fresh draws of its own. Physics trade-off: the substrate's thermal displacements are shared
    by the structures that use the same block, exactly as its atom positions already are; within one structure every
    phonon configuration still has its own, independent substrate displacements, so the phonon average (thermal
    diffuse scattering of the carbon) is the same as with fresh draws. What is lost is only independence between
    structures, of an amorphous film whose atoms are already shared. In exchange, the exit wave of the plane wave
    through a block is a pure function of (block, configuration) and is computed once per dataset.
    """

    def __init__(self, recipe: Recipe, dataset_seed: int, cache=None):
        self.recipe = recipe
        self.s = recipe.structure.substrate
        self.extent = recipe.structure.cell.extent_A
        self.max_thickness = bounds(self.s.thickness_A)[1]
        self.bank_seed = Streams(dataset_seed, -1).int_seed("substrate.bank")
        self.cache = cache
        self._blocks: dict[int, np.ndarray] = {}
        self._displacements: dict[tuple, np.ndarray] = {}

    def key(self, index: int) -> str:
        return substrate_block_key(self.s, self.extent, self.max_thickness, self.bank_seed, index)

    def block(self, index: int) -> np.ndarray:
        """Positions (N, 3) in Å of block ``index``, z from 0 to the thickest cut."""
        if index not in self._blocks:
            name = f"substrate-{self.key(index)}"
            block = None if self.cache is None else self.cache.get(name)
            if block is None:
                block = make_substrate_block(self.s, self.extent, self.max_thickness,
                                             Streams(self.bank_seed, index).int_seed("substrate.block"))
                if self.cache is not None:
                    self.cache.put(name, block)
            self._blocks[index] = block
        return self._blocks[index]

    def displacements(self, index: int, n_configs: int, sigma_A: float) -> np.ndarray:
        """Frozen-phonon displacements (config, atom, xyz) in Å of block ``index``: Gaussian, std ``sigma_A`` per
        axis, drawn from the bank's seed (not a structure's), so every structure on this block sees the same ones."""
        key = (index, n_configs, sigma_A)
        if key not in self._displacements:
            n_atoms = len(self.block(index))
            if sigma_A == 0:
                d = np.zeros((n_configs, n_atoms, 3))
            else:
                rng = Streams(self.bank_seed, index).rng("substrate.phonons")
                d = rng.normal(0.0, sigma_A, size=(n_configs, n_atoms, 3))
            self._displacements[key] = d
        return self._displacements[key]

    def build_blocks(self) -> None:
        """Build every block (into the cache: called by the driver before workers start)."""
        if self.max_thickness > 0:
            for i in range(self.s.bank_size):
                self.block(i)

    def draw(self, thickness_A: float, streams: Streams, grid_px: int) -> tuple[np.ndarray, SubstratePlacement, dict]:
        """A slab of the given thickness from a random block, shifted by whole pixels of the ``grid_px`` simulation
        grid, turned by k*90 deg and mirrored; positions (N, 3) with z from 0, its placement, and its metadata."""
        rng = streams.rng("structure.substrate.placement")
        index = int(rng.integers(self.s.bank_size))
        shift_px = rng.integers(grid_px, size=2)
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        block = self.block(index)
        atoms = np.flatnonzero(block[:, 2] < thickness_A)
        xyz = block[atoms].copy()
        placement = SubstratePlacement(self, index, atoms, k, flip, (int(shift_px[0]), int(shift_px[1])), grid_px,
                                       0.0)
        xy = placement.rotate_vectors(xyz[:, :2] - self.extent / 2)
        shift = shift_px * (self.extent / grid_px)
        xyz[:, :2] = np.mod(xy + self.extent / 2 + shift, self.extent)
        return xyz, placement, {"substrate_block": index, "substrate_shift_A": shift.tolist(),
                                "substrate_shift_px": placement.shift_px, "substrate_rot90": k,
                                "substrate_flip": flip}


# ---------------------------------------------------------------------------------------------------------------


def build_scene(recipe: Recipe, streams: Streams, bank: SubstrateBank) -> Scene:
    """The full scene of one structure; ``Scene.particle_only()`` gives the substrate-free scene on the same cell."""
    st = recipe.structure
    p = st.particle
    L = st.cell.extent_A
    vac = st.cell.vacuum_A
    t = sample(st.substrate.thickness_A, streams.rng("structure.substrate.thickness_A"))
    t = max(t, 0.0)
    meta: dict = {"cell_extent_A": L, "substrate_thickness_A": t, "substrate_element": st.substrate.element}

    parts_xyz, parts_z, parts_flag = [], [], []
    top = vac + t  # exit face of the substrate
    if p.kind != "none":
        xyz, species, pmeta, lattice = build_particle(p, streams)
        R, ometa = orientation_matrix(p, lattice, streams)
        xyz = xyz @ R.T
        radius = pmeta["radius_A"]
        embed = min(max(sample(p.embed_A, streams.rng("structure.particle.embed_A")), 0.0), radius) if t > 0 else 0.0
        # lateral centre: uniform over positions that keep the sphere inside the image field of view
        fov_A = recipe.field_of_view_px * recipe.imaging.pixel_size_A
        lo = radius + p.margin_A
        hi = L - radius - p.margin_A
        span = min(fov_A, L) - 2 * (radius + p.margin_A)
        rng = streams.rng("structure.particle.position")
        # positions are drawn in a window of the field-of-view size centred in the cell, so that some crop holds it
        centre_xy = L / 2 + rng.uniform(-span / 2, span / 2, 2) if span > 0 else np.array([L / 2, L / 2])
        centre_xy = np.clip(centre_xy, lo, hi)
        centre = np.array([centre_xy[0], centre_xy[1], top - embed + radius])
        xyz = xyz + centre
        parts_xyz.append(xyz)
        parts_z.append(species)
        parts_flag.append(np.ones(len(species), bool))
        pmeta.update(ometa)
        pmeta["orientation_matrix"] = R.tolist()
        pmeta["embed_A"] = embed
        pmeta["center_A"] = centre.tolist()
        sphere = ParticleSphere((float(centre[0]), float(centre[1]), float(centre[2])), float(radius))
        pmeta["n_atoms_particle"] = int(len(species))
        meta.update(pmeta)
        bottom = centre[2] + radius
    else:
        meta.update({"kind": "none", "n_defects": 0, "has_twin": False, "has_stacking_fault": False,
                     "n_atoms_particle": 0})
        bottom = top
        sphere = None

    placement = None
    if t > 0:
        sub, placement, smeta = bank.draw(t, streams, grid_points(L, recipe.simulation.sampling_A))
        sub[:, 2] += vac
        placement.z_offset_A = vac
        if p.kind != "none":
            # carbon inside the (embedded) particle makes room for it
            d = np.linalg.norm(sub - centre, axis=1)
            keep = d > meta["radius_A"] + 0.5 * st.substrate.min_distance_A
            sub = sub[keep]
            placement.atoms = placement.atoms[keep]
        parts_xyz.append(sub)
        parts_z.append(np.full(len(sub), _atomic_number(st.substrate.element)))
        parts_flag.append(np.zeros(len(sub), bool))
        meta.update(smeta)
        meta["n_atoms_substrate"] = int(len(sub))
    else:
        meta["n_atoms_substrate"] = 0

    Lz = float(max(bottom, top) + vac)
    meta["cell_A"] = [L, L, Lz]
    positions = np.concatenate(parts_xyz) if parts_xyz else np.zeros((0, 3))
    numbers = np.concatenate(parts_z) if parts_z else np.zeros(0, int)
    flags = np.concatenate(parts_flag) if parts_flag else np.zeros(0, bool)
    return Scene((L, L, Lz), positions, numbers.astype(int), flags, meta, placement, sphere)
