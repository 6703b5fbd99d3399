"""Recipes: typed, validated descriptions of a synthetic dataset.

A recipe is YAML. It is validated once, at load, against the models below; every error names the dotted key, the
value and what is allowed. Inside the pipeline the resolved recipe is trusted. Units are in the key names (Å, eV,
mrad, rad, e/Å²).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hrtem_core.config import Origins, apply_overrides, config_hash, read_yaml_mapping, validate
from hrtem_core.errors import ConfigError

from .distributions import Param, bounds

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


class Particle(_Section):
    kind: Literal["fcc_sphere", "wurtzite_sphere", "none"] = "fcc_sphere"
    element: str = "Au"
    """FCC element (fcc_sphere); for wurtzite_sphere: two elements, e.g. 'CdSe' -> cation Cd, anion Se."""
    lattice_A: float = Field(default=4.07825, gt=0)
    """FCC cubic lattice constant, or wurtzite a."""
    lattice_c_A: float = Field(default=7.01, gt=0)
    """Wurtzite c (ignored for FCC)."""
    wurtzite_u: float = Field(default=0.375, gt=0, lt=1)
    radius_A: Param = 10.0
    defects: Defects = Defects()
    orientation: Orientation = Orientation()
    embed_A: Param = 0.0
    """How far the particle sinks into the substrate (0 = resting on it)."""
    margin_A: float = Field(default=2.0, ge=0)
    """Minimum distance between the particle and the edges of the field of view."""

    @field_validator("embed_A")
    @classmethod
    def _nonnegative(cls, value):
        return _at_least(value, 0.0)

    @model_validator(mode="after")
    def _element(self):
        if self.kind == "fcc_sphere":
            _check_element(self.element, "structure.particle.element")
        elif self.kind == "wurtzite_sphere":
            split_binary(self.element)
        return self


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
    parametrization: Literal["lobato", "kirkland", "peng"] = "lobato"
    device: Literal["auto", "cpu", "gpu"] = "auto"

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
        rlo, rhi = bounds(s.particle.radius_A)
        if s.particle.kind != "none":
            if rlo <= 0 or not math.isfinite(rhi):
                raise ValueError(f"structure.particle.radius_A must be bounded and > 0; got bounds ({rlo}, {rhi})")
            if 2 * (rhi + s.particle.margin_A) > s.cell.extent_A:
                raise ValueError(
                    f"structure.particle.radius_A up to {rhi} Å with margin {s.particle.margin_A} Å does not fit "
                    f"in structure.cell.extent_A={s.cell.extent_A} Å"
                )
        fov = self.field_of_view_px * self.imaging.pixel_size_A
        if s.particle.kind != "none" and 2 * (rhi + s.particle.margin_A) > fov:
            raise ValueError(
                f"imaging.crop_px={self.imaging.crop_px} gives a {fov:.1f} Å field of view, too small for particles "
                f"of radius up to {rhi} Å with margin {s.particle.margin_A} Å"
            )
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
