"""Parameter distributions of a recipe.

Every numeric recipe parameter is either a plain number (fixed) or one of these distributions, written in YAML as
a mapping with a ``dist`` key, e.g. ``{dist: truncnormal, mean: 40, std: 5, low: 30, high: 50}``. Sampling always
takes an explicit :class:`numpy.random.Generator`, so every draw flows from the dataset seed.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def bounds(self) -> tuple[float, float]:
        """Smallest interval that holds every value this distribution can draw."""
        raise NotImplementedError


class Uniform(_Dist):
    dist: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self):
        if not self.high > self.low:
            raise ValueError(f"uniform needs high > low, got low={self.low}, high={self.high}")
        return self

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))

    def bounds(self):
        return (self.low, self.high)


class Normal(_Dist):
    dist: Literal["normal"]
    mean: float
    std: float = Field(gt=0)

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.normal(self.mean, self.std))

    def bounds(self):
        return (-math.inf, math.inf)


class TruncNormal(_Dist):
    dist: Literal["truncnormal"]
    mean: float
    std: float = Field(gt=0)
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self):
        if not self.high > self.low:
            raise ValueError(f"truncnormal needs high > low, got low={self.low}, high={self.high}")
        return self

    def sample(self, rng: np.random.Generator) -> float:
        a, b = (self.low - self.mean) / self.std, (self.high - self.mean) / self.std
        # inverse-CDF sampling: one uniform draw per value, so the stream position does not depend on rejections
        return float(stats.truncnorm.ppf(rng.uniform(), a, b, loc=self.mean, scale=self.std))

    def bounds(self):
        return (self.low, self.high)


class LogUniform(_Dist):
    dist: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _check(self):
        if not self.high > self.low:
            raise ValueError(f"loguniform needs high > low, got low={self.low}, high={self.high}")
        return self

    def sample(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))

    def bounds(self):
        return (self.low, self.high)


def _check_weights(weights: list[float] | None, n_values: int) -> None:
    if weights is not None:
        if len(weights) != n_values:
            raise ValueError(f"choice needs one weight per value, got {len(weights)} weights for {n_values} values")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"choice weights must be >= 0 with a positive sum, got {weights}")


class Choice(_Dist):
    """One of ``values`` (optionally weighted), plus optional Gaussian jitter of std ``jitter_std``.

    ``{dist: choice, values: [-500, 0, 500], jitter_std: 20}`` is the "defocus centres with jitter" of the
    reference study.
    """

    dist: Literal["choice"]
    values: list[float] = Field(min_length=1)
    weights: list[float] | None = None
    jitter_std: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        _check_weights(self.weights, len(self.values))
        return self

    def sample(self, rng: np.random.Generator) -> float:
        value = float(self.values[_pick(len(self.values), self.weights, rng)])
        if self.jitter_std > 0:
            value += float(rng.normal(0.0, self.jitter_std))
        return value

    def bounds(self):
        if self.jitter_std > 0:
            return (-math.inf, math.inf)
        return (min(self.values), max(self.values))


def _pick(n: int, weights: list[float] | None, rng: np.random.Generator) -> int:
    """Index of one of ``n`` values, uniformly or by ``weights``: the one draw every choice makes."""
    p = None if weights is None else np.asarray(weights, float) / sum(weights)
    return int(rng.choice(n, p=p))


class Category(_Dist):
    """One of the strings ``values`` (optionally weighted): a categorical recipe value such as a particle's shape or
    element, e.g. ``{dist: choice, values: [Au, Pt, Pd, Ag]}``. Drawn like :class:`Choice` (one ``rng.choice``)."""

    dist: Literal["choice"]
    values: list[str] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _check(self):
        _check_weights(self.weights, len(self.values))
        return self

    def sample(self, rng: np.random.Generator) -> str:
        return self.values[_pick(len(self.values), self.weights, rng)]


Distribution = Annotated[Union[Uniform, Normal, TruncNormal, LogUniform, Choice], Field(discriminator="dist")]
Param = Union[float, Distribution]
Categorical = Union[str, Category]
"""A string recipe value: fixed, or drawn with :class:`Category`."""


def sample(param: Param, rng: np.random.Generator) -> float:
    """Draw one value of ``param``. A fixed value still consumes no randomness."""
    if isinstance(param, (int, float)):
        return float(param)
    return param.sample(rng)


def bounds(param: Param) -> tuple[float, float]:
    if isinstance(param, (int, float)):
        return (float(param), float(param))
    return param.bounds()


def sample_category(param: Categorical, rng: np.random.Generator) -> str:
    """Draw one value of a categorical ``param``; a fixed string consumes no randomness."""
    return param if isinstance(param, str) else param.sample(rng)


def categories(param: Categorical) -> list[str]:
    """Every value a categorical ``param`` can take."""
    return [param] if isinstance(param, str) else list(param.values)
