"""Experiment definitions: small YAML files that override a base training config.

A sweep or study file names a ``base`` training config (path relative to the file) and ``set``s dotted overrides on
it (lists are indexed by number: ``data.train.0.filter``); ``--set`` on the command line applies last, to every run.
Everything is validated at load: every cell of a sweep is resolved into a full :class:`TrainConfig` before any work.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from hrtem_core.config import (Origins, StrictModel, config_hash, parse_override, read_yaml_mapping, require_unique,
                               set_dotted, validate)
from hrtem_core.errors import ConfigError
from mlplatform.analysis import min_attainable_p_test
from mlplatform.config import TrainConfig, config_from_dict


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


class Comparison(_Spec):
    """A comparison declared in the sweep file before the sweep runs: group ``a`` against group ``b`` on one
    benchmark's final-epoch Dice (``ood/<benchmark>/dice``; ``mean``: the mean over benchmarks), judged by ``test``.
    A group is ``SUBSET`` (its pretrained models) or ``SUBSET/finetune`` (the same models after fine-tuning).

    The report judges exactly the declared comparisons, Holm-adjusted together, in the order written; the sweep's
    definition (comparisons included) is logged on its parent run when it is registered, before any cell trains,
    and a sweep of the same name with other comparisons is refused."""

    name: str
    hypothesis: str
    """What the comparison tests, in a sentence: the report prints it next to the result."""
    a: str
    b: str
    benchmark: str
    test: Literal["mannwhitney", "wilcoxon"] = "mannwhitney"
    """mannwhitney: two independent groups (seeds unpaired); wilcoxon: paired by seed (e.g. before vs after
    fine-tuning the same pretrained models). Both two-sided, exact."""

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str):
        return _plain_name("comparison", value)

    @staticmethod
    def group(text: str) -> tuple[str, str]:
        """(subset, phase) of a group ``SUBSET`` or ``SUBSET/PHASE``."""
        subset, _, phase = text.partition("/")
        return subset, phase or "pretrain"


class SweepSpec(_Spec):
    kind: Literal["sweep"]
    name: str
    base: str
    set: dict[str, Any] = Field(default_factory=dict)
    subsets: list[Subset] = Field(min_length=1)
    seeds: list[int] | None = None
    n_seeds: int = Field(default=5, ge=1)
    finetune: Phase | None = None
    max_retries: int = Field(default=1, ge=0)
    """A failing cell is tried again this many times before the sweep gives up on it."""
    comparisons: list[Comparison] = Field(default_factory=list)
    """Comparisons declared before the run (see :class:`Comparison`); the report's findings table."""
    alpha: float = Field(default=0.05, gt=0, lt=1)
    """Significance level of the declared comparisons (after Holm's adjustment)."""

    @model_validator(mode="after")
    def _unique(self):
        require_unique([s.name for s in self.subsets], "subsets")
        if self.seeds is not None and (len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0):
            raise ValueError(f"seeds must be distinct and >= 0, got {self.seeds}")
        require_unique([c.name for c in self.comparisons], "comparisons")
        names = [s.name for s in self.subsets]
        phases = ["pretrain"] + (["finetune"] if self.finetune else [])
        for c in self.comparisons:
            for side in ("a", "b"):
                subset, phase = Comparison.group(getattr(c, side))
                if subset not in names:
                    raise ValueError(f"comparisons {c.name}: {side}: subset {subset!r} is not one of this sweep's "
                                     f"subsets ({', '.join(names)})")
                if phase not in phases:
                    raise ValueError(f"comparisons {c.name}: {side}: phase {phase!r}; allowed here: "
                                     f"{', '.join(phases)}" + ("" if self.finetune else " (the sweep has no finetune)"))
            if Comparison.group(c.a) == Comparison.group(c.b):
                raise ValueError(f"comparisons {c.name}: a and b are the same group {c.a!r}")
            # Holm multiplies the smallest p by the number of comparisons: each must be able to reach alpha even
            # then, whatever the others show, or the sweep could not find what it declared it is looking for
            n, k = len(self.seed_list), len(self.comparisons)
            floor = min_attainable_p_test(c.test, n, n)
            if floor >= self.alpha:
                raise ValueError(f"comparisons {c.name}: a two-sided {c.test} test on {n} seeds per group cannot "
                                 f"give p below {floor:.3g}, so it can never reach alpha = {self.alpha}; use more "
                                 "seeds" + (" (6 pairs for wilcoxon)" if c.test == "wilcoxon" else ""))
            if floor * k >= self.alpha:
                raise ValueError(f"comparisons {c.name}: a two-sided {c.test} test on {n} seeds per group gives "
                                 f"p >= {floor:.3g}; Holm-adjusted over the {k} declared comparisons that can become "
                                 f"{floor * k:.3g} >= alpha = {self.alpha}; use more seeds or declare fewer "
                                 "comparisons")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        # left out while unset, so sweeps defined before these keys keep their fingerprints
        data = handler(self)
        if not self.comparisons:
            data.pop("comparisons", None)
        if self.alpha == 0.05:
            data.pop("alpha", None)
        return data

    @property
    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.n_seeds))


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


class StudySpec(_Spec):
    kind: Literal["study"]
    name: str
    base: str
    set: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, Param] = Field(min_length=1)
    objective: Objective = Objective()
    n_trials: int = Field(default=20, ge=1)
    sampler_seed: int = 0
    pruner: Pruner = Pruner()


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
        return config_from_dict(data, self.cli_sets, origins=origins)

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
        benchmarks = {}
        for subset in spec.subsets:
            config = exp.config(subset.set, where=(f"subset {subset.name}",))
            benchmarks[(subset.name, "pretrain")] = [b.name for b in config.benchmarks]
            if spec.finetune:
                config = exp.config(subset.set, spec.finetune.set, where=(f"subset {subset.name}", "finetune"),
                                    context=f"subset {subset.name}, fine-tune")
                benchmarks[(subset.name, "finetune")] = [b.name for b in config.benchmarks]
        if spec.finetune and spec.finetune.target is not None:
            known = benchmarks[(spec.subsets[0].name, "finetune")]
            if spec.finetune.target not in known:
                raise ConfigError(f"{path}: finetune.target {spec.finetune.target!r} is not one of the fine-tune's "
                                  f"benchmarks ({', '.join(known) or 'none'})")
        for c in spec.comparisons:
            for group in (c.a, c.b):
                known = benchmarks[Comparison.group(group)]
                if c.benchmark != "mean" and c.benchmark not in known:
                    raise ConfigError(f"{path}: comparisons {c.name}: benchmark {c.benchmark!r} is not scored by "
                                      f"{group} (its benchmarks: {', '.join(known) or 'none'}; or 'mean')")
    else:
        exp.config()
    return exp
