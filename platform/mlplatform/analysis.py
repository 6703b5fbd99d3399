"""Statistics for comparing data subsets: pure functions on numbers and DataFrames (no MLflow, no plotting).

Seeds per subset are few (typically 3–10), so everything here is rank-based or resampling-based and reproducible:
the bootstrap and the permutation test take a seed. NaN values (a run that did not log a metric) are dropped.
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
CORRECTIONS = ("holm", "bonferroni", "fdr_bh")
METHODS = ("mannwhitney", "permutation")
_CHUNK = 2_000_000  # resampled values held in memory at once (bootstrap, permutations)


def _clean(values) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[~np.isnan(x)]


def _stat_rows(stat, samples: np.ndarray) -> np.ndarray:
    """stat over each row; numpy reductions take axis=, any other callable is applied row by row."""
    try:
        out = np.asarray(stat(samples, axis=1), dtype=float)
        if out.shape == (len(samples),):
            return out
    except TypeError:
        pass
    return np.array([stat(row) for row in samples], dtype=float)


def bootstrap_ci(values, stat=np.median, n_boot: int = 10000, ci: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat``; (nan, nan) without values, (v, v) for one value."""
    x = _clean(values)
    if not 0 < ci < 1:
        raise ValueError(f"ci={ci}: must lie strictly between 0 and 1")
    if x.size == 0:
        return (np.nan, np.nan)
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK // x.size)
    boot = np.concatenate([_stat_rows(stat, x[rng.integers(0, x.size, (min(per_chunk, n_boot - i), x.size))])
                           for i in range(0, n_boot, per_chunk)])
    lo, hi = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def summarize(values, n_boot: int = 10000, seed: int = 0) -> dict:
    """n, median, mean, std (ddof=1), ci_lo/ci_hi (95 % percentile bootstrap of the mean), q1, q3, min, max."""
    x = _clean(values)
    if x.size == 0:
        return dict(n=0, **{k: np.nan for k in ("median", "mean", "std", "ci_lo", "ci_hi", "q1", "q3", "min", "max")})
    lo, hi = bootstrap_ci(x, np.mean, n_boot=n_boot, seed=seed)
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return dict(n=int(x.size), median=float(med), mean=float(x.mean()),
                std=float(x.std(ddof=1)) if x.size > 1 else np.nan, ci_lo=lo, ci_hi=hi, q1=float(q1),
                q3=float(q3), min=float(x.min()), max=float(x.max()))


def adjust_pvalues(p, method: str = "holm") -> np.ndarray:
    """Multiple-comparison adjusted p-values (Holm step-down, Bonferroni, Benjamini–Hochberg); NaN stays NaN and
    does not count towards the number of tests."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction {method!r}; allowed: {', '.join(CORRECTIONS)}")
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q, m = p[ok], int(ok.sum())
    if m == 0:
        return out
    order = np.argsort(q, kind="stable")
    ranked = q[order]
    if method == "bonferroni":
        adj = ranked * m
    elif method == "holm":  # p_(i) * (m - i + 1), made monotone from the smallest p upwards
        adj = np.maximum.accumulate(ranked * (m - np.arange(m)))
    else:  # BH: p_(i) * m / i, made monotone from the largest p downwards
        adj = np.minimum.accumulate((ranked * m / np.arange(1, m + 1))[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return out


def cliffs_delta(a, b) -> float:
    """P(a > b) - P(a < b) over all pairs: -1..1, positive when a tends to be larger."""
    a, b = _clean(a), _clean(b)
    if not (a.size and b.size):
        return np.nan
    return float(np.sign(a[:, None] - b[None, :]).mean())


def cohens_d(a, b) -> float:
    """(mean a - mean b) / pooled standard deviation (ddof=1); nan when undefined."""
    a, b = _clean(a), _clean(b)
    if a.size + b.size < 3 or not (a.size and b.size):
        return np.nan
    pooled = ((a.size - 1) * a.var(ddof=1 if a.size > 1 else 0) + (b.size - 1) * b.var(ddof=1 if b.size > 1 else 0)
              ) / (a.size + b.size - 2)
    diff = a.mean() - b.mean()
    return float(diff / np.sqrt(pooled)) if pooled > 0 else (0.0 if diff == 0 else float(np.sign(diff) * np.inf))


def permutation_pvalue(a, b, n_perm: int = 10000, seed: int = 0) -> tuple[float, float]:
    """(mean a - mean b, two-sided p) of a two-sample permutation test, as scipy.stats.permutation_test defines it:
    p = min(1, 2 min(P(T >= t), P(T <= t))). Exact (all splits) when there are at most ``n_perm`` of them, else
    ``n_perm`` random permutations with the (count + 1) / (n_perm + 1) correction."""
    a, b = _clean(a), _clean(b)
    if not (a.size and b.size):
        return np.nan, np.nan
    pooled, na = np.concatenate([a, b]), a.size
    observed = a.mean() - b.mean()
    total = pooled.sum()

    def diffs(idx: np.ndarray) -> np.ndarray:  # idx: rows of indices that form group a
        sa = pooled[idx].sum(axis=1)
        return sa / na - (total - sa) / b.size

    exact = comb(pooled.size, na) <= n_perm
    if exact:
        null = diffs(np.array(list(combinations(range(pooled.size), na)), dtype=int).reshape(-1, na))
    else:
        rng = np.random.default_rng(seed)
        per_chunk = max(1, _CHUNK // pooled.size)
        null = np.concatenate([diffs(rng.permuted(np.tile(np.arange(pooled.size), (k, 1)), axis=1)[:, :na])
                               for k in (min(per_chunk, n_perm - i) for i in range(0, n_perm, per_chunk))])
    tol = 1e-12 * max(1.0, abs(observed))  # equal statistics computed in another order are still equal
    ge, le = (null >= observed - tol).sum(), (null <= observed + tol).sum()
    if exact:
        p_ge, p_le = ge / null.size, le / null.size
    else:
        p_ge, p_le = (ge + 1) / (n_perm + 1), (le + 1) / (n_perm + 1)
    return float(observed), float(min(1.0, 2 * min(p_ge, p_le)))


def pairwise_tests(groups: dict, method: str = "mannwhitney", correction: str = "holm", n_perm: int = 10000,
                   seed: int = 0, alpha: float = ALPHA) -> pd.DataFrame:
    """Two-sided tests between every pair of groups (in dict order), corrected over all pairs together.

    Columns: a, b, n_a, n_b, statistic, p_value, p_adjusted, then the effect sizes, then significant
    (p_adjusted < alpha).
    * ``mannwhitney``: statistic = U of a (scipy.stats.mannwhitneyu, method='auto': exact for small samples without
      ties, else normal approximation with continuity correction); effects ``cliffs_delta`` and ``rank_biserial``
      (2 U / (n_a n_b) - 1). For two independent samples the two are the same number, computed two ways.
    * ``permutation``: statistic = mean a - mean b (see :func:`permutation_pvalue`); effects ``mean_diff`` and
      ``cohens_d``.
    Positive effects mean a tends to be larger than b. A pair where a group has no values gets NaN and is not
    counted in the correction.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}; allowed: {', '.join(METHODS)}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r}; allowed: {', '.join(CORRECTIONS)}")
    effects = ("cliffs_delta", "rank_biserial") if method == "mannwhitney" else ("mean_diff", "cohens_d")
    clean = {str(k): _clean(v) for k, v in groups.items()}
    rows = []
    for (na, a), (nb, b) in combinations(clean.items(), 2):
        row = dict(a=na, b=nb, n_a=a.size, n_b=b.size, statistic=np.nan, p_value=np.nan)
        row.update({e: np.nan for e in effects})
        if a.size and b.size:
            if method == "mannwhitney":
                res = stats.mannwhitneyu(a, b, alternative="two-sided", method="auto")
                row.update(statistic=float(res.statistic), p_value=float(res.pvalue), cliffs_delta=cliffs_delta(a, b),
                           rank_biserial=float(2 * res.statistic / (a.size * b.size) - 1))
            else:
                diff, p = permutation_pvalue(a, b, n_perm=n_perm, seed=seed)
                row.update(statistic=diff, p_value=p, mean_diff=diff, cohens_d=cohens_d(a, b))
        rows.append(row)
    cols = ["a", "b", "n_a", "n_b", "statistic", "p_value", "p_adjusted", *effects, "significant"]
    df = pd.DataFrame(rows, columns=[c for c in cols if c not in ("p_adjusted", "significant")])
    df["p_adjusted"] = adjust_pvalues(df["p_value"].to_numpy(), correction) if len(df) else []
    df["significant"] = df["p_adjusted"] < alpha
    return df[cols]


def min_attainable_p(n_a: int, n_b: int) -> float:
    """Smallest two-sided p an exact rank or permutation test can give for these group sizes: 2 / C(n_a+n_b, n_a).

    With 3 seeds per subset it is 0.1: no difference can be significant at 0.05, however large."""
    return min(1.0, 2 / comb(n_a + n_b, n_a)) if n_a and n_b else np.nan


TESTS = ("mannwhitney", "wilcoxon")
"""Tests a declared comparison may name: two-sided Mann-Whitney U (independent groups: two subsets, seeds unpaired)
and two-sided Wilcoxon signed-rank (paired by seed: e.g. a model before and after fine-tuning), both exact."""


def min_attainable_p_test(test: str, n_a: int, n_b: int) -> float:
    """Smallest two-sided p of ``test`` with these group sizes (pairs: min(n_a, n_b)); 5 pairs cannot reach 0.05."""
    if test == "wilcoxon":
        n = min(n_a, n_b)
        return min(1.0, 2 / 2 ** n) if n else np.nan
    return min_attainable_p(n_a, n_b)


def bootstrap_mean_diff_ci(a, b, paired: bool, n_boot: int = 10000, ci: float = 0.95, seed: int = 0
                           ) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(a) - mean(b): of the mean of the pair differences when ``paired`` (a[i] and
    b[i] belong together), else of the two groups resampled independently."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    if paired:
        d = a - b
        boot = d[rng.integers(0, d.size, (n_boot, d.size))].mean(axis=1)
    else:
        boot = (a[rng.integers(0, a.size, (n_boot, a.size))].mean(axis=1)
                - b[rng.integers(0, b.size, (n_boot, b.size))].mean(axis=1))
    lo, hi = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def declared_tests(comparisons: list[dict], correction: str = "holm", alpha: float = ALPHA, n_boot: int = 10000,
                   seed: int = 0) -> pd.DataFrame:
    """The comparisons declared before a run, each judged by its own test, corrected together (the family is every
    declared comparison, no more, no fewer).

    Each comparison is a dict with ``name``, ``test`` (one of :data:`TESTS`), values ``a`` and ``b`` (for
    ``wilcoxon``: paired by position, pairs with a NaN dropped). Columns: name, test, n_a, n_b, mean_a, mean_b,
    effect (mean a - mean b; paired: mean of the differences), ci_lo, ci_hi (95 % percentile bootstrap), statistic,
    p_value, p_adjusted, min_p (smallest p the test can give with these sizes), significant."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r}; allowed: {', '.join(CORRECTIONS)}")
    rows = []
    for c in comparisons:
        test = c["test"]
        if test not in TESTS:
            raise ValueError(f"comparison {c.get('name')!r}: test {test!r}; allowed: {', '.join(TESTS)}")
        a, b = np.asarray(c["a"], float).ravel(), np.asarray(c["b"], float).ravel()
        if test == "wilcoxon":
            if a.size != b.size:
                raise ValueError(f"comparison {c.get('name')!r}: a paired test needs as many values in a as in b "
                                 f"({a.size} and {b.size})")
            keep = ~(np.isnan(a) | np.isnan(b))
            a, b = a[keep], b[keep]
        else:
            a, b = _clean(a), _clean(b)
        row = dict(name=c.get("name", ""), test=test, n_a=a.size, n_b=b.size,
                   mean_a=float(a.mean()) if a.size else np.nan, mean_b=float(b.mean()) if b.size else np.nan,
                   effect=np.nan, ci_lo=np.nan, ci_hi=np.nan, statistic=np.nan, p_value=np.nan,
                   min_p=min_attainable_p_test(test, a.size, b.size))
        if a.size and b.size:
            row["effect"] = float((a - b).mean()) if test == "wilcoxon" else float(a.mean() - b.mean())
            row["ci_lo"], row["ci_hi"] = bootstrap_mean_diff_ci(a, b, test == "wilcoxon", n_boot=n_boot, seed=seed)
            if test == "wilcoxon":
                d = a - b
                if np.all(d == 0):
                    row.update(statistic=0.0, p_value=1.0)
                else:
                    res = stats.wilcoxon(a, b, alternative="two-sided", method="auto")
                    row.update(statistic=float(res.statistic), p_value=float(res.pvalue))
            else:
                res = stats.mannwhitneyu(a, b, alternative="two-sided", method="auto")
                row.update(statistic=float(res.statistic), p_value=float(res.pvalue))
        rows.append(row)
    cols = ["name", "test", "n_a", "n_b", "mean_a", "mean_b", "effect", "ci_lo", "ci_hi", "statistic", "p_value",
            "p_adjusted", "min_p", "significant"]
    df = pd.DataFrame(rows, columns=[c for c in cols if c not in ("p_adjusted", "significant")])
    df["p_adjusted"] = adjust_pvalues(df["p_value"].to_numpy(), correction) if len(df) else []
    df["significant"] = df["p_adjusted"] < alpha
    return df[cols]


__all__ = ["bootstrap_ci", "summarize", "adjust_pvalues", "cliffs_delta", "cohens_d", "permutation_pvalue",
           "pairwise_tests", "min_attainable_p", "min_attainable_p_test", "bootstrap_mean_diff_ci", "declared_tests",
           "ALPHA", "CORRECTIONS", "METHODS", "TESTS"]
