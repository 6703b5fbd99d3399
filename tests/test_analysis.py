"""Statistics of the reports, checked against hand-computed values and scipy on fixed numbers."""

import numpy as np
import pytest
from scipy import stats

from mlplatform.analysis import (adjust_pvalues, bootstrap_ci, cliffs_delta, cohens_d, min_attainable_p,
                                 pairwise_tests, permutation_pvalue, summarize)

X = np.array([0.61, 0.72, 0.55, 0.68, 0.70, 0.64, 0.59, 0.75, 0.66, 0.62, 0.71, 0.58])
A = np.array([0.81, 0.77, 0.85, 0.79, 0.83])
B = np.array([0.74, 0.78, 0.70, 0.72, 0.76, 0.73])
C = np.array([0.80, 0.75, 0.82, 0.71])


def test_bootstrap_ci_is_seeded_and_agrees_with_scipy_percentile_bootstrap():
    lo, hi = bootstrap_ci(X, np.mean)
    assert (lo, hi) == bootstrap_ci(X, np.mean, seed=0)
    assert (lo, hi) != bootstrap_ci(X, np.mean, seed=1)
    assert lo < X.mean() < hi
    ref = stats.bootstrap((X,), np.mean, n_resamples=10000, method="percentile", confidence_level=0.95,
                          rng=np.random.default_rng(1)).confidence_interval
    # two independent 10 000-resample estimates of the same quantiles: agree to well within 0.005 (s.e. ~ 0.001)
    assert lo == pytest.approx(ref.low, abs=0.005) and hi == pytest.approx(ref.high, abs=0.005)
    m_lo, m_hi = bootstrap_ci(X)  # default statistic: the median
    ref = stats.bootstrap((X,), np.median, n_resamples=10000, method="percentile",
                          rng=np.random.default_rng(1)).confidence_interval
    assert m_lo == pytest.approx(ref.low, abs=0.011) and m_hi == pytest.approx(ref.high, abs=0.011)
    assert bootstrap_ci(X, np.mean, ci=0.5)[1] - bootstrap_ci(X, np.mean, ci=0.5)[0] < hi - lo


def test_bootstrap_ci_edge_cases():
    assert bootstrap_ci([0.4]) == (0.4, 0.4)
    assert all(np.isnan(bootstrap_ci([])))
    assert bootstrap_ci([0.4, np.nan]) == (0.4, 0.4)  # NaN (metric not logged) is dropped
    # any callable works, with or without numpy's axis= keyword
    assert bootstrap_ci(X, lambda v: float(np.percentile(v, 90)), n_boot=200) == \
        bootstrap_ci(X, lambda v, axis=None: np.percentile(v, 90, axis=axis), n_boot=200)
    with pytest.raises(ValueError, match="ci"):
        bootstrap_ci(X, ci=95)


def test_summarize_fixed_numbers():
    s = summarize([3.0, 1.0, 2.0, 4.0, np.nan])
    assert s["n"] == 4 and s["median"] == 2.5 and s["mean"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["std"] == pytest.approx(np.sqrt(5 / 3))  # sum of squares 5, ddof=1
    assert (s["q1"], s["q3"]) == (1.75, 3.25)  # linear interpolation, as numpy's default
    assert (s["ci_lo"], s["ci_hi"]) == bootstrap_ci([1.0, 2.0, 3.0, 4.0], np.mean)
    assert set(s) == {"n", "median", "mean", "std", "ci_lo", "ci_hi", "q1", "q3", "min", "max"}
    one, none = summarize([0.7]), summarize([])
    assert one["n"] == 1 and one["ci_lo"] == one["ci_hi"] == 0.7 and np.isnan(one["std"])
    assert none["n"] == 0 and np.isnan(none["median"])


def test_corrections_hand_computed():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04; Holm x4, x3, x2, x1 then running max; BH x4/1, x4/2, x4/3, x4/4 then running min
    np.testing.assert_allclose(adjust_pvalues(p, "bonferroni"), [0.04, 0.16, 0.12, 0.02])
    np.testing.assert_allclose(adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(adjust_pvalues(p, "fdr_bh"), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(adjust_pvalues([0.3, 0.6], "bonferroni"), [0.6, 1.0])  # capped at 1
    np.testing.assert_allclose(adjust_pvalues([0.2, 0.5, np.nan], "holm"), [0.4, 0.5, np.nan])  # NaN not counted
    assert adjust_pvalues([], "holm").size == 0
    with pytest.raises(ValueError, match="correction"):
        adjust_pvalues(p, "sidak")


def test_bh_equals_scipy_false_discovery_control():
    p = np.random.default_rng(3).uniform(0, 0.2, 25) ** 1.5
    np.testing.assert_allclose(adjust_pvalues(p, "fdr_bh"), stats.false_discovery_control(p, method="bh"))
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])  # with ties to the cut
    np.testing.assert_allclose(adjust_pvalues(p, "fdr_bh"), stats.false_discovery_control(p))


def test_mannwhitney_against_scipy_and_hand_computed():
    df = pairwise_tests({"a": A, "b": B, "c": C})
    assert list(df.columns) == ["a", "b", "n_a", "n_b", "statistic", "p_value", "p_adjusted", "cliffs_delta",
                                "rank_biserial", "significant"]
    assert list(zip(df["a"], df["b"])) == [("a", "b"), ("a", "c"), ("b", "c")]
    for row, (x, y) in zip(df.itertuples(), [(A, B), (A, C), (B, C)]):
        ref = stats.mannwhitneyu(x, y, alternative="two-sided", method="auto")
        assert row.statistic == ref.statistic and row.p_value == pytest.approx(ref.pvalue, rel=1e-12)
        assert (row.n_a, row.n_b) == (len(x), len(y))
        assert row.rank_biserial == pytest.approx(row.cliffs_delta)  # the same number for independent samples
    # a vs b by hand: of the 30 pairs a wins 29 (0.77 < 0.78 is the one loss) -> U = 29, delta = (29 - 1) / 30
    assert df.loc[0, "statistic"] == 29 and df.loc[0, "cliffs_delta"] == pytest.approx(28 / 30)
    assert cliffs_delta(B, A) == pytest.approx(-28 / 30)
    np.testing.assert_allclose(df["p_adjusted"], adjust_pvalues(df["p_value"], "holm"))
    assert (df["significant"] == (df["p_adjusted"] < 0.05)).all() and df.loc[0, "significant"]
    for method in ("bonferroni", "fdr_bh"):
        np.testing.assert_allclose(pairwise_tests({"a": A, "b": B, "c": C}, correction=method)["p_adjusted"],
                                   adjust_pvalues(df["p_value"], method))


def test_mannwhitney_with_ties_and_missing_groups():
    x, y = [0.5, 0.6, 0.6, 0.7, 0.8], [0.6, 0.4, 0.5, 0.5]  # ties: scipy's 'auto' uses the normal approximation
    row = pairwise_tests({"x": x, "y": y}).iloc[0]
    ref = stats.mannwhitneyu(x, y, alternative="two-sided", method="auto")
    assert row.statistic == ref.statistic and row.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    df = pairwise_tests({"x": x, "empty": [np.nan], "y": y})
    assert df["p_value"].isna().tolist() == [True, False, True]
    assert df.loc[1, "p_adjusted"] == pytest.approx(ref.pvalue)  # one real test: nothing to correct
    assert not df["significant"].iloc[0]


def test_smallest_attainable_p():
    assert min_attainable_p(3, 3) == pytest.approx(0.1)
    assert pairwise_tests({"lo": [1, 2, 3], "hi": [4, 5, 6]}).loc[0, "p_value"] == pytest.approx(0.1)
    assert min_attainable_p(5, 5) == pytest.approx(2 / 252)


def test_permutation_exact_equals_scipy():
    def diff(x, y, axis):
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    # C(11, 5) = 462 splits <= n_perm: both enumerate them all, so the p-values agree exactly
    stat, p = permutation_pvalue(A, B)
    ref = stats.permutation_test((A, B), diff, vectorized=True, n_resamples=10000, alternative="two-sided")
    assert stat == pytest.approx(A.mean() - B.mean()) and p == pytest.approx(ref.pvalue, rel=1e-12)
    df = pairwise_tests({"a": A, "b": B}, method="permutation")
    assert list(df.columns) == ["a", "b", "n_a", "n_b", "statistic", "p_value", "p_adjusted", "mean_diff",
                                "cohens_d", "significant"]
    assert df.loc[0, "p_value"] == pytest.approx(ref.pvalue, rel=1e-12)
    # Cohen's d by hand: pooled variance ((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)
    pooled = (4 * A.var(ddof=1) + 5 * B.var(ddof=1)) / 9
    assert df.loc[0, "cohens_d"] == pytest.approx((A.mean() - B.mean()) / np.sqrt(pooled))
    assert cohens_d([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.0


def test_permutation_monte_carlo_within_tolerance_of_scipy():
    rng = np.random.default_rng(7)
    x, y = rng.normal(0.68, 0.05, 12), rng.normal(0.66, 0.05, 11)  # C(23, 12) splits: sampled
    _, p = permutation_pvalue(x, y, n_perm=10000, seed=0)
    assert p == permutation_pvalue(x, y, n_perm=10000, seed=0)[1]  # seeded
    ref = stats.permutation_test((x, y), lambda a, b, axis: a.mean(axis) - b.mean(axis), vectorized=True,
                                 n_resamples=10000, rng=np.random.default_rng(1)).pvalue
    se = np.sqrt(ref * (1 - ref) / 10000)
    assert 0.001 < ref < 0.5 and abs(p - ref) < 6 * se * np.sqrt(2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        pairwise_tests({"a": A, "b": B}, method="ttest")
    with pytest.raises(ValueError, match="correction"):
        pairwise_tests({"a": A, "b": B}, correction="none")
    assert pairwise_tests({"only": A}).empty
