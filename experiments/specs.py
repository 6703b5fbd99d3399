"""Experiment definitions: small YAML files that override a base training config.

A sweep or study file names a ``base`` training config (path relative to the file) and ``set``s dotted overrides on
it (lists are indexed by number: ``data.train.0.filter``); ``--set`` on the command line applies last, to every run.
Everything is validated at load: every cell of a sweep is resolved into a full :class:`TrainConfig` before any work.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_serializer, model_validator

from hrtem_core.config import (Origins, StrictModel, config_hash, parse_override, read_yaml_mapping, require_unique,
                               set_dotted, validate)
from hrtem_core.errors import ConfigError
from mlplatform.analysis import min_attainable_p_test, min_attainable_p_trend
from mlplatform.config import TrainConfig, config_from_dict
from mlplatform.report_data import level_name


class _Spec(StrictModel):
    """Unknown keys refused, numbers finite and not booleans, booleans only true/false (hrtem_core.config)."""


def _plain_name(kind: str, value: str) -> str:
    """``value`` if it can name a subset or comparison in tags, metric keys and file names; ValueError otherwise."""
    if not value or any(c in value for c in " /\\:"):
        raise ValueError(f"{kind} name {value!r} must be non-empty without spaces, '/', '\\\\' or ':'")
    return value


class Subset(_Spec):
    name: str
    set: dict[str, Any] = Field(default_factory=dict)
    """Dotted overrides that define the subset, typically ``data.train`` (datasets, filters, caps, weights)."""

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str):
        return _plain_name("subset", value)


class Phase(_Spec):
    set: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the fine-tune phase relative to the cell's pretrain config (its data, lr, epochs...)."""
    target: str | None = None
    """The benchmark that holds out images of the fine-tuning data's distribution (the report marks it as the
    target: what fine-tuning does on it and off it)."""

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        data = handler(self)  # left out while unset: sweeps defined before this key keep their fingerprints
        if self.target is None:
            data.pop("target", None)
        return data


MAX_VARIANT_NAME = 13  # a unit's phase is "ft:<variant>" in the claims table (16 characters there)


class Variant(Phase):
    """One named fine-tune of every cell's pretrained model (``finetune:`` as a list): its own data (the amount of
    target data), what is frozen (``finetune.freeze``), learning rate, epochs... ``where``: only the cells at these
    levels (a selector over ``subset`` and the axes, e.g. ``{subset: all}``) get this variant."""

    name: str
    where: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_where(self, handler):
        data = handler(self)
        if self.where is None:
            data.pop("where", None)
        return data

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str):
        _plain_name("finetune variant", value)
        if value in ("none", "pretrain", "finetune") or len(value) > MAX_VARIANT_NAME:
            raise ValueError(f"finetune variant name {value!r}: at most {MAX_VARIANT_NAME} characters, and not "
                             "'none', 'pretrain' or 'finetune' (those name the phases)")
        return value


class Level(_Spec):
    """One level of an axis: ``value`` is what the axis key is set to, ``name`` what runs, tags and reports call it."""

    name: str
    value: Any

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str):
        return _plain_name("axis level", value)


def _level(item: Any) -> Level:
    """A level as written: ``{name: NAME, value: VALUE}``, or a plain number, string or boolean named by itself."""
    if isinstance(item, dict) and set(item) == {"name", "value"}:
        return Level(**item)
    if isinstance(item, (dict, list)) or item is None:
        raise ValueError(f"level {item!r}: a list or mapping (or null) needs a name: write {{name: NAME, value: ...}}")
    return Level(name=level_name(item), value=item)  # the report names levels by the same rule


class DatasetSpec(_Spec):
    """A dataset the study generates itself (``datasets:``), under ``<data_root>/<name>``: made before the first unit
    that reads it, reused when its identity (recipe, seed, n, overrides) is unchanged, resumed after a kill."""

    recipe: str
    """A preset name (``python -m datagen recipes``) or a recipe YAML file (relative to the study file)."""
    n: int = Field(ge=1)
    seed: int = Field(ge=0)
    set: list[str] | dict[str, Any] = Field(default_factory=list)
    """Recipe overrides: ``dotted.key=value`` texts as on the command line, or a mapping of dotted keys to values."""

    def overrides(self) -> list[str]:
        if isinstance(self.set, dict):
            return [f"{key}={json.dumps(value)}" for key, value in self.set.items()]
        return list(self.set)


SELECTOR_PHASE = "finetune"  # the selector key of the fine-tune dimension; its levels: none (pretrain), variants
STATISTICS = ("final", "peak", "drop")


class Comparison(_Spec):
    """A comparison declared in the sweep file before the sweep runs, judged by ``test`` on one benchmark's Dice
    (``ood/<benchmark>/dice``; ``mean``: the mean over benchmarks; ``non-target``: the mean over the benchmarks other
    than the fine-tune's target), as ``statistic``: ``final`` (the last epoch), ``peak`` (the best epoch) or ``drop``
    (peak minus final: the decay during a fine-tune).

    Two groups (``a`` against ``b``; tests ``mannwhitney``, unpaired, or ``wilcoxon``, paired by seed within
    otherwise equal cells): a group is ``SUBSET``, ``SUBSET/finetune`` (or ``SUBSET/VARIANT``), or a selector such as
    ``{subset: all, finetune: n8, optim.lr: 0.001}``: the cells at those levels (``finetune: none``, the default,
    means the pretrained models); an axis it leaves out pools its levels.

    A trend (tests ``jonckheere`` or ``spearman``): ``axis`` (``subset``, ``finetune`` or an axis key) judged across
    its ``levels`` in the order given (default: as declared), the other coordinates fixed by ``where`` (a selector),
    ``alternative`` ``increasing``, ``decreasing`` or ``two-sided``.

    The report judges exactly the declared comparisons, Holm-adjusted together, in the order written; the sweep's
    definition (comparisons included) is logged on its parent run when it is registered, before any cell trains,
    and a sweep of the same name with other comparisons is refused."""

    name: str
    hypothesis: str
    """What the comparison tests, in a sentence: the report prints it next to the result."""
    a: str | dict[str, Any] | None = None
    b: str | dict[str, Any] | None = None
    benchmark: str
    test: Literal["mannwhitney", "wilcoxon", "jonckheere", "spearman"] = "mannwhitney"
    """mannwhitney: two independent groups (seeds unpaired); wilcoxon: paired by seed (e.g. before vs after
    fine-tuning the same pretrained models). Both two-sided, exact. jonckheere, spearman: a trend across levels."""
    statistic: Literal["final", "peak", "drop"] = "final"
    axis: str | None = None
    levels: list[Any] | None = None
    where: dict[str, Any] | None = None
    alternative: Literal["two-sided", "increasing", "decreasing"] = "two-sided"

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str):
        return _plain_name("comparison", value)

    @model_validator(mode="after")
    def _shape(self):
        trend = self.test in ("jonckheere", "spearman")
        if trend and (self.axis is None or self.a is not None or self.b is not None):
            raise ValueError(f"comparisons {self.name}: a {self.test} test judges a trend: give 'axis' (and "
                             "optionally 'levels' and 'where'), not 'a' and 'b'")
        if not trend and (self.a is None or self.b is None or self.axis or self.levels or self.where):
            raise ValueError(f"comparisons {self.name}: a {self.test} test compares two groups: give 'a' and 'b' "
                             "(not 'axis', 'levels' or 'where')")
        if not trend and self.alternative != "two-sided":
            raise ValueError(f"comparisons {self.name}: {self.test} is two-sided here; 'alternative' is for trends")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        data = handler(self)  # left out while unset: comparisons declared before these keys keep their fingerprints
        for key, default in (("a", None), ("b", None), ("statistic", "final"), ("axis", None), ("levels", None),
                             ("where", None), ("alternative", "two-sided")):
            if data.get(key, default) == default:
                data.pop(key, None)
        return data

    @staticmethod
    def group(text: str) -> tuple[str, str]:
        """(subset, phase) of a group ``SUBSET`` or ``SUBSET/PHASE``."""
        subset, _, phase = text.partition("/")
        return subset, phase or "pretrain"


class _Data(_Spec):
    """What sweeps and studies share: the datasets they generate themselves."""

    data_root: str = "data"
    """Where the study's own datasets go (``<data_root>/<name>``), relative to the working directory, like every data
    path of a config. A dataset of the same name and identity there is reused, whoever made it."""
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    """name -> recipe, n, seed, overrides. Configs read one as ``{dataset: NAME}`` in ``data.train`` or
    ``benchmarks`` (a path is filled in)."""

    @field_validator("datasets")
    @classmethod
    def _names(cls, value: dict):
        for name in value:
            _plain_name("dataset", name)
        return value

    _folders: dict[str, str] = PrivateAttr(default_factory=dict)
    """name -> folder under data_root, where it is not the name: a design study's trial data (one folder per recipe
    identity, :func:`experiments.design.trial_experiment`)."""

    def dataset_path(self, name: str) -> Path:
        return Path(self.data_root) / self._folders.get(name, name)

    def _omit_data(self, data: dict) -> dict:
        # left out while unset, so definitions written before these keys keep their fingerprints
        if not self.datasets:
            data.pop("datasets", None)
        if self.data_root == "data":
            data.pop("data_root", None)
        return data


class SweepSpec(_Data):
    kind: Literal["sweep"]
    name: str
    base: str
    set: dict[str, Any] = Field(default_factory=dict)
    subsets: list[Subset] = Field(min_length=1)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    """Dotted training key -> its levels, crossed with the subsets and the seeds (``optim.lr: [0.001, 0.003]``; a
    long value is named: ``{name: big, value: {...}}``). Each cell's run name, tags and report rows carry its level
    on every axis."""
    seeds: list[int] | None = None
    n_seeds: int = Field(default=5, ge=1)
    finetune: Phase | list[Variant] | None = None
    """One fine-tune phase, or a list of named variants: each trains once from every cell's own pretrained model."""
    max_retries: int = Field(default=1, ge=0)
    """A failing cell is tried again this many times before the sweep gives up on it."""
    comparisons: list[Comparison] = Field(default_factory=list)
    """Comparisons declared before the run (see :class:`Comparison`); the report's findings table."""
    alpha: float = Field(default=0.05, gt=0, lt=1)
    """Significance level of the declared comparisons (after Holm's adjustment)."""

    @field_validator("finetune", mode="before")
    @classmethod
    def _variants(cls, value):
        """A list is named variants: each validated alone, so an error names the variant, not the union's types."""
        if not isinstance(value, list):
            return value
        out = []
        for i, item in enumerate(value):
            try:
                out.append(Variant.model_validate(item))
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                name = item.get("name") if isinstance(item, dict) else None
                raise ValueError(f"variant {i}{f' ({name})' if name else ''}: {where + ': ' if where else ''}"
                                 f"{err['msg'].removeprefix('Value error, ')}") from None
        return out

    @field_validator("name")
    @classmethod
    def _queue_name(cls, value: str):
        if value.startswith(("study:", "dataset:")):
            raise ValueError(f"sweep name {value!r}: names starting with 'study:' or 'dataset:' are reserved")
        return value

    @field_validator("axes")
    @classmethod
    def _axes(cls, value: dict):
        for key, levels in value.items():
            if key in ("subset", SELECTOR_PHASE, "seed") or not key or any(not p for p in key.split(".")):
                raise ValueError(f"{key!r} is not a dotted training key (e.g. optim.lr); 'subset', "
                                 "'finetune' and 'seed' are axes already")
            if not levels:
                raise ValueError(f"{key}: give at least one level")
            try:
                require_unique([_level(item).name for item in levels], f"axes {key} levels")
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        keys = list(value)
        for a, b in itertools.permutations(keys, 2):
            if b.startswith(a + "."):
                raise ValueError(f"{b!r} lies inside {a!r}: one axis would overwrite the other")
        return value

    @model_validator(mode="after")
    def _unique(self):
        require_unique([s.name for s in self.subsets], "subsets")
        if self.seeds is not None and (len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0):
            raise ValueError(f"seeds must be distinct and >= 0, got {self.seeds}")
        if isinstance(self.finetune, list):
            if not self.finetune:
                raise ValueError("finetune: an empty list; give one phase (a mapping) or named variants")
            require_unique([v.name for v in self.finetune], "finetune variants")
            targets = {v.target for v in self.finetune}
            if len(targets) > 1:
                raise ValueError(f"finetune: the variants name different targets ({', '.join(map(str, targets))}); "
                                 "the target benchmark is one for the whole sweep")
        for key in self.axes:
            for subset in self.subsets:
                for set_key in subset.set:
                    if set_key == key or set_key.startswith(key + ".") or key.startswith(set_key + "."):
                        raise ValueError(f"axes: {key!r} and subset {subset.name}'s {set_key!r} set the same key; "
                                         "vary it on one of them")
        require_unique([c.name for c in self.comparisons], "comparisons")
        design = Design(self)
        for c in self.comparisons:
            design.check_comparison(c, self.alpha, len(self.comparisons))
        return self

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        # left out while unset, so sweeps defined before these keys keep their fingerprints
        data = self._omit_data(handler(self))
        if not self.comparisons:
            data.pop("comparisons", None)
        if self.alpha == 0.05:
            data.pop("alpha", None)
        if not self.axes:
            data.pop("axes", None)
        return data

    @property
    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.n_seeds))

    @property
    def axis_levels(self) -> dict[str, list[Level]]:
        return {key: [_level(item) for item in levels] for key, levels in self.axes.items()}

    @property
    def variants(self) -> list[Variant] | None:
        """The named fine-tune variants, or None for no fine-tune or one unnamed fine-tune phase."""
        return self.finetune if isinstance(self.finetune, list) else None

    @property
    def target(self) -> str | None:
        if isinstance(self.finetune, list):
            return self.finetune[0].target
        return self.finetune.target if self.finetune else None


def unit_phase(variant: str | None) -> str:
    """The phase of a fine-tune unit in the claims database: ``finetune`` for the one fine-tune of a sweep,
    ``ft:<variant>`` for a named variant."""
    return "finetune" if variant is None else f"ft:{variant}"


class Design:
    """The dimensions of a sweep: ``subset``, each axis, ``finetune`` (``none``: the pretrained models; the variants,
    or ``finetune`` for a sweep's one fine-tune), and the seeds; selectors resolved against them."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        phases = ["none"]
        if spec.variants:
            phases += [v.name for v in spec.variants]
        elif spec.finetune is not None:
            phases.append("finetune")
        self.dims: dict[str, list[str]] = {"subset": [s.name for s in spec.subsets],
                                           **{k: [lv.name for lv in levels] for k, levels in spec.axis_levels.items()},
                                           SELECTOR_PHASE: phases}
        self.n_seeds = len(spec.seed_list)
        # the cells (levels of every non-phase dimension) that each fine-tune phase applies to
        self.applies: dict[str, dict[str, str]] = {}
        for v in spec.variants or []:
            if v.where is not None:
                where = self.selector(v.where, f"finetune variant {v.name}: where")
                where.pop(SELECTOR_PHASE)
                if "none" != self.selector(v.where, "").get(SELECTOR_PHASE):
                    raise ValueError(f"finetune variant {v.name}: where selects cells (subset, axes), not a phase")
                self.applies[v.name] = where

    def has_phase(self, coords: dict[str, str], phase: str) -> bool:
        """Whether the cell at ``coords`` (a level of every non-phase dimension) has the fine-tune phase ``phase``."""
        where = self.applies.get(phase, {})
        return all(coords.get(k) == v for k, v in where.items())

    def selector(self, value: str | dict, where: str) -> dict[str, str]:
        """A group as a mapping dimension -> level name (``finetune`` always present: ``none`` unless given)."""
        if isinstance(value, str):
            subset, _, phase = value.partition("/")
            value = {"subset": subset, SELECTOR_PHASE: phase or "none"}
            if phase in ("pretrain",):
                value[SELECTOR_PHASE] = "none"
        out = {}
        for key, level in value.items():
            if key not in self.dims:
                raise ValueError(f"{where}: {key!r} is not a dimension of this sweep; allowed: "
                                 f"{', '.join(self.dims)}")
            out[key] = self.level_name(key, level, where)
        out.setdefault(SELECTOR_PHASE, "none")
        return out

    def level_name(self, key: str, level: Any, where: str) -> str:
        names = self.dims[key]
        if isinstance(level, str) and level in names:
            return level
        if key in self.spec.axes:
            for lv in self.spec.axis_levels[key]:
                if lv.value == level and type(lv.value) is type(level):
                    return lv.name
        if key == SELECTOR_PHASE and level == "pretrain":
            return "none"
        extra = " (the sweep has no finetune)" if key == SELECTOR_PHASE and len(names) == 1 else ""
        raise ValueError(f"{where}: {key} {level!r} is not one of its levels ({', '.join(names)}){extra}")

    def pooled(self, fixed) -> int:
        """Runs in a group that fixes the dimensions ``fixed``: seeds x the cells at its levels that have its phase."""
        keys = [k for k in self.dims if k != SELECTOR_PHASE]
        phase = fixed.get(SELECTOR_PHASE, "none")
        n = 0
        for combo in itertools.product(*(self.dims[k] for k in keys)):
            coords = dict(zip(keys, combo))
            if all(coords[k] == v for k, v in fixed.items() if k != SELECTOR_PHASE) and self.has_phase(coords, phase):
                n += 1
        return n * self.n_seeds

    def check_comparison(self, c: Comparison, alpha: float, k: int) -> None:
        where = f"comparisons {c.name}"
        if c.test in ("jonckheere", "spearman"):
            if c.axis not in self.dims:
                raise ValueError(f"{where}: axis {c.axis!r} is not a dimension of this sweep; allowed: "
                                 f"{', '.join(self.dims)}")
            levels = ([self.level_name(c.axis, lv, f"{where}: levels") for lv in c.levels] if c.levels is not None
                      else list(self.dims[c.axis]))
            if len(set(levels)) != len(levels) or len(levels) < 2:
                raise ValueError(f"{where}: a trend needs two or more distinct levels of {c.axis}, got {levels}")
            fixed = self.selector(c.where or {}, f"{where}: where")
            if c.axis in (c.where or {}):
                raise ValueError(f"{where}: where fixes {c.axis}, the axis the trend runs along")
            phases = levels if c.axis == SELECTOR_PHASE else [fixed[SELECTOR_PHASE]]
            sizes = [self.pooled({**fixed, c.axis: lv}) for lv in levels]
            for lv, size in zip(levels, sizes):
                if not size:
                    raise ValueError(f"{where}: no cell has {c.axis} {lv} where {fixed} (a variant's 'where' leaves "
                                     "it out)")
            floor = min_attainable_p_trend(sizes, c.alternative)
            what = f"a {c.alternative} {c.test} trend over {len(levels)} levels of {sizes[0]} runs"
        else:
            a, b = self.selector(c.a, f"{where}: a"), self.selector(c.b, f"{where}: b")
            if a == b:
                raise ValueError(f"{where}: a and b are the same group {c.a!r}")
            if c.test == "wilcoxon" and set(a) != set(b):
                raise ValueError(f"{where}: a paired test pairs runs of otherwise equal cells: a and b must fix the "
                                 f"same dimensions (a: {', '.join(a)}; b: {', '.join(b)})")
            phases = [a[SELECTOR_PHASE], b[SELECTOR_PHASE]]
            n_a, n_b = self.pooled(a), self.pooled(b)
            for side, sel, n in (("a", a, n_a), ("b", b, n_b)):
                if not n:
                    raise ValueError(f"{where}: {side}: no cell matches {sel} (a variant's 'where' leaves it out)")
            floor = min_attainable_p_test(c.test, n_a, n_b)
            what = f"a two-sided {c.test} test on {n_a} and {n_b} runs per group"
        if c.statistic == "drop" and "none" in phases:
            raise ValueError(f"{where}: statistic drop (peak minus final Dice during a fine-tune) needs fine-tuned "
                             "groups; a group here selects the pretrained models (finetune: none)")
        # Holm multiplies the smallest p by the number of comparisons: each must be able to reach alpha even
        # then, whatever the others show, or the sweep could not find what it declared it is looking for
        if floor >= alpha:
            raise ValueError(f"{where}: {what} cannot give p below {floor:.3g}, so it can never reach alpha = "
                             f"{alpha}; use more seeds" + (" (6 pairs for wilcoxon)" if c.test == "wilcoxon" else ""))
        if floor * k >= alpha:
            raise ValueError(f"{where}: {what} gives p >= {floor:.3g}; Holm-adjusted over the {k} declared "
                             f"comparisons that can become {floor * k:.3g} >= alpha = {alpha}; use more seeds or "
                             "declare fewer comparisons")

    def groups(self, c: Comparison) -> list[dict[str, str]]:
        """The selectors of a comparison's groups: [a, b], or one per level of a trend, lowest first."""
        where = f"comparisons {c.name}"
        if c.axis is None:
            return [self.selector(c.a, f"{where}: a"), self.selector(c.b, f"{where}: b")]
        fixed = self.selector(c.where or {}, f"{where}: where")
        levels = ([self.level_name(c.axis, lv, where) for lv in c.levels] if c.levels is not None
                  else list(self.dims[c.axis]))
        return [{**fixed, c.axis: lv} for lv in levels]


class Param(_Spec):
    """One search dimension: float/int ranges (optionally log), a categorical choice, or a template filled by
    nested params (for curation filters: ``"abs(imaging.defocus_A) <= {dmax}"``)."""

    type: Literal["float", "int", "categorical", "template"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    template: str | None = None
    params: dict[str, "Param"] | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.type in ("float", "int"):
            if self.low is None or self.high is None or not self.high > self.low:
                raise ValueError(f"a {self.type} parameter needs low < high, got low={self.low}, high={self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"a log-scale parameter needs low > 0, got {self.low}")
        elif self.type == "categorical" and not self.choices:
            raise ValueError("a categorical parameter needs a non-empty 'choices' list")
        elif self.type == "template":
            if not self.template or not self.params:
                raise ValueError("a template parameter needs 'template' and its 'params'")
            try:
                self.template.format(**{k: 1 for k in self.params})
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"template {self.template!r} does not match its params {sorted(self.params)}: "
                                 f"{exc}") from None
        return self


Param.model_rebuild()


class Objective(_Spec):
    metric: str = "ood/mean/dice"
    """Per-epoch metric: ``ood/mean/dice`` (mean over benchmarks) or ``ood/<name>/dice``, ``val/dice``..."""
    aggregate: Literal["final", "best"] = "final"
    direction: Literal["maximize", "minimize"] = "maximize"


class Pruner(_Spec):
    kind: Literal["median", "percentile", "none"] = "median"
    n_startup_trials: int = Field(default=2, ge=0)
    n_warmup_steps: int = Field(default=1, ge=0)
    percentile: float = Field(default=50.0, gt=0, lt=100)


class Confirm(_Spec):
    """The test of a design study, declared before it runs: the best trial's recipe against the default recipe (the
    designed dataset's recipe as declared, without the search space), each generated afresh (seed ``data_seed``, the
    same size as the trials' data), trained with every seed of ``seeds`` under the same training settings (the
    study's, with the best trial's training parameters), and compared on each of ``benchmarks`` (default: every
    benchmark the study scores) by a two-sided ``test``, Holm-adjusted over the benchmarks. It runs as a sweep of its
    own (``<study>-confirm-t<best trial>``) once the study's trials are settled."""

    seeds: list[int] = Field(min_length=6)
    """Training seeds of each arm (at least 6: two-sided tests on fewer cannot reach 0.05 after Holm)."""
    data_seed: int = Field(ge=0)
    """Seed of the fresh data of both arms: not a seed the designed dataset was generated with."""
    benchmarks: list[str] | None = None
    test: Literal["mannwhitney", "wilcoxon"] = "mannwhitney"
    """mannwhitney: the two arms as independent groups; wilcoxon: paired by training seed."""
    alpha: float = Field(default=0.05, gt=0, lt=1)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]):
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"seeds must be distinct and >= 0, got {value}")
        return value


class StudySpec(_Data):
    kind: Literal["study"]
    name: str
    base: str
    set: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, Param] = Field(min_length=1)
    """Dotted training keys (``optim.lr``), and for a design study recipe keys of a declared dataset:
    ``datasets.NAME.<recipe key>`` (``datasets.pool.imaging.defocus_A.high``): every trial generates that dataset
    with the values it draws (see :mod:`experiments.design`)."""
    objective: Objective = Objective()
    n_trials: int = Field(default=20, ge=1)
    sampler_seed: int = 0
    pruner: Pruner = Pruner()
    confirm: Confirm | None = None
    """Design studies: the best recipe against the default, declared before the study runs (:class:`Confirm`)."""

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        data = self._omit_data(handler(self))
        if self.confirm is None:
            data.pop("confirm", None)  # studies defined before design studies keep their fingerprints
        return data


class Experiment:
    """A loaded sweep or study: the spec plus the base training config it overrides."""

    def __init__(self, spec: SweepSpec | StudySpec, base: dict, source: Path, cli_sets: list[str]):
        self.spec, self.base, self.source, self.cli_sets = spec, base, source, list(cli_sets)

    @property
    def name(self) -> str:
        return self.spec.name

    def config(self, *override_maps: dict[str, Any], where: tuple[str, ...] = (), context: str | None = None
               ) -> TrainConfig:
        """The base config with the spec's ``set``, the given dotted maps, then the command line's ``--set``.

        ``where[i]`` says where ``override_maps[i]`` comes from in the definition ("subset a", "finetune"), for
        errors; ``context`` (e.g. "subset a") is added to the names of keys whose values came from elsewhere."""
        data = copy.deepcopy(self.base)
        kind = self.spec.kind
        origins = Origins(f"{kind} {self.source}, base {self.spec.base}", context)
        labels = ("set", *where, *([None] * len(override_maps)))
        try:
            for mapping, label in zip((self.spec.set, *override_maps), labels):
                for key, value in mapping.items():
                    set_dotted(data, key, copy.deepcopy(value))
                    origins.add(key, f"{kind} {self.source}, {label}" if label else f"{kind} {self.source}")
        except ValueError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None
        return config_from_dict(self._resolve_datasets(data), self.cli_sets, origins=origins)

    def _resolve_datasets(self, data: dict) -> dict:
        """``{dataset: NAME}`` in ``data.train`` and ``benchmarks`` -> the path of the study's dataset NAME."""
        sources = [*((data.get("data") or {}).get("train") or []), *(data.get("benchmarks") or [])]
        for i, entry in enumerate(sources):
            if not isinstance(entry, dict) or "dataset" not in entry:
                continue
            name = entry.pop("dataset")
            declared = self.spec.datasets
            if "path" in entry:
                raise ConfigError(f"{self.source}: a data source names both dataset {name!r} and path "
                                  f"{entry['path']!r}; give one")
            if name not in declared:
                raise ConfigError(f"{self.source}: dataset {name!r} is not declared in this {self.spec.kind}'s "
                                  f"datasets ({', '.join(declared) or 'none declared'})")
            entry["path"] = str(self.spec.dataset_path(name))
        return data

    def dataset_names(self, config: TrainConfig) -> list[str]:
        """The study's own datasets that ``config`` reads (train data and benchmarks)."""
        paths = {str(self.spec.dataset_path(n)): n for n in self.spec.datasets}
        return sorted({paths[ref.path] for ref in (*config.data.train, *config.benchmarks) if ref.path in paths})

    def _definition(self) -> dict:
        return {"spec": self.spec.model_dump(mode="json"), "base": self.base, "set": self.cli_sets}

    def fingerprint(self) -> str:
        """Identity of the definition: a sweep of the same name with another definition is refused."""
        return config_hash(self._definition())

    def legacy_fingerprint(self) -> str:
        """The identity as sweeps and studies recorded it before configs had one hashing convention (JSON with
        default separators): a sweep or study started then is still recognised, and its record updated."""
        return hashlib.sha256(json.dumps(self._definition(), sort_keys=True).encode()).hexdigest()


def load_experiment(path: str | Path, kind: str, cli_sets=()) -> Experiment:
    path = Path(path)
    raw = read_yaml_mapping(path, kind)
    if raw.get("kind") != kind:
        raise ConfigError(f"{path}: expected a {kind} definition (kind: {kind}), found kind {raw.get('kind')!r}")
    model = SweepSpec if kind == "sweep" else StudySpec
    spec = validate(model, raw, f"{kind} {path}")
    base_path = (path.parent / spec.base).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{path}: base {spec.base!r} not found (looked at {base_path})")
    base = read_yaml_mapping(base_path, "base config")
    for text in cli_sets:
        parse_override(text)  # syntax errors now, before anything else
    exp = Experiment(spec, base, path, cli_sets)
    # resolve every run's config now: a bad value fails before any work
    if kind == "sweep":
        _check_sweep_configs(exp, path)
    else:
        exp.config()
        from .design import check_design

        check_design(exp)
    return exp


@dataclass(frozen=True)
class Cell:
    """One cell of a sweep: a subset, a level of every axis, a seed. Its units are its phases."""

    index: int
    subset: str
    levels: tuple[tuple[str, str], ...]  # (axis key, level name), in the order the axes are declared
    seed: int

    @property
    def group(self) -> str:
        """The cell without its seed: ``SUBSET`` or ``SUBSET/key=level/...``."""
        return "/".join([self.subset, *(f"{k}={v}" for k, v in self.levels)])

    @property
    def key(self) -> str:
        return f"{self.group}/s{self.seed}"


def cells_of(exp: Experiment) -> list[Cell]:
    """Subsets x axis levels x seeds, in that order (a sweep without axes: subsets x seeds, as always)."""
    spec = exp.spec
    axes = [[(key, lv.name) for lv in levels] for key, levels in spec.axis_levels.items()]
    combos = [(s.name, combo) for s in spec.subsets for combo in itertools.product(*axes)]
    pairs = [(subset, combo, seed) for subset, combo in combos for seed in spec.seed_list]
    return [Cell(i, subset, tuple(combo), seed) for i, (subset, combo, seed) in enumerate(pairs)]


def phases_of(exp: Experiment) -> list[str]:
    """The unit phases of every cell: ``pretrain``, then ``finetune`` or one ``ft:<variant>`` per variant."""
    spec = exp.spec
    if spec.variants:
        return ["pretrain", *(unit_phase(v.name) for v in spec.variants)]
    return ["pretrain"] + (["finetune"] if spec.finetune is not None else [])


def phases_for(exp: Experiment, cell: Cell, design: Design | None = None) -> list[str]:
    """The unit phases of one cell: pretrain, then every fine-tune whose ``where`` takes the cell."""
    design = design or Design(exp.spec)
    coords = {"subset": cell.subset, **dict(cell.levels)}
    return [p for p in phases_of(exp) if p == "pretrain" or design.has_phase(coords, selector_phase(p))]


def variant_of(exp: Experiment, phase: str) -> Variant | Phase | None:
    """The fine-tune definition of a unit phase (None for pretrain)."""
    if phase == "pretrain":
        return None
    if phase == "finetune":
        return exp.spec.finetune
    return next(v for v in exp.spec.variants if unit_phase(v.name) == phase)


def selector_phase(phase: str) -> str:
    """A unit phase as the ``finetune`` coordinate of selectors and reports: none, finetune or the variant."""
    return "none" if phase == "pretrain" else phase.removeprefix("ft:")


def unit_config(exp: Experiment, subset: str, levels: tuple[tuple[str, str], ...], phase: str, *more: dict
                ) -> TrainConfig:
    """The config of a cell's unit (before its seed), with errors naming the subset, the axis levels and the
    fine-tune variant."""
    spec = exp.spec
    sub = next(s for s in spec.subsets if s.name == subset)
    by_name = {k: {lv.name: lv for lv in lvs} for k, lvs in spec.axis_levels.items()}
    axis_set = {k: by_name[k][name].value for k, name in levels}
    label = ", ".join([f"subset {subset}", *(f"{k}={name}" for k, name in levels)])
    maps, where = [sub.set], [f"subset {subset}"]
    if axis_set:
        maps.append(axis_set)
        where.append("axes")
    ft = variant_of(exp, phase)
    context = label
    if ft is not None:
        maps.append(ft.set)
        name = getattr(ft, "name", None)
        where.append(f"finetune {name}" if name else "finetune")
        context = f"{label}, fine-tune" + (f" {name}" if name else "")
    return exp.config(*maps, *more, where=tuple(where), context=context)


def _check_sweep_configs(exp: Experiment, path: Path) -> None:
    spec = exp.spec
    design = Design(spec)
    benchmarks: dict[tuple, list[str]] = {}  # (subset, levels, phase) -> benchmark names
    for cell in cells_of(exp):
        if cell.seed != spec.seed_list[0]:
            continue
        for phase in phases_for(exp, cell, design):
            config = unit_config(exp, cell.subset, cell.levels, phase)
            benchmarks[(cell.subset, cell.levels, selector_phase(phase))] = [b.name for b in config.benchmarks]
    target = spec.target
    if target is not None:
        for (subset, levels, phase), known in benchmarks.items():
            if phase != "none" and target not in known:
                raise ConfigError(f"{path}: finetune.target {target!r} is not one of the fine-tune's benchmarks "
                                  f"({', '.join(known) or 'none'})")
    for c in spec.comparisons:
        if c.benchmark == "non-target" and target is None:
            raise ConfigError(f"{path}: comparisons {c.name}: benchmark 'non-target' (the mean over the benchmarks "
                              "other than the fine-tune's target) needs finetune.target")
        for group in design.groups(c):
            for (subset, levels, phase), known in benchmarks.items():
                coords = {"subset": subset, **dict(levels), SELECTOR_PHASE: phase}
                if any(coords[k] != v for k, v in group.items()):
                    continue
                if c.benchmark not in ("mean", "non-target") and c.benchmark not in known:
                    shown = ", ".join(f"{k}: {v}" for k, v in group.items())
                    raise ConfigError(f"{path}: comparisons {c.name}: benchmark {c.benchmark!r} is not scored by "
                                      f"the group {{{shown}}} (its benchmarks: {', '.join(known) or 'none'}; or "
                                      "'mean', 'non-target')")
