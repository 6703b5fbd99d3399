"""Recipes: typed, validated descriptions of a synthetic dataset.

A recipe is YAML. It is validated once, at load, against the models below; every error names the dotted key, the
value and what is allowed. Inside the pipeline the resolved recipe is trusted. Units are in the key names (Å, eV,
mrad, rad, e/Å²).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from hrtem_core.config import Origins, apply_overrides, config_hash, read_yaml_mapping, validate
from hrtem_core.errors import ConfigError

from .distributions import Categorical, Param, Uniform, bounds, categories

RECIPE_DIR = Path(__file__).parent / "recipes"


class RecipeError(ConfigError):
    """A recipe that cannot be used; the message names the key, the value and what is allowed."""


def _check_element(symbol: str, key: str) -> None:
    from ase.data import atomic_numbers

    if symbol not in atomic_numbers or symbol == "X":
        raise ValueError(f"{key}={symbol!r} is not a chemical element symbol (e.g. Au, Pt, C)")


def split_binary(formula: str) -> tuple[str, str]:
    """'CdSe' -> ('Cd', 'Se'); raises ValueError for anything that is not two element symbols."""
    import re

    from ase.data import atomic_numbers

    parts = re.findall(r"[A-Z][a-z]?", formula)
    if len(parts) != 2 or "".join(parts) != formula or any(p not in atomic_numbers for p in parts):
        raise ValueError(f"wurtzite element {formula!r} must name two elements, cation first, e.g. 'CdSe'")
    return parts[0], parts[1]


def _at_least(param, low: float, strict: bool = False):
    """A parameter whose every possible draw must be >= low (> low when strict)."""
    lo = bounds(param)[0]
    if lo < low or (strict and lo == low):
        rel = ">" if strict else ">="
        raise ValueError(f"every value must be {rel} {low}, but this one can be {lo} (use a bounded distribution: "
                         "uniform, truncnormal, loguniform or choice)")
    return param


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Defects(_Section):
    """Planar defects on one randomly chosen plane variant ({111} for FCC, (0001) for wurtzite)."""

    n: Param = 0
    """Number of defects requested (rounded); fewer are placed where the particle has too few planes."""

    @field_validator("n")
    @classmethod
    def _nonnegative(cls, value):
        return _at_least(value, 0.0)

    twin_fraction: float = Field(default=0.5, ge=0, le=1)
    min_separation_planes: int = Field(default=3, ge=1)


class Orientation(_Section):
    mode: Literal["random", "zone_axis"] = "random"
    zone_axis: tuple[int, int, int] = (1, 1, 0)
    tilt_mrad: Param = 0.0
    """Tilt away from the zone axis (mode zone_axis): angle of the tilt, about a random in-plane axis."""


# FCC metals at room temperature. Lattice constants: Wyckoff, Crystal Structures vol. 1 (1963) / CRC Handbook of
# Chemistry and Physics, 293 K (Au 4.07825 Å is the value of the reference study, Rangel DaCosta et al. 2024).
# Debye-Waller B (Å², 293 K): Peng, Ren, Dudarev & Whelan, Acta Cryst. A52 (1996) 456-470, Table 2 (Debye model
# fitted to measured data); the frozen-phonon displacement along each axis is sigma = sqrt(B / (8 pi^2)).
FCC_METALS: dict[str, dict[str, float]] = {
    "Au": {"lattice_A": 4.07825, "debye_waller_B_A2": 0.5944},
    "Pt": {"lattice_A": 3.9242, "debye_waller_B_A2": 0.3184},
    "Pd": {"lattice_A": 3.8907, "debye_waller_B_A2": 0.4288},
    "Ag": {"lattice_A": 4.0853, "debye_waller_B_A2": 0.6695},
}


def phonon_sigma_A(element: str) -> float:
    """Room-temperature RMS thermal displacement along one axis (Å) of an FCC metal of :data:`FCC_METALS`."""
    return math.sqrt(FCC_METALS[element]["debye_waller_B_A2"] / (8 * math.pi**2))


FCC_KINDS = ("fcc_sphere", "fcc_wulff", "fcc_decahedron", "fcc_icosahedron", "fcc_octahedron")
PARTICLE_KINDS = (*FCC_KINDS, "wurtzite_sphere", "none")
MULTIPLY_TWINNED = ("fcc_decahedron", "fcc_icosahedron")
# Largest circumscribed radius / equal-volume radius of each shape, measured over the size range and shape
# parameters the builders use (tests/test_structures.py checks it): for validating that particles fit.
CIRCUMRADIUS_PER_RADIUS = {"fcc_sphere": 1.0, "wurtzite_sphere": 1.0, "fcc_wulff": 1.25, "fcc_decahedron": 1.45,
                           "fcc_icosahedron": 1.25, "fcc_octahedron": 1.5, "none": 0.0}
PLACEMENT_MAX_DENSITY = 0.35
"""Most of the usable field of view that the particles' bounding discs (with half the gap) may cover: random
sequential placement jams near 0.55, so at 0.35 the seeded rejection sampling finds a place in a few tries."""


class Facets(_Section):
    """Shape parameters of the faceted FCC kinds. Surface energies are relative to gamma{111}."""

    gamma100_rel: Param = Uniform(dist="uniform", low=1.0, high=1.25)
    """fcc_wulff: gamma{100} / gamma{111} (Au, Pt, Pd, Ag: about 1.1-1.2 from DFT, Vitos et al. 1998)."""
    gamma110_rel: Param = Uniform(dist="uniform", low=1.1, high=1.4)
    """fcc_wulff: gamma{110} / gamma{111}."""
    truncation: Param = Uniform(dist="uniform", low=0.0, high=0.667)
    """fcc_octahedron: 0 = octahedron, 0.667 = regular truncated octahedron, 1 = cuboctahedron ({100} cut)."""
    marks_reentrance: Param = 1
    """fcc_decahedron: depth r of the Marks re-entrant grooves (0 = Ino decahedron)."""

    @field_validator("gamma100_rel", "gamma110_rel")
    @classmethod
    def _positive(cls, value):
        return _at_least(value, 0.0, strict=True)

    @field_validator("truncation")
    @classmethod
    def _fraction(cls, value):
        lo, hi = bounds(value)
        if lo < 0 or hi > 1:
            raise ValueError(f"truncation must lie in [0, 1] (0 octahedron, 1 cuboctahedron); bounds ({lo}, {hi})")
        return value

    @field_validator("marks_reentrance")
    @classmethod
    def _depth(cls, value):
        return _at_least(value, 0.0)


# Keys added to Particle after datasets were made with it: the resolved recipe lists them only where they differ
# from their defaults, so an older recipe keeps its hash (and its datasets their content hash).
_NEW_PARTICLE_KEYS = {"count": 1, "min_gap_A": 2.0, "off_field_probability": 0.0}


class Particle(_Section):
    kind: Categorical = "fcc_sphere"
    """One of PARTICLE_KINDS, or ``{dist: choice, values: [fcc_sphere, fcc_wulff, ...]}`` (FCC kinds only), drawn per
    structure. Faceted kinds: fcc_wulff (Wulff shape of {111}/{100}/{110}), fcc_octahedron (truncated by {100}),
    fcc_decahedron (Marks decahedron, 5 twins) and fcc_icosahedron (Mackay icosahedron, 20 twinned tetrahedra)."""
    element: Categorical = "Au"
    """FCC element, or a choice of them drawn per structure; for wurtzite_sphere: two elements, e.g. 'CdSe' -> cation
    Cd, anion Se."""
    lattice_A: float | None = Field(default=None, gt=0)
    """FCC cubic lattice constant, or wurtzite a. Not given: FCC_METALS' value for the element (4.07825 for
    wurtzite_sphere and none, the old default); with a choice of elements it must not be given."""
    lattice_c_A: float = Field(default=7.01, gt=0)
    """Wurtzite c (ignored for FCC)."""
    wurtzite_u: float = Field(default=0.375, gt=0, lt=1)
    radius_A: Param = 10.0
    """Radius of the sphere of equal volume (for spheres: the radius). Faceted kinds built from whole shells
    (decahedron, icosahedron) take the size closest to it and record the radius they have."""
    defects: Defects = Defects()
    """Twins / stacking faults on one {111} variant (fcc_sphere, fcc_wulff, fcc_octahedron, wurtzite_sphere);
    decahedra and icosahedra are multiply twinned by construction and take none."""
    orientation: Orientation = Orientation()
    embed_A: Param = 0.0
    """How far the particle sinks into the substrate (0 = resting on it)."""
    margin_A: float = Field(default=2.0, ge=0)
    """Minimum distance between the particle and the edges of the field of view."""
    facets: Facets = Facets()
    count: Param = 1
    """Particles per image (rounded). More than one, or off_field_probability > 0: the particles are placed without
    overlap in a field of view centred in the cell, and the image is cropped to exactly that field."""
    min_gap_A: float = Field(default=2.0, ge=0)
    """Smallest distance between the circumscribed spheres of two particles of one image."""
    off_field_probability: float = Field(default=0.0, ge=0, le=1)
    """Chance that a particle lies across an edge of the field of view (20-80 % of its width inside)."""

    @field_validator("embed_A")
    @classmethod
    def _nonnegative(cls, value):
        return _at_least(value, 0.0)

    @field_validator("count")
    @classmethod
    def _count(cls, value):
        lo, hi = bounds(value)
        if lo < 0.5 or hi >= 50.5:
            raise ValueError(f"particles per image must round to 1..50 in every draw, but this one can be {lo} to "
                             f"{hi} (use a bounded distribution, e.g. {{dist: choice, values: [1, 2, 3]}})")
        return value

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        for key, default in _NEW_PARTICLE_KEYS.items():
            if data.get(key) == default:
                data.pop(key)
        if not set(self.kinds()) & {"fcc_wulff", "fcc_octahedron", "fcc_decahedron"} \
                and data.get("facets") == Facets().model_dump(mode="json"):
            data.pop("facets")  # a recipe without faceted kinds keeps the dump it had before they existed
        return data

    def kinds(self) -> list[str]:
        return categories(self.kind)

    def elements(self) -> list[str]:
        return categories(self.element)

    @property
    def composed(self) -> bool:
        """Several particles or off-field ones: placed in a fixed, centred field of view (see ``count``)."""
        return bounds(self.count)[1] >= 1.5 or self.off_field_probability > 0

    @property
    def extended(self) -> bool:
        """Uses options newer than the single sphere: samples then carry the per-particle metadata."""
        return (self.composed or not isinstance(self.kind, str) or not isinstance(self.element, str)
                or self.kind not in ("fcc_sphere", "wurtzite_sphere", "none"))

    def max_circumradius_A(self) -> float:
        return bounds(self.radius_A)[1] * max(CIRCUMRADIUS_PER_RADIUS[k] for k in self.kinds())

    @model_validator(mode="after")
    def _element(self):
        kinds = self.kinds()
        for k in kinds:
            if k not in PARTICLE_KINDS:
                raise ValueError(f"structure.particle.kind={k!r} is not a particle kind; allowed: "
                                 f"{', '.join(PARTICLE_KINDS)}")
        if not isinstance(self.kind, str) and any(k not in FCC_KINDS for k in kinds):
            raise ValueError(f"structure.particle.kind: a choice may only hold FCC kinds ({', '.join(FCC_KINDS)}), "
                             f"got {kinds}")
        elements = self.elements()
        if not isinstance(self.element, str) and kinds[0] not in FCC_KINDS:
            raise ValueError(f"structure.particle.element: a choice of elements needs FCC kinds, got kind {kinds}")
        if kinds[0] in FCC_KINDS:
            for e in elements:
                _check_element(e, "structure.particle.element")
                if self.lattice_A is None and e not in FCC_METALS:
                    raise ValueError(f"structure.particle.element={e!r} has no tabulated lattice constant (known: "
                                     f"{', '.join(FCC_METALS)}): give structure.particle.lattice_A")
            if len(elements) > 1 and self.lattice_A is not None:
                raise ValueError(f"structure.particle.lattice_A={self.lattice_A} cannot hold for every element of "
                                 f"{elements}: leave it out, it is looked up per element ({', '.join(FCC_METALS)})")
            if self.lattice_A is None and len(elements) == 1:
                self.lattice_A = FCC_METALS[elements[0]]["lattice_A"]
        elif kinds[0] == "wurtzite_sphere":
            split_binary(self.element)
        if self.lattice_A is None and kinds[0] not in FCC_KINDS:
            self.lattice_A = 4.07825  # the old default, so that older recipes resolve as before
        if self.off_field_probability > 0 and kinds[0] == "none":
            raise ValueError("structure.particle.off_field_probability needs a particle kind other than none")
        return self

    def lattice_for(self, element: str) -> float:
        """Lattice constant (Å) of ``element``: the recipe's, or the table's where the recipe leaves it open."""
        return self.lattice_A if self.lattice_A is not None else FCC_METALS[element]["lattice_A"]


class Substrate(_Section):
    thickness_A: Param = 0.0
    """Amorphous carbon thickness; 0 = particle in vacuum."""
    density_per_A3: float = Field(default=0.1103075, gt=0)
    min_distance_A: float = Field(default=1.4, gt=0)
    element: str = "C"
    bank_size: int = Field(default=4, ge=1)
    """Number of distinct periodic substrate blocks generated once per dataset and reused with random shifts."""

    @field_validator("element")
    @classmethod
    def _element(cls, value: str):
        _check_element(value, "structure.substrate.element")
        return value


class Cell(_Section):
    extent_A: float = Field(default=64.0, gt=0)
    """Lateral size of the simulated (periodic) cell, square."""
    vacuum_A: float = Field(default=2.0, ge=0)
    """Vacuum above and below the scene along the beam."""


class Structure(_Section):
    particle: Particle = Particle()
    substrate: Substrate = Substrate()
    cell: Cell = Cell()


class Simulation(_Section):
    backend: Literal["abtem", "prismatic"] = "abtem"
    engine: Literal["fast", "plain"] = "fast"
    """abTEM backend: ``fast`` reuses the substrate bank's exit waves and shares work between the full and the
    particle-only scene (``simulate.FastEngine``); ``plain`` runs abTEM's multislice on each scene from scratch. Both
    give the same waves to rounding. Prismatic ignores it."""
    energy_eV: float = Field(default=300e3, gt=0)
    sampling_A: float = Field(default=0.1, gt=0)
    slice_thickness_A: float = Field(default=2.0, gt=0)
    n_phonons: int = Field(default=1, ge=1)
    phonon_sigma_A: float = Field(default=0.1, ge=0)
    """Standard deviation of the frozen-phonon displacement along each axis."""
    particle_phonon_sigma: Literal["recipe", "element"] = "recipe"
    """``recipe``: every atom is displaced with ``phonon_sigma_A``. ``element``: the atoms of a metal of the table
    (``FCC_METALS``: Au, Pt, Pd, Ag) with that metal's room-temperature value, sqrt(B / 8 pi^2); the other atoms
    (substrate, CdSe) with ``phonon_sigma_A``. For recipes that mix metals."""
    parametrization: Literal["lobato", "kirkland", "peng"] = "lobato"
    device: Literal["auto", "cpu", "gpu"] = "auto"

    @model_serializer(mode="wrap")
    def _omit_default_sigma_mode(self, handler):
        data = handler(self)  # left out at its default: recipes written before this key keep their hashes
        if self.particle_phonon_sigma == "recipe":
            data.pop("particle_phonon_sigma", None)
        return data

    @model_validator(mode="after")
    def _prismatic_potentials(self):
        if self.backend == "prismatic" and self.parametrization != "kirkland":
            raise ValueError(f"simulation.parametrization={self.parametrization!r} is not available with "
                             "simulation.backend=prismatic, which only has Kirkland potentials: set kirkland")
        return self


# abTEM's polar aberration symbols (Å for magnitudes, rad for angles); C10 is set through imaging.defocus_A. The
# schema of imaging.aberrations: the image stage passes these names to abTEM's CTF.
ABERRATION_MAGNITUDES = ("C12", "C21", "C23", "C30", "C32", "C34", "C41", "C43", "C45", "C50", "C52", "C54", "C56")
ABERRATION_ANGLES = ("phi12", "phi21", "phi23", "phi32", "phi34", "phi41", "phi43", "phi45", "phi52", "phi54", "phi56")
ABERRATION_KEYS = frozenset({f"{s}_A" for s in ABERRATION_MAGNITUDES} | {f"{s}_rad" for s in ABERRATION_ANGLES})


class Imaging(_Section):
    n_conditions: int = Field(default=1, ge=1)
    """Imaging conditions (images) per simulated structure, each drawn independently."""
    pixel_size_A: float = Field(default=0.2, gt=0)
    crop_px: int | None = Field(default=None, ge=8)
    """Side of the final square image; None keeps the whole field of view."""
    defocus_A: Param = 0.0
    """abTEM's defocus, i.e. -C10 (positive = underfocus)."""
    focal_spread_A: Param = 0.0
    """Standard deviation of the focal spread (partial temporal coherence)."""
    semiangle_cutoff_mrad: Param = 1e9
    """Objective aperture semi-angle; the default means no aperture."""
    aberrations: dict[str, Param] = Field(default_factory=dict)
    """Further polar aberration coefficients: C30_A (Cs), C50_A (C5), C12_A with phi12_rad, ... (abTEM symbols)."""
    dose_e_per_A2: Param = 400.0
    median_filter_px: int = Field(default=0, ge=0)
    """Side of the median filter applied after noise (0 = off, e.g. 3 for 3 x 3)."""

    @field_validator("aberrations")
    @classmethod
    def _check_aberrations(cls, value: dict[str, Any]):
        for key in value:
            if key not in ABERRATION_KEYS:
                raise ValueError(
                    f"unknown aberration {key!r}; allowed: {', '.join(sorted(ABERRATION_KEYS))} "
                    "(defocus is set with imaging.defocus_A)"
                )
        return value

    @field_validator("dose_e_per_A2", "focal_spread_A")
    @classmethod
    def _nonnegative(cls, value):
        return _at_least(value, 0.0)

    @field_validator("semiangle_cutoff_mrad")
    @classmethod
    def _positive(cls, value):
        return _at_least(value, 0.0, strict=True)

    @field_validator("median_filter_px")
    @classmethod
    def _odd(cls, value: int):
        if value not in (0, 1) and value % 2 == 0:
            raise ValueError(f"median filter size must be 0 (off) or odd, got {value}")
        return value


class Mask(_Section):
    phase_threshold_rad: float = Field(default=math.pi / 12, gt=0)
    vote_fraction: float = Field(default=0.5, gt=0, le=1)
    """Fraction of phonon configurations whose phase must exceed the threshold for a pixel to count."""
    closing_radius_A: float = Field(default=1.5, ge=0)
    """Morphological closing of the vote map that fills the gaps between atomic columns (0 = off)."""
    smoothing_sigma_A: float = Field(default=1.0, ge=0)
    smoothed_threshold: float = Field(default=0.5, gt=0, lt=1)


class Output(_Section):
    structures_per_shard: int = Field(default=8, ge=1)
    split: str = "train"


class Recipe(_Section):
    name: str
    description: str = ""
    structure: Structure = Structure()
    simulation: Simulation = Simulation()
    imaging: Imaging = Imaging()
    mask: Mask = Mask()
    output: Output = Output()

    @model_validator(mode="after")
    def _consistent(self):
        s = self.structure
        lo, hi = bounds(s.substrate.thickness_A)
        if lo < 0 or not math.isfinite(hi):
            raise ValueError(
                "structure.substrate.thickness_A must be bounded and >= 0 (use uniform, truncnormal, choice or a "
                f"fixed value); got bounds ({lo}, {hi})"
            )
        p = s.particle
        rlo, rhi = bounds(p.radius_A)
        fov = self.field_of_view_px * self.imaging.pixel_size_A
        if p.kind != "none":
            if rlo <= 0 or not math.isfinite(rhi):
                raise ValueError(f"structure.particle.radius_A must be bounded and > 0; got bounds ({rlo}, {rhi})")
            reach = p.max_circumradius_A()  # = rhi for spheres
            what = f"structure.particle.radius_A up to {rhi} Å" if reach == rhi else \
                f"structure.particle.radius_A up to {rhi} Å (circumscribed radius up to {reach:.1f} Å for kind " \
                f"{'/'.join(p.kinds())})"
            if 2 * (reach + p.margin_A) > s.cell.extent_A:
                raise ValueError(
                    f"{what} with margin {p.margin_A} Å does not fit in structure.cell.extent_A={s.cell.extent_A} Å"
                )
            if 2 * (reach + p.margin_A) > fov:
                raise ValueError(
                    f"imaging.crop_px={self.imaging.crop_px} gives a {fov:.1f} Å field of view, too small for "
                    f"{what} with margin {p.margin_A} Å"
                )
            if p.composed:
                self._check_placement(p, reach, fov)
        if self.imaging.crop_px is not None and self.imaging.crop_px > self.image_grid_px:
            raise ValueError(
                f"imaging.crop_px={self.imaging.crop_px} exceeds the {self.image_grid_px} px image of the "
                f"{s.cell.extent_A} Å cell at {self.imaging.pixel_size_A} Å/px"
            )
        if self.imaging.pixel_size_A < self.simulation.sampling_A:
            raise ValueError(
                f"imaging.pixel_size_A={self.imaging.pixel_size_A} is finer than simulation.sampling_A="
                f"{self.simulation.sampling_A}; the image pixel must be >= the potential sampling"
            )
        return self

    def _check_placement(self, p: Particle, reach: float, fov: float) -> None:
        """Several particles must fit side by side; off-field ones must stay inside the (periodic) cell."""
        L = self.structure.cell.extent_A
        n_max = int(round(bounds(p.count)[1]))
        usable = (fov - 2 * p.margin_A) ** 2
        covered = n_max * math.pi * (reach + p.min_gap_A / 2) ** 2
        if n_max > 1 and covered > PLACEMENT_MAX_DENSITY * usable:
            raise ValueError(
                f"structure.particle.count up to {n_max} particles of circumscribed radius up to {reach:.1f} Å "
                f"(gap {p.min_gap_A} Å) would cover {covered / usable:.0%} of the {fov:.1f} Å field of view; at most "
                f"{PLACEMENT_MAX_DENSITY:.0%} is allowed: lower count or radius_A, or raise imaging.crop_px"
            )
        if p.off_field_probability > 0 and L - fov < 2 * (1.5 * reach + p.margin_A):
            raise ValueError(
                f"structure.particle.off_field_probability={p.off_field_probability} needs room outside the field of "
                f"view inside the periodic cell: structure.cell.extent_A={L} Å must be at least the {fov:.1f} Å field "
                f"of view + 2 x (1.5 x {reach:.1f} + {p.margin_A}) Å = {fov + 2 * (1.5 * reach + p.margin_A):.1f} Å "
                "(lower imaging.crop_px or enlarge the cell)"
            )

    @property
    def image_grid_px(self) -> int:
        """Pixels per side of the uncropped image (the cell resampled to the detector pixel)."""
        return int(round(self.structure.cell.extent_A / self.imaging.pixel_size_A))

    @property
    def field_of_view_px(self) -> int:
        return self.imaging.crop_px or self.image_grid_px

    def resolved(self) -> dict:
        """The fully resolved recipe (defaults filled in) as plain JSON-able data."""
        return self.model_dump(mode="json")

    def hash(self) -> str:
        return config_hash(self.resolved())


def available_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a preset by name (see ``python -m datagen recipes``) or a YAML file, apply overrides, validate."""
    presets = available_recipes()
    path = Path(name_or_path)
    if str(name_or_path) in presets:
        path = presets[str(name_or_path)]
    elif not path.is_file():
        raise RecipeError(
            f"recipe {str(name_or_path)!r} is neither a preset ({', '.join(presets)}) nor an existing YAML file"
        )
    try:
        data = read_yaml_mapping(path, "recipe")
    except ConfigError as exc:
        raise RecipeError(str(exc)) from None
    return recipe_from_dict(data, overrides, source=str(path))


def recipe_from_dict(data: dict, overrides=(), source: str = "<dict>") -> Recipe:
    try:
        data = apply_overrides(data, overrides)
    except ConfigError as exc:
        raise RecipeError(str(exc)) from None
    return validate(Recipe, data, f"recipe {source}", RecipeError,
                    origins=Origins(f"recipe {source}").add_sets(overrides))
