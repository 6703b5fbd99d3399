"""A study that can answer its question: comparisons declared before the run and judged by their own tests, the
classical baseline a model must beat, and augmentations that follow the image formation."""

import json
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from scipy import ndimage, stats

from experiments.specs import load_experiment
from hrtem_core.errors import ConfigError
from mlplatform import analysis, baseline
from mlplatform.config import Augmentation, config_from_dict
from mlplatform.report import write_report
from mlplatform.tracking import get_or_create_experiment
from mlplatform.transforms import PhysicsAugmentation, thin_counts
from sweep_helpers import sweep_spec, write_spec

# --------------------------------------------------------------------------------------------- declared tests


def test_declared_tests_match_scipy_and_are_holm_adjusted_over_the_declared_family():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.7, 0.02, 6), rng.normal(0.6, 0.02, 6)
    pre, post = rng.normal(0.5, 0.05, 6), None
    post = pre + np.array([0.05, 0.07, 0.04, 0.06, 0.08, 0.03])
    df = analysis.declared_tests([dict(name="subsets", test="mannwhitney", a=a, b=b),
                                  dict(name="finetune", test="wilcoxon", a=post, b=pre),
                                  dict(name="null", test="mannwhitney", a=a, b=a + 1e-9 * np.arange(6))])
    u = stats.mannwhitneyu(a, b, alternative="two-sided", method="exact")
    w = stats.wilcoxon(post, pre, alternative="two-sided", method="exact")
    assert df.loc[0, "p_value"] == pytest.approx(u.pvalue) and df.loc[0, "statistic"] == u.statistic
    assert df.loc[1, "p_value"] == pytest.approx(w.pvalue) == 2 / 64  # all six differences positive
    assert df.loc[1, "effect"] == pytest.approx((post - pre).mean())
    assert df.loc[0, "effect"] == pytest.approx(a.mean() - b.mean())
    assert list(df["p_adjusted"]) == pytest.approx(list(analysis.adjust_pvalues(df["p_value"], "holm")))
    assert df.loc[0, "ci_lo"] < df.loc[0, "effect"] < df.loc[0, "ci_hi"]
    assert df.loc[1, "ci_lo"] > 0  # every pair improved: the bootstrap of the mean difference stays above 0
    # Holm: the paired test's p = 1/32 is second smallest of three, so it is multiplied by 2: 0.0625, not significant.
    # Six pairs reach 0.05 only when everything else declared is significant too (hence the sweep's check below)
    assert df.loc[1, "p_adjusted"] == pytest.approx(0.0625)
    assert list(df["significant"]) == [True, False, False]
    assert df.loc[1, "min_p"] == 2 / 64 and df.loc[0, "min_p"] == pytest.approx(2 / 924)
    # the same input gives the same CI (seeded)
    again = analysis.declared_tests([dict(name="subsets", test="mannwhitney", a=a, b=b)])
    assert again.loc[0, "ci_lo"] == analysis.declared_tests([dict(name="x", test="mannwhitney", a=a, b=b)]).loc[
        0, "ci_lo"]


def test_declared_tests_refuse_what_they_cannot_judge():
    with pytest.raises(ValueError, match="as many values"):
        analysis.declared_tests([dict(name="p", test="wilcoxon", a=[1, 2, 3], b=[1, 2])])
    with pytest.raises(ValueError, match="test 'ttest'"):
        analysis.declared_tests([dict(name="p", test="ttest", a=[1, 2], b=[1, 2])])
    assert analysis.min_attainable_p_test("wilcoxon", 5, 5) == 2 / 32 > 0.05  # five pairs can never reach 0.05


# ------------------------------------------------------------------------------------------ the sweep file


def _spec_with(root, name, **extra):
    spec = sweep_spec(name, seeds=list(range(7)), **extra)
    spec["finetune"]["set"]["data.train"] = [{"path": str(root / "target")}]
    return write_spec(root, f"{name}.yaml", spec)


COMPARISONS = [
    {"name": "defocus-coverage", "hypothesis": "near-focus images only lower Dice", "a": "near-focus", "b": "all",
     "benchmark": "bench"},
    {"name": "finetune-gain", "hypothesis": "fine-tuning raises Dice", "a": "all/finetune", "b": "all",
     "benchmark": "bench", "test": "wilcoxon"},
]


def test_comparisons_are_validated_when_the_sweep_is_loaded(workspace):
    root = workspace
    exp = load_experiment(_spec_with(root, "ok", comparisons=COMPARISONS, finetune={
        "set": {"data.train": [{"path": str(root / "target")}]}, "target": "bench"}), "sweep")
    assert [c.name for c in exp.spec.comparisons] == ["defocus-coverage", "finetune-gain"]
    assert exp.spec.model_dump(mode="json")["comparisons"][1]["test"] == "wilcoxon"
    bad = [
        ({"a": "nowhere"}, "a: subset 'nowhere' is not one of its levels \\(all, near-focus\\)"),
        ({"a": "all/warmup"}, "a: finetune 'warmup' is not one of its levels \\(none, finetune\\)"),
        ({"b": "near-focus"}, "a and b are the same group"),
        ({"benchmark": "cdse"}, "benchmark 'cdse' is not scored by the group {subset: near-focus, finetune: none}"),
        ({"test": "ttest"}, "comparisons.0.test"),
        ({"name": "two words"}, "must be non-empty without spaces"),
    ]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_experiment(_spec_with(root, "bad", comparisons=[{**COMPARISONS[0], **change}]), "sweep")
    five = sweep_spec("five", seeds=list(range(5)), comparisons=[COMPARISONS[1]])
    five["finetune"]["set"]["data.train"] = [{"path": str(root / "target")}]
    with pytest.raises(ConfigError, match="wilcoxon test on 5 and 5 runs per group cannot give p below 0.0625"):
        load_experiment(write_spec(root, "five.yaml", five), "sweep")
    # six pairs give p >= 1/32: alone that can reach 0.05, but as one of two Holm-adjusted comparisons it might not
    six = sweep_spec("six", seeds=list(range(6)), comparisons=COMPARISONS)
    six["finetune"]["set"]["data.train"] = [{"path": str(root / "target")}]
    with pytest.raises(ConfigError, match=r"finetune-gain: .* p >= 0.0312; Holm-adjusted over the 2 declared comparisons that can become 0.0625"):
        load_experiment(write_spec(root, "six.yaml", six), "sweep")
    with pytest.raises(ConfigError, match="finetune.target 'nothing'"):
        load_experiment(_spec_with(root, "t", finetune={"set": {"data.train": [{"path": str(root / "target")}]},
                                                         "target": "nothing"}), "sweep")


def test_a_sweep_without_comparisons_keeps_its_fingerprint(workspace):
    # the keys added for declared comparisons are left out of the definition while unset: sweeps registered before
    # them are still the same sweep
    exp = load_experiment(_spec_with(workspace, "plain"), "sweep")
    dumped = exp.spec.model_dump(mode="json")
    assert "comparisons" not in dumped and "alpha" not in dumped and "target" not in dumped["finetune"]


def test_trend_tests_give_the_p_values_of_scipy_and_of_full_enumeration():
    import itertools

    rng = np.random.default_rng(3)
    # two levels: Jonckheere-Terpstra is the Mann-Whitney U of the later group, so its exact p is scipy's
    low, high = rng.normal(0, 1, 5), rng.normal(1, 1, 6)
    for alternative, scipy_alt in (("increasing", "greater"), ("decreasing", "less"), ("two-sided", "two-sided")):
        res = analysis.trend_test([low, high], "jonckheere", alternative)
        assert res["exact"] and res["p_value"] == pytest.approx(
            stats.mannwhitneyu(high, low, alternative=scipy_alt, method="exact").pvalue, rel=1e-12)
    # the exact null distribution counts every interleaving of the groups: N! / prod(n!) of them
    assert sum(analysis.jonckheere_null([2, 3, 2])) == 210
    # three levels, with and without ties: every assignment of the values to the groups, enumerated here
    for groups, test in (([rng.normal(size=2), rng.normal(0.5, 1, 3), rng.normal(1, 1, 2)], "jonckheere"),
                         (([1.0, 2.0], [2.0, 3.0, 3.0], [3.0, 4.0]), "spearman"),
                         (([1.0, 2.0], [2.0, 3.0, 3.0], [3.0, 4.0]), "jonckheere")):
        values, sizes = np.concatenate(groups), [len(g) for g in groups]
        res = analysis.trend_test(groups, test, "increasing")
        levels = np.repeat(np.arange(3), sizes)
        stat = ((lambda v: analysis._jonckheere_statistic(np.split(v, np.cumsum(sizes)[:-1]))) if test == "jonckheere"
                else (lambda v: stats.spearmanr(levels, v).statistic))
        null = [stat(values[list(p)]) for p in itertools.permutations(range(values.size))]
        assert res["exact"] and res["p_value"] == pytest.approx(np.mean(np.array(null) >= res["statistic"] - 1e-9))
    assert analysis.min_attainable_p_trend([6, 6, 6, 6], "increasing") == pytest.approx(1 / 2_308_743_493_056)
    assert analysis.min_attainable_p_trend([2, 2], "two-sided") == pytest.approx(2 / 6)
    # in the findings table: n_a values over n_b levels, the Theil-Sen slope per level as the effect
    df = analysis.declared_tests([dict(name="t", test="jonckheere", groups=[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]],
                                       alternative="increasing")])
    row = df.iloc[0]
    assert (row.n_a, row.n_b, row.effect) == (6, 3, pytest.approx(0.2)) and row.p_value == pytest.approx(1 / 90)


def _language(root, **extra):
    """A sweep with a dataset of its own, an axis and three fine-tune variants (tiny, written next to base.yaml)."""
    spec = {"kind": "sweep", "name": "lang", "base": "base.yaml", "data_root": str(root / "own"),
            "datasets": {"extra": {"recipe": "tiny", "n": 4, "seed": 9, "set": {"imaging.dose_e_per_A2": 150}}},
            "subsets": [{"name": "all", "set": {}},
                        {"name": "mixed",
                         "set": {"data.train": [{"path": str(root / "train")}, {"dataset": "extra"}]}}],
            "axes": {"optim.lr": [0.001, 0.003], "data.augmentation": [{"name": "plain", "value": {}}]},
            "seeds": [0, 1, 2, 3, 4, 5],
            "finetune": [{"name": f"n{n}", "set": {"data.train": [{"path": str(root / "target"), "max_samples": n}],
                                                   "finetune.freeze": freeze}, "target": "bench"}
                         for n, freeze in ((2, "none"), (4, "encoder"), (8, "decoder"))],
            **extra}
    return write_spec(root, "lang.yaml", spec)


def test_a_sweep_declares_datasets_axes_fine_tune_variants_and_trends(workspace):
    from experiments.specs import Design, cells_of, phases_of, unit_config

    trend = {"name": "amount", "hypothesis": "more target data, higher target Dice", "axis": "finetune",
             "where": {"subset": "all", "optim.lr": 0.001}, "benchmark": "bench", "test": "jonckheere",
             "alternative": "increasing"}
    decay = {"name": "decay", "hypothesis": "more target data, a larger drop", "axis": "finetune",
             "levels": ["n2", "n8"], "benchmark": "bench", "test": "spearman", "statistic": "drop"}
    pair = {"name": "lr", "hypothesis": "lr matters", "a": {"optim.lr": 0.001, "finetune": "n4"},
            "b": {"optim.lr": "0.003", "finetune": "n4"}, "benchmark": "bench", "test": "wilcoxon"}
    exp = load_experiment(_language(workspace, comparisons=[trend, decay, pair]), "sweep")
    cells = cells_of(exp)
    # subsets x axis levels x seeds, each with a pretrain and one unit per variant
    assert len(cells) == 2 * 2 * 1 * 6 and len({c.key for c in cells}) == len(cells)
    assert cells[0].key == "all/data.augmentation=plain/optim.lr=0.001/s0"  # axes in file order (safe_dump sorts)
    assert phases_of(exp) == ["pretrain", "ft:n2", "ft:n4", "ft:n8"]
    mixed = next(c for c in cells if c.subset == "mixed" and dict(c.levels)["optim.lr"] == "0.003")
    config = unit_config(exp, mixed.subset, mixed.levels, "ft:n8")
    assert config.optim.lr == 0.003 and config.finetune.frozen == "decoder"
    assert config.data.train[0].max_samples == 8
    pre = unit_config(exp, mixed.subset, mixed.levels, "pretrain")
    assert pre.data.train[1].path == str(workspace / "own" / "extra") and exp.dataset_names(pre) == ["extra"]
    design = Design(exp.spec)
    # the pretrained models are the level "none" (no target data) of the finetune axis
    assert [g["finetune"] for g in design.groups(exp.spec.comparisons[0])] == ["none", "n2", "n4", "n8"]
    # unspecified axes pool their levels: 2 subsets x 2 learning rates x 6 seeds per variant in the decay trend
    assert design.pooled(design.groups(exp.spec.comparisons[1])[0]) == 24
    # a variant for some cells only: the others have no such unit, and a comparison cannot select them
    from experiments.specs import phases_for
    only = load_experiment(_language(workspace, comparisons=[trend], finetune=[
        {"name": "n2", "set": {}, "target": "bench"}, {"name": "n4", "set": {}, "target": "bench"},
        {"name": "n8", "set": {}, "where": {"subset": "all"}, "target": "bench"}]), "sweep")
    assert [phases_for(only, c)[-1] for c in cells_of(only)[::6]] == ["ft:n8", "ft:n8", "ft:n4", "ft:n4"]
    assert Design(only.spec).pooled({"finetune": "n8"}) == 2 * 6
    bad = [
        ({"comparisons": [{**pair, "a": {"subset": "mixed", "finetune": "n8"}, "b": {"subset": "all", "finetune":
                                                                                      "n8"}}],
          "finetune": [{"name": "n4", "set": {}}, {"name": "n8", "set": {}, "where": {"subset": "all"}}]},
         "a: no cell matches"),
        ({"comparisons": [], "finetune": [{"name": "n8", "set": {}, "where": {"subset": "none-such"}}]},
         "where: subset 'none-such' is not one of its levels"),
        ({"comparisons": [{**trend, "axis": "optim.momentum"}]}, "axis 'optim.momentum' is not a dimension"),
        ({"comparisons": [{**trend, "where": {"optim.lr": 0.002}}]}, "optim.lr 0.002 is not one of its levels"),
        ({"comparisons": [{**trend, "a": "all"}]}, "judges a trend: give 'axis'"),
        ({"comparisons": [{**pair, "a": {"subset": "all", "finetune": "n4"}}]}, "must fix the same dimensions"),
        ({"comparisons": [{**pair, "statistic": "drop", "a": {"subset": "all"}, "b": {"subset": "mixed"}}]},
         "statistic drop .* needs fine-tuned groups"),
        ({"comparisons": [{**trend, "where": {"subset": "all", "optim.lr": 0.001}, "levels": ["n2", "n4"]}],
          "seeds": [0, 1]}, "trend over 2 levels of 2 runs cannot give p below 0.167"),
        ({"axes": {"data.train.0.filter": ["x"]}, "comparisons": []}, "set the same key"),
        ({"axes": {"optim": [{"name": "a", "value": {}}], "optim.lr": [1]}, "comparisons": []}, "lies inside"),
        ({"axes": {"optim.lr": [{"lr": 1}]}, "comparisons": []}, "needs a name"),
        ({"finetune": [{"name": "pretrain", "set": {}}], "comparisons": []}, "not 'none', 'pretrain'"),
        ({"datasets": {}, "comparisons": []}, "dataset 'extra' is not declared in this sweep's datasets"),
        ({"comparisons": [{**pair, "benchmark": "non-target"}], "finetune": [{"name": "n4", "set": {}}]},
         "'non-target' .* needs finetune.target"),
    ]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_experiment(_language(workspace, **change), "sweep")


# ------------------------------------------------------------------------------------------ the report


def test_the_report_judges_the_comparisons_logged_at_registration_next_to_the_baseline(workspace, tmp_path):
    """Findings from the definition logged on the parent (not from any file), numbers equal scipy's; the baseline
    computed on the benchmark the runs were scored on; the overview figures written."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = get_or_create_experiment("design", uri)
    parent = client.create_run(exp, tags={"sweep": "design", "kind": "sweep"}).info.run_id
    client.log_dict(parent, {"kind": "sweep", "name": "design", "comparisons": COMPARISONS,
                             "finetune": {"target": "bench"}}, "sweep/definition.yaml")
    bench = [{"name": "bench", "path": str(workspace / "bench"), "filter": None, "max_samples": None,
              "max_images_per_structure": None, "weight": 1.0}]
    values = {}
    pre_ids = {}
    for subset, level in (("all", 0.70), ("near-focus", 0.60)):
        for seed in range(7):
            for phase in ("pretrain", "finetune"):
                v = level + 0.01 * seed + (0.03 + 0.002 * seed if phase == "finetune" else 0.0)
                values[(subset, phase, seed)] = v
                tags = {"sweep": "design", "kind": "cell", "sweep.subset": subset, "seed": str(seed),
                        "phase": phase, "mlflow.parentRunId": parent}
                if phase == "finetune":
                    tags.update({"pretrain_run": pre_ids[(subset, seed)], "epoch_offset": "2"})
                run = client.create_run(exp, tags=tags).info.run_id
                pre_ids.setdefault((subset, seed), run)
                now = int(time.time() * 1000)
                steps = (0, 1) if phase == "pretrain" else (2, 3)
                client.log_batch(run, metrics=[Metric("ood/bench/dice", v - 0.05 * (s == steps[0]), now, s)
                                               for s in steps]
                                 + [Metric("val/dice", 0.8, now, s) for s in steps],
                                 params=[Param("benchmarks", json.dumps(bench)), Param("epochs", "2")])
                client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    out = tmp_path / "report"
    index = write_report("sweep", "design", uri, out)
    found = pd.read_csv(out / "findings.csv")
    assert list(found["name"]) == ["defocus-coverage", "finetune-gain"]
    near = [values[("near-focus", "pretrain", s)] for s in range(7)]
    every = [values[("all", "pretrain", s)] for s in range(7)]
    tuned = [values[("all", "finetune", s)] for s in range(7)]
    u = stats.mannwhitneyu(near, every, alternative="two-sided")
    w = stats.wilcoxon(tuned, every, alternative="two-sided")
    assert found.loc[0, "p_value"] == pytest.approx(u.pvalue)
    assert found.loc[1, "p_value"] == pytest.approx(w.pvalue)
    assert list(found["p_adjusted"]) == pytest.approx(list(analysis.adjust_pvalues([u.pvalue, w.pvalue])))
    assert found.loc[0, "effect"] == pytest.approx(np.mean(near) - np.mean(every))
    assert found.loc[0, "finding"].startswith("near-focus scores 0.100 lower than all on bench")
    assert "significant at 0.05" in found.loc[1, "finding"]
    floor = pd.read_csv(out / "baseline.csv")
    assert set(floor["subset"]) == {"all", "near-focus"} and set(floor["benchmark"]) == {"bench"}
    assert 0 <= floor["baseline"].iloc[0] <= 1
    page = index.read_text()
    assert page.index("<h2>Findings</h2>") < page.index("<h2>Classical baseline</h2>") < page.index(
        "<h2>Per benchmark</h2>")
    assert (out / "overview.png").stat().st_size > 0 and (out / "dynamics_overview.png").stat().st_size > 0
    assert "holds out images of the fine-tuning data" in page


# ------------------------------------------------------------------------------------------ the baseline


def _disk_image(dark: bool, rng, n=96, r=20):
    yy, xx = np.mgrid[:n, :n]
    mask = ((yy - 50) ** 2 + (xx - 40) ** 2 <= r * r).astype(np.uint8)
    image = rng.poisson(50 * (1 - 0.3 * mask if dark else 1 + 0.3 * mask)).astype(np.float32)
    return image, mask


def test_baseline_finds_a_noisy_disk_with_the_right_polarity():
    rng = np.random.default_rng(0)
    pairs = [_disk_image(True, rng) for _ in range(4)]
    b = baseline.tuned("disks", [i for i, _ in pairs], [m for _, m in pairs])
    assert b.polarity == "dark" and b.sigma_px > 0 and b.dice > 0.95
    bright = [_disk_image(False, rng) for _ in range(2)]
    assert baseline.tuned("bright", [i for i, _ in bright], [m for _, m in bright]).polarity == "bright"
    # Otsu on a two-level image splits between the levels; the largest component wins over a speck
    x = np.zeros((40, 40))
    x[5:25, 5:25] = 1.0
    x[30:33, 30:33] = 1.0
    assert 0 <= baseline.otsu_threshold(x) < 1
    seg = baseline.segment(x, 0, "bright")
    assert seg.sum() == 400 and ndimage.label(seg)[1] == 1
    with pytest.raises(ValueError, match="polarity 'grey'"):
        baseline.segment(x, 0, "grey")


# ------------------------------------------------------------------------------------------ augmentation


def test_dose_resampling_is_poisson_at_the_lower_dose_and_leaves_non_counts_alone():
    rng = np.random.default_rng(0)
    counts = rng.poisson(40.0, (256, 256)).astype(np.float32)
    thinned = thin_counts(counts, 0.25, np.random.default_rng(1))
    # mean kept; variance of a Poisson(10) image scaled back by 4: 10 * 16 = 160 (counts: 40)
    assert thinned.mean() == pytest.approx(40.0, rel=0.01)
    assert thinned.var() == pytest.approx(160.0, rel=0.05)
    assert np.all((thinned * 0.25) == np.round(thinned * 0.25))
    smooth = counts + 0.5
    assert thin_counts(smooth, 0.25, np.random.default_rng(1)) is smooth
    physics = PhysicsAugmentation({"dose_resample": 1.0, "dose_min_factor": 0.5, "contrast_inversion": 1.0}, 3)
    assert not np.array_equal(physics.before_normalization(counts), counts)
    assert np.array_equal(physics.after_normalization(counts), -counts)
    again = PhysicsAugmentation({"dose_resample": 1.0, "dose_min_factor": 0.5}, 3)
    assert np.array_equal(again.before_normalization(counts),
                          PhysicsAugmentation({"dose_resample": 1.0, "dose_min_factor": 0.5}, 3)
                          .before_normalization(counts))  # seeded


def test_new_augmentation_keys_leave_existing_config_hashes_alone(workspace):
    base = yaml.safe_load((workspace / "base.yaml").read_text())
    plain = config_from_dict(base)
    assert "dose_resample" not in plain.model_dump()["data"]["augmentation"]
    on = config_from_dict(base, ["data.augmentation.dose_resample=0.5", "data.augmentation.contrast_inversion=0.5"])
    assert on.model_dump()["data"]["augmentation"]["dose_resample"] == 0.5
    assert Augmentation(dose_resample=0.5).model_dump()["dose_min_factor"] == 0.25


def test_every_shipped_sweep_and_study_file_loads_with_every_unit_config_resolved():
    """The files in experiments/configs/ are examples people copy: each loads (every cell's configs resolved and
    checked, the comparisons' power checked) without any data on disk."""
    from pathlib import Path

    import experiments

    folder = Path(experiments.__file__).parent / "configs"
    kinds = {}
    for path in sorted(folder.glob("*.yaml")):
        kind = yaml.safe_load(path.read_text()).get("kind")
        if kind in ("sweep", "study"):
            kinds[path.name] = load_experiment(path, kind).spec.kind
    assert {"demo-sweep.yaml", "transfer-smoke.yaml", "freeze-smoke.yaml", "sweep-smoke.yaml",
            "study-smoke.yaml"} <= set(kinds)


def test_the_demo_declares_its_data_and_comparisons_that_can_reach_significance():
    """The main job's sweep file declares every dataset its runs read, the reference study's experiments (curation
    subsets, a pool of another simulation fidelity, three amounts of target data with trends over them), and
    comparisons that can each reach alpha after Holm's adjustment over all of them (checked when it is loaded)."""
    from experiments.datasets import datasets_read, recipe_of
    from experiments.demo import SWEEP
    from experiments.specs import cells_of, phases_for, unit_config

    exp = load_experiment(SWEEP, "sweep")
    spec = exp.spec
    assert len(spec.comparisons) >= 4 and len(spec.seed_list) >= 6 and len(spec.variants) >= 3
    configs = [unit_config(exp, c.subset, c.levels, p) for c in cells_of(exp) if c.seed == 0
               for p in phases_for(exp, c)]
    assert datasets_read(exp, configs) == list(spec.datasets)  # every declared dataset is read, no path elsewhere
    assert all(ref.path.startswith("demo/data/") for c in configs for ref in (*c.data.train, *c.benchmarks))
    tests = {c.name: c.test for c in spec.comparisons}
    assert tests["transfer-amount"] == tests["transfer-decay"] == "jonckheere"
    # fidelity: the bare pool is the main pool's recipe without the substrate
    pool, bare = recipe_of(exp, "pool").resolved(), recipe_of(exp, "pool-bare").resolved()
    assert bare["structure"]["substrate"]["thickness_A"] == 0 != pool["structure"]["substrate"]["thickness_A"]
    assert {k: v for k, v in bare["imaging"].items()} == pool["imaging"]
    # the fine-tune data and the held-out target are different datasets of one distribution
    ft = unit_config(exp, "all", (), "ft:n8")
    target = next(b for b in ft.benchmarks if b.name == spec.target)
    assert ft.data.train[0].path != target.path
    declared = spec.datasets
    assert declared["target-train"].overrides() == declared["target-test"].overrides()
    assert declared["target-train"].recipe == declared["target-test"].recipe
