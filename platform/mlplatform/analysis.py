"""Statistics for comparing data subsets: pure functions on numbers and DataFrames (no MLflow, no plotting).

Seeds per subset are few (typically 3–10), so everything here is rank-based or resampling-based and reproducible:
the bootstrap and the permutation test take a seed. NaN values (a run that did not log a metric) are dropped.
"""

from __future__ import annotations

from itertools import combinations
import math
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
"""Tests a declared comparison of two groups may name: two-sided Mann-Whitney U (independent groups: two subsets,
seeds unpaired) and two-sided Wilcoxon signed-rank (paired by seed: e.g. a model before and after fine-tuning), both
exact."""
TREND_TESTS = ("jonckheere", "spearman")
"""Tests a declared trend across the ordered levels of one axis may name (:func:`trend_test`): Jonckheere-Terpstra
(exact null distribution without ties, permutation with them) and Spearman's rho between level rank and value
(permutation p-value)."""
ALTERNATIVES = ("two-sided", "increasing", "decreasing")
N_PERM = 20000  # permutations of a trend test with ties (a fixed seed: the same data give the same p)


def jonckheere_null(sizes) -> np.ndarray:
    """Exact null distribution of the Jonckheere-Terpstra statistic J for groups of these sizes (no ties): counts of
    the equally likely rank orders, indexed by J = 0 .. sum_{i<j} n_i n_j.

    J counts the pairs (x in an earlier group, y in a later group) with x < y. Under H0 every interleaving of the
    groups is equally likely, and the number with a given count of such pairs is a coefficient of the q-multinomial
    [N; n_1, ..., n_k]_q = prod_{i<=N} (1 - q^i) / prod_g prod_{i<=n_g} (1 - q^i) (Gaussian polynomials; the
    statistic is the number of inversions of a multiset permutation). Computed in exact integers."""
    sizes = [int(n) for n in sizes if int(n) > 0]
    n = sum(sizes)
    top = sum(a * b for a, b in combinations(sizes, 2))
    poly = [0] * (top + n * (n + 1) // 2 + 1)
    poly[0] = 1
    for i in range(1, n + 1):  # multiply by (1 - q^i)
        for k in range(len(poly) - 1, i - 1, -1):
            poly[k] -= poly[k - i]
    for size in sizes:
        for i in range(1, size + 1):  # divide by (1 - q^i): the series 1 + q^i + q^2i + ...
            for k in range(i, len(poly)):
                poly[k] += poly[k - i]
    counts = np.array(poly[:top + 1], dtype=object)
    if any(c < 0 for c in counts) or any(poly[top + 1:]):
        raise AssertionError("q-multinomial did not divide exactly")  # cannot happen: a polynomial identity
    return counts


def _jonckheere_statistic(groups: list[np.ndarray]) -> float:
    """J: over every pair of groups i < j, the pairs (x_i, x_j) with x_i < x_j, ties counting one half."""
    j = 0.0
    for a, b in combinations(groups, 2):
        diff = b[None, :] - a[:, None]
        j += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
    return j


def _tail_p(observed: float, null_values: np.ndarray, weights, alternative: str) -> float:
    """p of ``observed`` under a discrete null (values with weights), one- or two-sided (two-sided: twice the
    smaller tail, at most 1)."""
    null_values = np.nan_to_num(np.asarray(null_values, dtype=float), nan=0.0)  # a constant arrangement: no trend
    w = np.asarray(weights, dtype=float)
    w = w / w.sum()
    eps = 1e-9 * max(1.0, abs(observed))
    upper = float(w[null_values >= observed - eps].sum())
    lower = float(w[null_values <= observed + eps].sum())
    if alternative == "increasing":
        return min(1.0, upper)
    if alternative == "decreasing":
        return min(1.0, lower)
    return min(1.0, 2 * min(upper, lower))


def _arrangements(sizes: list[int]) -> int:
    count = math.factorial(sum(sizes))
    for n in sizes:
        count //= math.factorial(n)
    return count


def _all_assignments(sizes: list[int]):
    """Every way to deal positions 0..N-1 into groups of these sizes (as index arrays in group order)."""
    def deal(rest: tuple, k: int):
        if k == len(sizes):
            yield []
            return
        for chosen in combinations(rest, sizes[k]):
            left = tuple(i for i in rest if i not in chosen)
            for tail in deal(left, k + 1):
                yield [*chosen, *tail]
    for order in deal(tuple(range(sum(sizes))), 0):
        yield np.array(order)


def trend_test(groups, test: str = "jonckheere", alternative: str = "two-sided", n_perm: int = N_PERM,
               seed: int = 0) -> dict:
    """A trend across ordered groups (``groups[0]`` the lowest level): ``statistic``, ``p_value`` and ``exact``
    (False when p comes from random permutations).

    ``jonckheere``: J (see :func:`_jonckheere_statistic`); without ties, p from its exact null distribution
    (:func:`jonckheere_null`). ``spearman``: rho between each value's level (its group's index, tied within a group)
    and the value. Otherwise p is a permutation p-value over the assignments of the values to the groups: all of
    them when there are at most ``n_perm``, else ``n_perm`` random ones (seeded) plus the observed one.
    ``alternative``: ``increasing`` (values rise with the level), ``decreasing`` or ``two-sided``."""
    if test not in TREND_TESTS:
        raise ValueError(f"trend test {test!r}; allowed: {', '.join(TREND_TESTS)}")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative {alternative!r}; allowed: {', '.join(ALTERNATIVES)}")
    groups = [g for g in (_clean(g) for g in groups) if g.size]
    if len(groups) < 2:
        return dict(statistic=np.nan, p_value=np.nan, exact=False)
    sizes = [g.size for g in groups]
    values = np.concatenate(groups)
    cuts = np.cumsum(sizes)[:-1]
    level_ranks = stats.rankdata(np.repeat(np.arange(len(groups)), sizes))

    def statistics(arrangements: np.ndarray) -> np.ndarray:
        """The statistic of each row of ``arrangements`` (values in group order)."""
        if test == "jonckheere":
            return np.array([_jonckheere_statistic(np.split(row, cuts)) for row in arrangements])
        r = stats.rankdata(arrangements, axis=1)
        x = level_ranks - level_ranks.mean()
        y = r - r.mean(axis=1, keepdims=True)
        denom = np.sqrt((x ** 2).sum() * (y ** 2).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (y @ x) / denom

    if np.unique(values).size == 1:  # every value the same: no order at all, and nothing to rank
        return dict(statistic=np.nan, p_value=1.0, exact=True)
    observed = float(statistics(values[None, :])[0])
    if test == "jonckheere" and np.unique(values).size == values.size:
        counts = jonckheere_null(sizes)
        return dict(statistic=observed, p_value=_tail_p(observed, np.arange(counts.size, dtype=float), counts,
                                                        alternative), exact=True)
    if _arrangements(sizes) <= n_perm:
        null = statistics(np.array([values[order] for order in _all_assignments(sizes)]))
        exact = True
    else:
        rng = np.random.default_rng(seed)
        null = np.append(statistics(np.array([rng.permutation(values) for _ in range(n_perm)])), observed)
        exact = False
    return dict(statistic=observed, p_value=_tail_p(observed, null, np.ones(null.size), alternative), exact=exact)


def _trend_row(c: dict, seed: int) -> dict:
    groups = [_clean(g) for g in c["groups"]]
    alternative = c.get("alternative", "two-sided")
    filled = [g for g in groups if g.size]
    res = trend_test(groups, c["test"], alternative, seed=seed)
    slope, lo, hi = theil_sen(groups)
    return dict(name=c.get("name", ""), test=c["test"], n_a=int(sum(g.size for g in groups)), n_b=len(filled),
                mean_a=float(filled[0].mean()) if filled else np.nan,
                mean_b=float(filled[-1].mean()) if filled else np.nan, effect=slope, ci_lo=lo, ci_hi=hi,
                statistic=res["statistic"], p_value=res["p_value"],
                min_p=min_attainable_p_trend([g.size for g in groups], alternative))


def min_attainable_p_trend(sizes, alternative: str = "two-sided") -> float:
    """Smallest p a trend test over groups of these sizes can give: one arrangement out of N! / prod(n_g!) (twice
    that, two-sided). Three levels of two seeds: 1/90 one-sided."""
    sizes = [int(n) for n in sizes if int(n)]
    if len(sizes) < 2:
        return np.nan
    return min(1.0, (1 if alternative != "two-sided" else 2) / _arrangements(sizes))


def theil_sen(groups) -> tuple[float, float, float]:
    """The trend's size: the Theil-Sen slope of value against level index (change per level step) with its 95 %
    confidence interval (scipy.stats.theilslopes)."""
    groups = [_clean(g) for g in groups]
    x = np.concatenate([np.full(g.size, i, float) for i, g in enumerate(groups)])
    y = np.concatenate(groups)
    if np.unique(x).size < 2:
        return np.nan, np.nan, np.nan
    if np.ptp(y) == 0:  # every value the same: a flat line, known exactly
        return 0.0, 0.0, 0.0
    res = stats.theilslopes(y, x, alpha=0.95)
    return float(res.slope), float(res.low_slope), float(res.high_slope)


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
    ``wilcoxon``: paired by position, pairs with a NaN dropped); a trend comparison (test one of
    :data:`TREND_TESTS`) has instead ``groups`` (value arrays, lowest level first) and ``alternative``, and its row
    says: n_a the values, n_b the levels, mean_a and mean_b the means of the lowest and highest level, effect the
    Theil-Sen slope per level step with its 95 % CI (:func:`theil_sen`). Columns: name, test, n_a, n_b, mean_a, mean_b,
    effect (mean a - mean b; paired: mean of the differences), ci_lo, ci_hi (95 % percentile bootstrap), statistic,
    p_value, p_adjusted, min_p (smallest p the test can give with these sizes), significant."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r}; allowed: {', '.join(CORRECTIONS)}")
    rows = []
    for c in comparisons:
        test = c["test"]
        if test in TREND_TESTS:
            rows.append(_trend_row(c, seed))
            continue
        if test not in TESTS:
            raise ValueError(f"comparison {c.get('name')!r}: test {test!r}; allowed: {', '.join(TESTS + TREND_TESTS)}")
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
           "trend_test", "jonckheere_null", "min_attainable_p_trend", "theil_sen", "ALPHA", "CORRECTIONS", "METHODS",
           "TESTS", "TREND_TESTS", "ALTERNATIVES"]
