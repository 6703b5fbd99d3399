"""Stage 1, structure: Construction Zone (czone) builds the scene.

A scene is a nanoparticle (FCC sphere, Wulff shape or truncated octahedron with twins/stacking faults on a random
{111} variant; a multiply twinned decahedron or icosahedron; or a wurtzite sphere with basal stacking faults) at a
random orientation and lateral position — or several such particles, optionally some across the edge of the field of
view — resting on (or slightly embedded in) a slab of amorphous carbon. Geometry, with the beam along +z (abTEM
propagates from z = 0 to the cell's far face):

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
planes, reflections, translations); the substrate generator runs under a seeded, restored global RNG state. Faceted
single crystals are czone volumes bounded by their facet planes (so they take the same defects); decahedra and
icosahedra come from ASE's cluster builders, which draw nothing at random.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.spatial.transform import Rotation

from hrtem_core.errors import InputError

from .distributions import bounds, sample, sample_category
from .recipe import FCC_METALS, MULTIPLY_TWINNED, Particle, Recipe, Substrate, phonon_sigma_A, split_binary
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
    """The sphere a scene's particle was cut from (for faceted kinds: its circumscribed sphere): centre (x, y, z) in
    Å in the scene's cell, radius in Å."""

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
    particle: ParticleSphere | None = None  # None: no particle; with several, the largest
    particles: list[ParticleSphere] = field(default_factory=list)  # every particle, in placement order
    field_origin_A: tuple[float, float] | None = None
    """(x, y) of the top-left corner of the field of view the particles were placed in, for scenes composed of
    several or off-field particles (the image is cropped to exactly that field); None: any crop that holds the
    particle."""

    def particle_only(self) -> "Scene":
        keep = self.is_particle
        return Scene(self.cell_A, self.positions[keep], self.numbers[keep], keep[keep], self.metadata,
                     particle=self.particle, particles=self.particles, field_origin_A=self.field_origin_A)


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


def _planar_defect_volume(generator, shape, normal, offsets_A, kinds, plane_point, shift_vectors):
    """Assemble the particle as czone volumes separated by defect planes.

    ``offsets_A`` are the plane positions along ``normal`` (sorted descending); each region below a plane takes the
    generator of the region above it transformed by that plane's defect (reflection = twin, translation = stacking
    fault). czone resolves overlaps by priority: a lower number wins. ``shape`` is the particle's outline as a list
    of czone algebraic objects (a sphere, or the planes of a convex polyhedron).
    """
    from czone.transform import Reflection, Translation
    from czone.volume import MultiVolume, Plane, Volume

    n = len(offsets_A)
    volumes = [Volume(alg_objects=list(shape), generator=generator, priority=n)]
    gen = generator
    for i, (offset, kind) in enumerate(zip(offsets_A, kinds)):
        point = plane_point(offset)
        if kind == "twin":
            t = Reflection(Plane(normal=normal.copy(), point=point))
        else:
            t = Translation(shift=shift_vectors[i])
        gen = gen.from_generator(transformation=[t])
        volumes.append(
            Volume(alg_objects=[*shape, Plane(normal=normal.copy(), point=point)], generator=gen, priority=n - (i + 1))
        )
    mv = MultiVolume(volumes=volumes)
    mv.populate_atoms()
    return mv.atoms, mv.species


class ParticleStreams:
    """The seed streams of particle ``index`` of a scene. Particle 0 draws from the names a lone particle always drew
    from ("structure.particle.radius_A", ...), so a one-particle scene draws exactly what it did before; particle
    ``i`` from the same names with "structure.particle[i]" (each particle's shape, defects, orientation and position
    independent of the others)."""

    PREFIX = "structure.particle"

    def __init__(self, streams: Streams, index: int):
        self.streams, self.index = streams, index

    def rng(self, name: str) -> np.random.Generator:
        if self.index and name.startswith(self.PREFIX):
            name = f"{self.PREFIX}[{self.index}]{name[len(self.PREFIX):]}"
        return self.streams.rng(name)


def _fcc_generator(element: str, a: float):
    return spacegroup_generator((_atomic_number(element),), ((0.0, 0.0, 0.0),), (a, a, a), (90, 90, 90), 225)


def spacegroup_generator(Z: tuple[int, ...], coords: tuple[tuple[float, float, float], ...],
                         cell_dims: tuple[float, float, float], cell_angs: tuple[float, float, float], sgn: int):
    """czone's ``Generator.from_spacegroup`` for these arguments, as a copy of one made once per process.

    Making one costs ~0.6 s (pymatgen's space-group tables), ~10 % of a structure's time on ``au-small``; a deep copy
    costs ~1 ms and is equal to a new one, so every structure still gets a generator of its own to transform."""
    import copy

    return copy.deepcopy(_spacegroup_generator(Z, coords, cell_dims, cell_angs, sgn))


@lru_cache(maxsize=64)
def _spacegroup_generator(Z, coords, cell_dims, cell_angs, sgn):
    from czone.generator import Generator

    return Generator.from_spacegroup(Z=list(Z), coords=np.array(coords, dtype=float), cellDims=list(cell_dims),
                                     cellAngs=list(cell_angs), sgn=sgn)


def _family(hkl: tuple[int, int, int]) -> np.ndarray:
    """Unit normals of the cubic family {hkl} (all sign changes and permutations, each once)."""
    import itertools

    vs = {tuple(s * v for s, v in zip(signs, perm)) for perm in itertools.permutations(hkl)
          for signs in itertools.product((1, -1), repeat=3)}
    n = np.array(sorted(vs), float)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def _polyhedron(normals: np.ndarray, distances: np.ndarray, radius_A: float):
    """The convex polyhedron {x : n_i . x <= k d_i} scaled (k) to the volume of a sphere of ``radius_A``; returns
    (plane distances in Å, vertices (M, 3) in Å)."""
    from scipy.spatial import ConvexHull, HalfspaceIntersection

    halfspaces = np.hstack([normals, -distances[:, None]])
    vertices = HalfspaceIntersection(halfspaces, np.zeros(3)).intersections
    k = (4 / 3 * math.pi * radius_A**3 / ConvexHull(vertices).volume) ** (1 / 3)
    return distances * k, vertices * k


def faceted_shape(kind: str, radius_A: float, rng: np.random.Generator, facets) -> tuple[list, np.ndarray, dict]:
    """czone planes of an fcc_wulff or fcc_octahedron of equal-volume radius ``radius_A``; (planes, vertices Å,
    shape metadata)."""
    from czone.volume import Plane

    n111, n100, n110 = _family((1, 1, 1)), _family((1, 0, 0)), _family((1, 1, 0))
    if kind == "fcc_wulff":
        g100 = sample(facets.gamma100_rel, rng)
        g110 = sample(facets.gamma110_rel, rng)
        normals = np.vstack([n111, n100, n110])
        d = np.concatenate([np.ones(len(n111)), np.full(len(n100), g100), np.full(len(n110), g110)])
        meta = {"gamma100_rel": g100, "gamma110_rel": g110}
    else:
        t = sample(facets.truncation, rng)
        # {100} distance / {111} distance: sqrt(3) touches the octahedron's vertices (no cut), sqrt(3)/2 gives the
        # cuboctahedron, 2/sqrt(3) (t = 2/3) the regular truncated octahedron
        rho = math.sqrt(3) * (1 - t / 2)
        normals = np.vstack([n111, n100])
        d = np.concatenate([np.ones(len(n111)), np.full(len(n100), rho)])
        meta = {"truncation": t}
    distances, vertices = _polyhedron(normals, d, radius_A)
    planes = [Plane(normal=n.copy(), point=n * dist) for n, dist in zip(normals, distances)]
    return planes, vertices, meta


_SHELL_COUNTS: dict[tuple, int] = {}


def _cluster(kind: str, element: str, a: float, size: tuple):
    from ase.cluster import Decahedron, Icosahedron

    if kind == "fcc_icosahedron":
        return Icosahedron(element, size[0], latticeconstant=a)
    return Decahedron(element, *size, latticeconstant=a)


def _n_atoms(kind: str, size: tuple) -> int:
    """Atoms of a decahedron (p, q, r) or icosahedron (shells,): independent of element and lattice constant."""
    if kind == "fcc_icosahedron":
        n = size[0]
        return (10 * n**3 - 15 * n**2 + 11 * n - 3) // 3
    p, q, r = size
    # each step of q adds the same layer along the 5-fold axis (checked for p <= 12, r <= 2): N is linear in q, so
    # two builds per (p, r) give every q
    for qq in (1, 2):
        if (p, qq, r) not in _SHELL_COUNTS:
            _SHELL_COUNTS[(p, qq, r)] = len(_cluster(kind, "Au", 4.0, (p, qq, r)))
    n1, n2 = _SHELL_COUNTS[(p, 1, r)], _SHELL_COUNTS[(p, 2, r)]
    return n1 + (q - 1) * (n2 - n1)


def twinned_cluster(kind: str, element: str, a: float, radius_A: float, reentrance: int):
    """Positions (centred) of the Mackay icosahedron or Marks decahedron (ASE's builders, 5-fold axis along z for the
    decahedron) whose equal-volume radius (N atoms of a^3/4 each) is closest to ``radius_A``; (positions, numbers,
    metadata)."""
    target = 4 / 3 * math.pi * radius_A**3 / (a**3 / 4)
    options = []
    for p in range(2, 60):  # sizes grow with p: stop once the smallest of this p is twice too large
        if kind == "fcc_icosahedron":
            sizes = [(p,)]
        else:  # q from 1 (regular decahedron) to p // 2 (elongated along the 5-fold axis)
            sizes = [(p, q, min(reentrance, p - 2)) for q in range(1, max(1, p // 2) + 1)]
        options += sizes
        if min(_n_atoms(kind, o) for o in sizes) > 2 * target:
            break
    size = min(options, key=lambda o: (abs(math.log(_n_atoms(kind, o) / target)), o))
    atoms = _cluster(kind, element, a, size)
    xyz = atoms.positions - atoms.positions.mean(axis=0)
    names = ("shells",) if kind == "fcc_icosahedron" else ("p", "q", "r")
    return xyz, atoms.numbers.copy(), {"cluster_size": dict(zip(names, size))}


def build_particle(p: Particle, streams, kind: str | None = None, element: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """Atoms of one particle centred on the origin in the crystal frame (not yet rotated). ``kind`` and ``element``
    are this structure's draws (default: the recipe's fixed values); ``streams`` a :class:`Streams` or
    :class:`ParticleStreams`."""
    import czone  # noqa: F401  (import cost paid once per process)
    from czone.volume import Sphere

    kind = p.kind if kind is None else kind
    element = p.element if element is None else element
    radius = sample(p.radius_A, streams.rng("structure.particle.radius_A"))
    n_requested = int(round(sample(p.defects.n, streams.rng("structure.particle.defects.n"))))
    if n_requested < 0:
        raise InputError(f"structure.particle.defects.n drew {n_requested}; it must be >= 0")
    rng = streams.rng("structure.particle.defects")
    sphere = Sphere(radius=radius, center=np.zeros(3))
    meta: dict = {"kind": kind, "radius_A": radius}

    if kind in MULTIPLY_TWINNED:
        a = p.lattice_for(element)
        reentrance = int(round(sample(p.facets.marks_reentrance, streams.rng("structure.particle.facets"))))
        xyz, numbers, shape_meta = twinned_cluster(kind, element, a, radius, reentrance)
        n_twins = 5 if kind == "fcc_decahedron" else 30  # twin boundaries between the 5 / 20 tetrahedral segments
        meta.update({"radius_requested_A": radius, "radius_A": (3 * len(xyz) * a**3 / 4 / (4 * math.pi)) ** (1 / 3),
                     "material": element, "lattice": "fcc", "lattice_A": a, **shape_meta,
                     "n_defects_requested": n_requested, "n_defects": n_twins, "defects": [], "n_twins": n_twins,
                     "n_stacking_faults": 0, "has_twin": True, "has_stacking_fault": False,
                     "multiply_twinned": True})
        return xyz, numbers, meta, np.eye(3) * a

    shape = [sphere]
    extent = (-radius, radius)  # of the shape along the defect planes' normal
    if kind in ("fcc_sphere", "fcc_wulff", "fcc_octahedron"):
        a = p.lattice_for(element)
        gen = _fcc_generator(element, a)
        hkl = np.array(FCC_111_VARIANTS[int(rng.integers(len(FCC_111_VARIANTS)))])
        normal = hkl / np.linalg.norm(hkl)
        d = a / math.sqrt(3)
        if kind != "fcc_sphere":
            shape, vertices, shape_meta = faceted_shape(kind, radius, streams.rng("structure.particle.facets"),
                                                        p.facets)
            meta.update(shape_meta)
            extent = (float((vertices @ normal).min()), float((vertices @ normal).max()))
        # {111} atomic planes through lattice sites: normal . x = m d
        m = np.arange(math.ceil(extent[0] / d), math.floor(extent[1] / d) + 1)
        if kind == "fcc_sphere":
            inner = m[(np.abs(m * d) < radius - d)]  # a defect plane needs atoms on both sides
        else:
            inner = m[(m * d > extent[0] + d) & (m * d < extent[1] - d)]
        picks = _choose_planes(rng, inner, n_requested, p.defects.min_separation_planes)
        offsets = sorted((float(inner[i] * d) for i in picks), reverse=True)
        kinds = ["twin" if rng.uniform() < p.defects.twin_fraction else "stacking_fault" for _ in offsets]
        # Shockley partial a/6<112> lying in the chosen {111} plane
        partial = a / 6 * np.array([hkl[0], hkl[1], -2 * hkl[2]], float)
        shifts = [partial] * len(offsets)
        material = {"material": element, "lattice": "fcc", "lattice_A": a, "defect_plane_hkl": hkl.tolist()}
        lattice_matrix = np.eye(3) * a
    elif kind == "wurtzite_sphere":
        cation, anion = split_binary(element)
        a, c, u = p.lattice_A, p.lattice_c_A, p.wurtzite_u
        gen = spacegroup_generator((_atomic_number(cation), _atomic_number(anion)),
                                   ((1 / 3, 2 / 3, 0.0), (1 / 3, 2 / 3, u)), (a, a, c), (90, 90, 120), 186)
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
        material = {"material": element, "lattice": "wurtzite", "lattice_A": a, "lattice_c_A": c,
                    "defect_plane_hkl": [0, 0, 1]}
    else:  # pragma: no cover - callers check for "none"
        raise ValueError(f"no particle for kind {kind!r}")

    positions, species = _planar_defect_volume(
        gen, shape, normal, offsets, kinds, lambda off: normal * off, shifts
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


def orientation_matrix(p: Particle, lattice_matrix: np.ndarray, streams) -> tuple[np.ndarray, dict]:
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


@dataclass
class _PlacedParticle:
    """One particle of a scene: atoms (in the scene's cell), metadata, and its bounding sphere."""

    xyz: np.ndarray
    species: np.ndarray
    meta: dict
    centre: np.ndarray  # (x, y, z) Å
    reach_A: float  # circumscribed radius (the sphere's radius for spheres)
    top_A: float  # highest z any atom may reach (for the cell)
    off_field: bool = False


def _oriented_particle(p: Particle, ps, kind: str, element: str, t: float):
    """A particle built and rotated about its centre: (xyz, species, meta, reach, below, above, embed) where
    ``reach`` is its circumscribed radius, ``below`` / ``above`` how far it extends down / up from its centre (Å),
    and ``embed`` how far it sinks into the substrate. Spheres keep the sphere they were cut from as their outline."""
    xyz, species, pmeta, lattice = build_particle(p, ps, kind, element)
    R, ometa = orientation_matrix(p, lattice, ps)
    xyz = xyz @ R.T
    radius = pmeta["radius_A"]
    if kind in ("fcc_sphere", "wurtzite_sphere"):
        reach = below = above = radius
    else:
        reach = float(np.linalg.norm(xyz, axis=1).max())
        below, above = float(-xyz[:, 2].min()), float(xyz[:, 2].max())
        pmeta["circumradius_A"] = reach
    embed = min(max(sample(p.embed_A, ps.rng("structure.particle.embed_A")), 0.0), below) if t > 0 else 0.0
    pmeta.update(ometa)
    pmeta["orientation_matrix"] = R.tolist()
    pmeta["embed_A"] = embed
    return xyz, species, pmeta, reach, below, above, embed


def visible_fraction(xy: np.ndarray, lo_A: tuple[float, float], hi_A: tuple[float, float], step_A: float = 0.2
                     ) -> float:
    """Fraction of the area of the convex hull of projected atom positions ``xy`` (N, 2) inside the rectangle
    [lo, hi) (x, y in Å), sampled on a ``step_A`` grid."""
    from scipy.spatial import ConvexHull, Delaunay

    hull = Delaunay(xy[ConvexHull(xy).vertices])
    x = np.arange(xy[:, 0].min(), xy[:, 0].max() + step_A, step_A)
    y = np.arange(xy[:, 1].min(), xy[:, 1].max() + step_A, step_A)
    X, Y = np.meshgrid(x, y)
    pts = np.column_stack([X.ravel(), Y.ravel()])
    inside = hull.find_simplex(pts) >= 0
    within = (pts[:, 0] >= lo_A[0]) & (pts[:, 0] < hi_A[0]) & (pts[:, 1] >= lo_A[1]) & (pts[:, 1] < hi_A[1])
    return float((inside & within).sum() / max(inside.sum(), 1))


PLACEMENT_TRIES = 1000


def field_window_A(recipe: Recipe) -> tuple[float, float]:
    """(origin, side) in Å of the field of view centred in the cell, on whole pixels of the image grid."""
    grid, size = recipe.image_grid_px, recipe.field_of_view_px
    pixel = recipe.structure.cell.extent_A / grid
    return (grid - size) // 2 * pixel, size * pixel


def _compose(recipe: Recipe, streams: Streams, kind: str, element: str, n: int, top: float, t: float
             ) -> tuple[tuple[float, float], list[_PlacedParticle]]:
    """``n`` particles placed without overlap (bounding discs at least ``min_gap_A`` apart) in the centred field of
    view; each lies across one of its edges (25-75 % of its width inside) with ``off_field_probability``. Positions
    come from each particle's own stream, by rejection: the recipe is validated to leave room (PLACEMENT_MAX_DENSITY)."""
    p = recipe.structure.particle
    x0, side = field_window_A(recipe)
    x1 = x0 + side
    placed: list[_PlacedParticle] = []
    for i in range(n):
        ps = ParticleStreams(streams, i)
        xyz, species, pmeta, reach, below, above, embed = _oriented_particle(p, ps, kind, element, t)
        rng = ps.rng("structure.particle.position")
        off = bool(rng.uniform() < p.off_field_probability)
        lo, hi = x0 + reach + p.margin_A, x1 - reach - p.margin_A
        for _ in range(PLACEMENT_TRIES):
            xy = rng.uniform(lo, hi, 2)
            if off:
                axis, far = int(rng.integers(2)), bool(rng.integers(2))
                depth = rng.uniform(-0.5, 0.5) * reach  # of the centre inside the field (negative: outside)
                xy[axis] = x1 - depth if far else x0 + depth
            if all(np.hypot(*(xy - q.centre[:2])) >= reach + q.reach_A + p.min_gap_A for q in placed):
                break
        else:
            raise RuntimeError(f"could not place particle {i + 1} of {n} without overlap in {PLACEMENT_TRIES} tries: "
                               "lower structure.particle.count or radius_A, or raise min_gap_A's field of view")
        centre = np.array([xy[0], xy[1], top - embed + below])
        placed.append(_PlacedParticle(xyz + centre, species, pmeta, centre, reach, centre[2] + above, off))
    return (x0, x0), placed


def build_scene(recipe: Recipe, streams: Streams, bank: SubstrateBank) -> Scene:
    """The full scene of one structure; ``Scene.particle_only()`` gives the substrate-free scene on the same cell.

    A recipe with a single particle of the sphere kinds makes the scene (and draws the random numbers) it always
    did. Other recipes (faceted kinds, drawn kind or element, several or off-field particles) add per-particle
    metadata: ``particles`` (one entry each), ``n_particles``, ``element``; the scalar fields (``radius_A``,
    ``center_A``, ``kind``, orientation...) then describe the primary particle (the largest fully in the field of
    view, else the largest), and the defect counts and flags (``n_defects``, ``has_twin``...) cover all particles."""
    st = recipe.structure
    p = st.particle
    L = st.cell.extent_A
    vac = st.cell.vacuum_A
    t = sample(st.substrate.thickness_A, streams.rng("structure.substrate.thickness_A"))
    t = max(t, 0.0)
    meta: dict = {"cell_extent_A": L, "substrate_thickness_A": t, "substrate_element": st.substrate.element}

    parts_xyz, parts_z, parts_flag = [], [], []
    top = vac + t  # exit face of the substrate
    placed: list[_PlacedParticle] = []
    field_origin = None
    if p.kind != "none":
        kind = sample_category(p.kind, streams.rng("structure.particle.kind"))
        element = sample_category(p.element, streams.rng("structure.particle.element"))
        if p.composed:
            n = int(round(sample(p.count, streams.rng("structure.particle.count"))))
            field_origin, placed = _compose(recipe, streams, kind, element, max(n, 1), top, t)
        else:
            xyz, species, pmeta, reach, below, above, embed = _oriented_particle(p, streams, kind, element, t)
            # lateral centre: uniform over positions that keep the particle inside the image field of view
            fov_A = recipe.field_of_view_px * recipe.imaging.pixel_size_A
            lo = reach + p.margin_A
            hi = L - reach - p.margin_A
            span = min(fov_A, L) - 2 * (reach + p.margin_A)
            rng = streams.rng("structure.particle.position")
            # positions are drawn in a window of the field-of-view size centred in the cell, so that some crop holds it
            centre_xy = L / 2 + rng.uniform(-span / 2, span / 2, 2) if span > 0 else np.array([L / 2, L / 2])
            centre_xy = np.clip(centre_xy, lo, hi)
            centre = np.array([centre_xy[0], centre_xy[1], top - embed + below])
            placed = [_PlacedParticle(xyz + centre, species, pmeta, centre, reach, centre[2] + above)]
        for q in placed:
            q.meta["center_A"] = q.centre.tolist()
            q.meta["n_atoms_particle"] = int(len(q.species))
            parts_xyz.append(q.xyz)
            parts_z.append(q.species)
            parts_flag.append(np.ones(len(q.species), bool))
        spheres = [ParticleSphere((float(q.centre[0]), float(q.centre[1]), float(q.centre[2])), float(q.reach_A))
                   for q in placed]
        if p.extended:
            primary = _describe_particles(meta, placed, element, recipe, field_origin)
        else:
            primary = 0
            meta.update(placed[0].meta)
        sphere = spheres[primary]
        bottom = max(q.top_A for q in placed)
    else:
        meta.update({"kind": "none", "n_defects": 0, "has_twin": False, "has_stacking_fault": False,
                     "n_atoms_particle": 0})
        bottom = top
        sphere = None
        spheres = []

    placement = None
    if t > 0:
        sub, placement, smeta = bank.draw(t, streams, grid_points(L, recipe.simulation.sampling_A))
        sub[:, 2] += vac
        placement.z_offset_A = vac
        if placed:
            # carbon inside the (embedded) particles makes room for them: for a sphere, within its radius + half the
            # carbon's minimum distance; for a faceted particle, within an FCC nearest-neighbour distance a/sqrt(2)
            # of one of its atoms (every point inside an FCC crystal is within a/2 of an atom)
            keep = np.ones(len(sub), bool)
            for q in placed:
                if q.meta["kind"] in ("fcc_sphere", "wurtzite_sphere"):
                    keep &= np.linalg.norm(sub - q.centre, axis=1) > q.meta["radius_A"] + 0.5 * st.substrate.min_distance_A
                else:
                    from scipy.spatial import cKDTree

                    near = cKDTree(q.xyz).query(sub, distance_upper_bound=q.meta["lattice_A"] / math.sqrt(2))[0]
                    keep &= ~np.isfinite(near)
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
    return Scene((L, L, Lz), positions, numbers.astype(int), flags, meta, placement, sphere, spheres,
                 field_origin)


def _describe_particles(meta: dict, placed: list[_PlacedParticle], element: str, recipe: Recipe,
                        field_origin) -> int:
    """Fill ``meta`` with the per-particle record and the primary particle's scalars; returns the primary's index."""
    records = []
    for q in placed:
        rec = dict(q.meta)
        rec["off_field"] = q.off_field
        if q.off_field:
            x0, side = field_window_A(recipe)
            rec["visible_fraction"] = visible_fraction(q.xyz[:, :2], (x0, x0), (x0 + side, x0 + side))
        else:
            rec["visible_fraction"] = 1.0
        records.append(rec)
    in_field = [i for i, q in enumerate(placed) if not q.off_field] or list(range(len(placed)))
    primary = max(in_field, key=lambda i: (records[i]["radius_A"], -i))
    meta.update(records[primary])
    meta["n_particles"] = len(records)
    meta["n_off_field"] = sum(r["off_field"] for r in records)
    meta["primary_particle"] = primary
    for key in ("n_defects", "n_defects_requested", "n_twins", "n_stacking_faults", "n_atoms_particle"):
        meta[key] = int(sum(r[key] for r in records))
    meta["has_twin"] = any(r["has_twin"] for r in records)
    meta["has_stacking_fault"] = any(r["has_stacking_fault"] for r in records)
    meta["element"] = element
    if element in FCC_METALS:
        # tabulated room-temperature values; the simulation uses them with simulation.particle_phonon_sigma: element
        meta["debye_waller_B_A2"] = FCC_METALS[element]["debye_waller_B_A2"]
        meta["thermal_sigma_A"] = phonon_sigma_A(element)
    meta["field_origin_A"] = list(field_origin) if field_origin is not None else None
    meta["particles"] = records
    return primary
