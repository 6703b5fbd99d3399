"""Reports read from a real MLflow SQLite store (runs made with MlflowClient, tagged as the sweep and study launchers
tag them) and a real Optuna storage."""

import base64
import time
from html.parser import HTMLParser

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from scipy import stats

from mlplatform import analysis
from mlplatform.report import collect_study, collect_sweep, default_ui_url, param_importances, write_report
from mlplatform.tracking import get_or_create_experiment

SUBSETS, SEEDS, BENCHMARKS = ("narrow", "wide"), (0, 1, 2), ("cdse", "au-big")
PRE_EPOCHS, FT_EPOCHS = 4, 3


def dice(subset, seed, phase, benchmark, epoch):
    """A made-up but distinct curve per cell: wide beats narrow, fine-tuning adds, cdse peaks before its end."""
    base = {"narrow": 0.40, "wide": 0.55}[subset] + 0.013 * seed + (0.05 if benchmark == "au-big" else 0.0)
    if phase == "pretrain":
        value = base + 0.04 * epoch - (0.07 if benchmark == "cdse" and epoch == PRE_EPOCHS - 1 else 0.0)
    else:
        value = base + 0.12 + 0.02 * epoch - 0.004 * seed * epoch
    return round(value, 6)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One store for the module (a new MLflow database takes seconds to set up); tests use distinct names in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def sweep(uri):
    """(uri, parent run id, cell run ids by (subset, seed, phase)), made once: building it is the slow part."""
    return (uri, *make_sweep(uri))


def log_run(client, exp, tags, metrics=None, params=None, status="FINISHED", start_time=None):
    run = client.create_run(exp, tags=tags, start_time=start_time)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, s) for k, s, v in (metrics or [])],
                     params=[Param(k, str(v)) for k, v in (params or {}).items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def make_sweep(uri, name="curation-1", experiment="sweeps", duplicate=False):
    """A sweep parent and 2 subsets x 3 seeds x (pretrain, finetune) cells, plus one FAILED cell to be ignored and,
    with ``duplicate``, a later second FINISHED run of a cell (which the report must refuse)."""
    client = MlflowClient(uri)
    exp = get_or_create_experiment(experiment, uri)
    parent = client.create_run(exp, tags={"sweep": name, "kind": "sweep"}, run_name=name).info.run_id
    ids = {}
    for subset in SUBSETS:
        for seed in SEEDS:
            for phase, n in (("pretrain", PRE_EPOCHS), ("finetune", FT_EPOCHS)):
                tags = {"sweep": name, "kind": "cell", "sweep.subset": subset, "seed": str(seed), "phase": phase,
                        "mlflow.parentRunId": parent}
                if phase == "finetune":
                    tags["parent_run"] = ids[(subset, seed, "pretrain")]
                metrics = [(f"ood/{b}/{k}", e, dice(subset, seed, phase, b, e) - (0.01 if k != "dice" else 0))
                           for b in BENCHMARKS for e in range(n) for k in ("dice", "iou", "dice_mean_image")]
                metrics += [("ood/mean/dice", e, np.mean([dice(subset, seed, phase, b, e) for b in BENCHMARKS]))
                            for e in range(n)]
                metrics += [("train/loss", e, 1.0 / (e + 1)) for e in range(n)]
                # the narrow pretrains have no `epochs` param: their length comes from the logged steps
                params = {} if (subset, phase) == ("narrow", "pretrain") else {"epochs": n}
                ids[(subset, seed, phase)] = log_run(client, exp, tags, metrics, params)
    log_run(client, exp, {"sweep": name, "kind": "cell", "sweep.subset": "wide", "seed": "9", "phase": "pretrain",
                          "mlflow.parentRunId": parent}, [("ood/cdse/dice", 0, 0.99)], status="FAILED")
    if duplicate:
        ids["duplicate"] = log_run(client, exp, {"sweep": name, "kind": "cell", "sweep.subset": "wide", "seed": "0",
                                                 "phase": "finetune", "mlflow.parentRunId": parent},
                                   [("ood/cdse/dice", 0, 0.99)], start_time=int(time.time() * 1000) + 60_000)
    client.set_terminated(parent, "FINISHED")
    return parent, ids


def test_collect_sweep_values_and_time_axis(sweep, tmp_path, monkeypatch):
    uri, parent, ids = sweep
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"  # the process-wide URI is neither used nor changed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    before = mlflow.get_tracking_uri()  # the env's, unless an earlier test set one process-wide
    runs, history = collect_sweep(uri, "curation-1")
    assert mlflow.get_tracking_uri() == before and not (tmp_path / "elsewhere.db").exists()
    assert runs.attrs["parent_run_id"] == parent and runs.attrs["cell_statuses"] == {"FINISHED": 12, "FAILED": 1}
    assert len(runs) == 12 and set(runs["run_id"]) == set(ids.values()) and (runs["status"] == "FINISHED").all()
    assert list(runs.columns[:10]) == ["run_id", "subset", "seed", "phase", "status", "parent_run", "epochs",
                                      "final/au-big", "best/au-big", "best_epoch/au-big"]
    assert list(runs[["subset", "phase", "seed"]].itertuples(index=False))[:4] == [
        ("narrow", "pretrain", 0), ("narrow", "pretrain", 1), ("narrow", "pretrain", 2), ("narrow", "finetune", 0)]
    for (subset, seed, phase), run_id in ids.items():
        row = runs.set_index("run_id").loc[run_id]
        n = PRE_EPOCHS if phase == "pretrain" else FT_EPOCHS
        assert row["epochs"] == n and row["seed"] == seed
        for b in BENCHMARKS:
            curve = [dice(subset, seed, phase, b, e) for e in range(n)]
            assert row[f"final/{b}"] == curve[-1] and row[f"best/{b}"] == max(curve)
            assert row[f"best_epoch/{b}"] == int(np.argmax(curve))
        assert row["final/mean"] == pytest.approx(np.mean([dice(subset, seed, phase, b, n - 1) for b in BENCHMARKS]))
        if phase == "finetune":
            assert row["parent_run"] == ids[(subset, seed, "pretrain")]
        else:
            assert pd.isna(row["parent_run"])
    # cdse dips at the last pretrain epoch: best is not final there
    narrow0 = runs.set_index("run_id").loc[ids[("narrow", 0, "pretrain")]]
    assert narrow0["best/cdse"] > narrow0["final/cdse"] and narrow0["best_epoch/cdse"] == PRE_EPOCHS - 2

    assert list(history.columns) == ["run_id", "subset", "seed", "phase", "benchmark", "epoch", "dice", "t"]
    assert len(history) == 6 * (PRE_EPOCHS + FT_EPOCHS) * (len(BENCHMARKS) + 1)  # + ood/mean/dice
    for (subset, seed, phase), run_id in ids.items():
        h = history[(history["run_id"] == run_id) & (history["benchmark"] == "cdse")]
        expected_t = list(range(PRE_EPOCHS)) if phase == "pretrain" else list(range(PRE_EPOCHS, PRE_EPOCHS + FT_EPOCHS))
        assert h["epoch"].tolist() == list(range(len(expected_t))) and h["t"].tolist() == expected_t
        assert h["dice"].tolist() == [dice(subset, seed, phase, "cdse", e) for e in h["epoch"]]


def test_fine_tune_of_a_pretrain_outside_the_sweep(uri):
    """t still continues the parent's epochs when the parent is no cell of the sweep; an unknown parent gives NaN."""
    client = MlflowClient(uri)
    exp = get_or_create_experiment("sweeps", uri)
    outside = log_run(client, exp, {"phase": "pretrain"}, [("train/loss", e, 1.0) for e in range(5)], {"epochs": 5})
    parent = client.create_run(exp, tags={"sweep": "reuse", "kind": "sweep"}).info.run_id
    cell = {"sweep": "reuse", "kind": "cell", "sweep.subset": "x", "seed": "0", "phase": "finetune",
            "mlflow.parentRunId": parent}
    ft = log_run(client, exp, {**cell, "parent_run": outside}, [("ood/b/dice", e, 0.5 + e / 10) for e in range(2)])
    orphan = log_run(client, exp, {**cell, "seed": "1"}, [("ood/b/dice", 0, 0.4)])
    with pytest.warns(UserWarning, match=f"without a readable parent pretrain.*{orphan}"):
        runs, history = collect_sweep(uri, "reuse")
    assert history.loc[history["run_id"] == ft, "t"].tolist() == [5.0, 6.0]
    assert history.loc[history["run_id"] == orphan, "t"].isna().all()
    assert runs.set_index("run_id").loc[ft, "final/b"] == 0.6


def test_fine_tune_decay_is_the_drop_from_the_peak_since_the_pretrained_model_to_the_final_epoch():
    from mlplatform.report_data import _fine_tune_decay, decay_table

    runs = pd.DataFrame([
        dict(run_id="p", subset="a", phase="pretrain", parent_run=None, seed=0,
             **{"final/b": 0.80, "best/b": 0.82, "best_epoch/b": 3}),
        # forgets at once: its peak is the pretrained model it started from (epoch 0)
        dict(run_id="f1", subset="a", phase="finetune", parent_run="p", seed=0,
             **{"final/b": 0.60, "best/b": 0.75, "best_epoch/b": 0}),
        # rises for two epochs, then decays
        dict(run_id="f2", subset="a", phase="finetune:n8", parent_run="p", seed=0,
             **{"final/b": 0.85, "best/b": 0.90, "best_epoch/b": 1}),
    ])
    assert _fine_tune_decay(runs, ["b"]) == ["ft_peak/b", "ft_peak_epoch/b", "ft_drop/b"]
    got = runs.set_index("run_id")[["ft_peak/b", "ft_peak_epoch/b", "ft_drop/b"]]
    assert got.loc["f1"].tolist() == pytest.approx([0.80, 0, 0.20])
    assert got.loc["f2"].tolist() == pytest.approx([0.90, 2, 0.05])
    assert got.loc["p"].isna().all()  # a pretrain is not a fine-tune
    table = decay_table(runs)
    assert table[["phase", "n", "drop"]].values.tolist() == [["finetune", 1, pytest.approx(0.2)],
                                                               ["finetune:n8", 1, pytest.approx(0.05)]]


def test_write_sweep_report_files_numbers_and_artifacts(sweep, tmp_path):
    uri, parent, ids = sweep
    out = tmp_path / "reports" / "sweep"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")  # someone else's file: kept, not logged
    index = write_report("sweep", "curation-1", uri, out)
    assert index == out / "index.html" and index.is_file()
    names = {p.name for p in out.iterdir()}
    expected = {"index.html", "runs.csv", "history.csv"} | {
        f"{kind}_{b}.{ext}" for b in (*BENCHMARKS, "mean")
        for kind, ext in (("distribution", "png"), ("dynamics", "png"), ("summary", "csv"), ("pairwise", "csv"))}
    expected |= {"overview.png", "dynamics_overview.png"}  # Fig. 1 and Fig. 2 of the reference study, for any sweep
    expected |= {"decay.csv"}  # what fine-tuning did to every benchmark, as numbers
    assert names == expected | {"notes.txt"}
    assert not list(out.parent.glob(".sweep.tmp-*"))  # the build folder is gone
    page = index.read_text()
    for name in expected - {"index.html"}:
        assert f"'{name}'" in page
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = pd.read_csv(out / "summary_cdse.csv")
    assert len(summary) == 2 * 2 * 2  # measure x subset x phase
    for row in summary.itertuples():  # the numbers the runs logged, summarised here, equal the CSV's
        n = PRE_EPOCHS if row.phase == "pretrain" else FT_EPOCHS
        curves = [[dice(row.subset, s, row.phase, "cdse", e) for e in range(n)] for s in SEEDS]
        values = [c[-1] if row.measure == "final" else max(c) for c in curves]
        for key, value in analysis.summarize(values).items():
            assert getattr(row, key) == pytest.approx(value, rel=1e-12), key

    tests = pd.read_csv(out / "pairwise_cdse.csv")
    assert len(tests) == 2 * 2  # phase x measure, one pair each
    runs = pd.read_csv(out / "runs.csv")
    for row in tests.itertuples():
        a = runs.loc[(runs["subset"] == row.a) & (runs["phase"] == row.phase), f"{row.measure}/cdse"]
        b = runs.loc[(runs["subset"] == row.b) & (runs["phase"] == row.phase), f"{row.measure}/cdse"]
        ref = stats.mannwhitneyu(a, b, alternative="two-sided")
        assert (row.a, row.b) == ("narrow", "wide") and row.statistic == ref.statistic
        assert row.p_value == pytest.approx(ref.pvalue) and row.p_adjusted == pytest.approx(ref.pvalue)
        assert row.cliffs_delta == -1.0 and not row.significant  # fully separated, but 3 vs 3 seeds: p >= 0.1
    assert "smallest two-sided p" in page

    client = MlflowClient(uri)
    logged = {f.path for f in client.list_artifacts(parent, "report")}
    assert logged == {f"report/{n}" for n in expected}
    # again, with a permutation test: files replaced in place, still one set of artifacts
    write_report("sweep", "curation-1", uri, out, method="permutation", correction="bonferroni")
    assert "cohens_d" in pd.read_csv(out / "pairwise_cdse.csv").columns and (out / "notes.txt").read_text() == "mine"
    assert {f.path for f in client.list_artifacts(parent, "report")} == logged


class Page(HTMLParser):
    """The <img> tags of a page, and its links: (attributes, text)."""

    def __init__(self, text):
        super().__init__()
        self.imgs, self.links, self._link = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "a":
            self._link = (dict(attrs), [])

    def handle_data(self, data):
        if self._link:
            self._link[1].append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._link:
            self.links.append((self._link[0], "".join(self._link[1])))
            self._link = None


PNG_URI = "data:image/png;base64,"


def assert_self_contained(index):
    """Every figure embedded (no <img> loads a file: MLflow's sandboxed preview resolves no relative path), every
    PNG written embedded byte for byte, and the page not much larger than its figures."""
    text = index.read_text()
    page = Page(text)
    assert page.imgs and all(img["src"].startswith(PNG_URI) for img in page.imgs)
    assert text.count("src=") == len(page.imgs)  # no other element loads anything
    embedded = sorted(base64.b64decode(img["src"][len(PNG_URI):], validate=True) for img in page.imgs)
    pngs = sorted(p.read_bytes() for p in index.parent.glob("*.png"))
    assert embedded == pngs
    assert len(text.encode()) < 1.4 * sum(map(len, pngs)) + 100_000
    return page


def run_hrefs(page):
    """link text -> the hrefs of the links to MLflow run pages with that text, each opened in a new tab."""
    hrefs = {}
    for attrs, text in page.links:
        if "/runs/" in attrs["href"]:
            assert attrs.get("target") == "_blank" and attrs.get("rel") == "noopener"
            hrefs.setdefault(text, set()).add(attrs["href"])
    return hrefs


def test_sweep_report_is_self_contained_and_links_each_run(sweep, tmp_path):
    uri, parent, ids = sweep
    client = MlflowClient(uri)
    experiment = {rid: client.get_run(rid).info.experiment_id for rid in [parent, *ids.values()]}
    given = "https://mlflow.example.org/team"
    for out, ui_url, base in ((tmp_path / "default", None, "http://127.0.0.1:5000"),  # sqlite store: the local UI
                              (tmp_path / "given", given + "/", given)):
        index = write_report("sweep", "curation-1", uri, out, ui_url=ui_url)
        page = assert_self_contained(index)
        # distribution and dynamics per benchmark and the mean, then the overview and its dynamics
        assert len(page.imgs) == 2 * (len(BENCHMARKS) + 1) + 2
        hrefs = run_hrefs(page)
        assert set(hrefs) == {parent, *ids.values()}  # every run of the table (and the parent), nothing else
        for rid, found in hrefs.items():
            assert found == {f"{base}/#/experiments/{experiment[rid]}/runs/{rid}"}
        assert f"{base}/#/experiments/{experiment[parent]}" in {a["href"] for a, _ in page.links}
        runs = pd.read_csv(out / "runs.csv", dtype={"experiment_id": str})
        assert runs.columns[-1] == "experiment_id"  # new columns go last: existing readers keep their columns
        assert dict(zip(runs["run_id"], runs["experiment_id"])) == {rid: experiment[rid] for rid in ids.values()}
        page_text = index.read_text()
        for name in (p.name for p in out.glob("*.png")):  # the files are still linked, for a copy opened from disk
            assert f"<a href='{name}'>" in page_text


def test_ui_url_default_and_checks(sweep, tmp_path):
    assert default_ui_url("sqlite:///mlruns/mlflow.db") == "http://127.0.0.1:5000"
    assert default_ui_url("file:///tmp/mlruns") == "http://127.0.0.1:5000"
    assert default_ui_url("http://tracking:5000") == "http://tracking:5000"
    assert default_ui_url("HTTPS://mlflow.example.org/prefix/") == "https://mlflow.example.org/prefix"
    assert default_ui_url("http://user:secret@tracking:5000/?x=1") == "http://tracking:5000"  # no credentials in pages
    with pytest.raises(ValueError, match="ui_url 'localhost:5000'.*http"):
        write_report("sweep", "curation-1", sweep[0], tmp_path / "r", ui_url="localhost:5000")
    assert not (tmp_path / "r").exists()


def test_report_command_ui_url(sweep, tmp_path, capsys):
    from experiments.cli import main

    uri, parent, ids = sweep
    out = tmp_path / "cli"
    assert main(["report", "--sweep", "curation-1", "--tracking-uri", uri, "--out", str(out),
                 "--ui-url", "http://mlflow.internal:8080"]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    experiment = MlflowClient(uri).get_run(parent).info.experiment_id
    rid = ids[("wide", 2, "finetune")]
    assert run_hrefs(Page((out / "index.html").read_text()))[rid] == {
        f"http://mlflow.internal:8080/#/experiments/{experiment}/runs/{rid}"}
    assert main(["report", "--sweep", "curation-1", "--tracking-uri", uri, "--out", str(tmp_path / "bad"),
                 "--ui-url", "ftp://x"]) == 2
    assert "ui_url 'ftp://x'" in capsys.readouterr().err


def test_a_sweep_with_a_cell_recorded_twice_is_refused_with_the_run_ids(uri, tmp_path):
    parent, ids = make_sweep(uri, name="twice", duplicate=True)
    first = ids[("wide", 0, "finetune")]
    with pytest.raises(ValueError, match=f"more than one FINISHED run.*wide/s0:finetune: {first}, {ids['duplicate']}"):
        write_report("sweep", "twice", uri, tmp_path / "r")
    assert not (tmp_path / "r").exists()  # nothing half-written
    assert not MlflowClient(uri).list_artifacts(parent, "report")


def test_sweep_errors_say_what_was_found(sweep, tmp_path):
    uri = sweep[0]
    with pytest.raises(ValueError, match=r"no sweep named 'other'.*sweeps found there: .*curation-1"):
        write_report("sweep", "other", uri, tmp_path / "r")
    client = MlflowClient(uri)
    exp = get_or_create_experiment("sweeps", uri)
    parent = client.create_run(exp, tags={"sweep": "broken", "kind": "sweep"}).info.run_id
    log_run(client, exp, {"sweep": "broken", "kind": "cell", "mlflow.parentRunId": parent}, status="FAILED")
    with pytest.raises(ValueError, match=r"'broken' \(parent run \w+\) has no FINISHED cell runs: found 1 FAILED"):
        collect_sweep(uri, "broken")
    client.create_run(exp, tags={"sweep": "empty", "kind": "sweep"})
    with pytest.raises(ValueError, match="found no cell runs at all"):
        collect_sweep(uri, "empty")
    with pytest.raises(ValueError, match="kind"):
        write_report("grid", "curation-1", uri, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def make_study(uri, tmp_path, name="lr-study", n_trials=6, storage=None):
    """An Optuna study in its own SQLite storage, each trial mirrored by an MLflow child run as the launcher logs it;
    trial 2 is pruned (its run KILLED, no objective)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage or f"sqlite:///{tmp_path}/optuna-{name}.db"
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    client = MlflowClient(uri)
    exp = get_or_create_experiment("studies", uri)
    parent = client.create_run(exp, tags={"study": name, "kind": "study", "optuna.storage": storage,
                                          "optuna.study_name": name}).info.run_id

    def objective(trial):
        lr = trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
        depth = trial.suggest_int("model.depth", 2, 5)
        opt = trial.suggest_categorical("optim.name", ["adam", "sgd"])
        value = 0.8 - 0.05 * abs(np.log10(lr) + 2.5) + 0.01 * depth - (0.05 if opt == "sgd" else 0.0)
        tags = {"study": name, "kind": "trial", "trial": str(trial.number), "mlflow.parentRunId": parent}
        params = {f"trial.{k}": v for k, v in trial.params.items()}
        if trial.number == 2:
            log_run(client, exp, tags, params=params, status="KILLED")
            raise optuna.TrialPruned()
        log_run(client, exp, tags, [("objective", 0, value)], params)
        return value

    study.optimize(objective, n_trials=n_trials)
    client.set_terminated(parent, "FINISHED")
    return parent, study


def test_collect_study_and_report(uri, tmp_path):
    parent, study = make_study(uri, tmp_path)
    trials, loaded = collect_study(uri, "lr-study")
    assert loaded is not None and len(loaded.trials) == 6
    assert trials.attrs["parent_run_id"] == parent and trials.attrs["direction"] == "maximize"
    assert list(trials.columns[:5]) == ["run_id", "trial", "status", "state", "objective"]
    assert trials["trial"].tolist() == list(range(6))
    assert trials.loc[2, "status"] == "KILLED" and trials.loc[2, "state"] == "PRUNED"
    assert np.isnan(trials.loc[2, "objective"])
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert trials.loc[t.number, "objective"] == pytest.approx(t.value)
            assert trials.loc[t.number, "trial.optim.lr"] == pytest.approx(t.params["optim.lr"])  # parsed: a number
            assert trials.loc[t.number, "trial.optim.name"] == t.params["optim.name"]
            assert trials.loc[t.number, "state"] == "COMPLETE"

    out = tmp_path / "study-report"
    index = write_report("study", "lr-study", uri, out)
    assert {p.name for p in out.iterdir()} == {"index.html", "trials.csv", "optimization_history.png",
                                               "param_importances.png", "param_importances.csv"}
    page = index.read_text()
    best = max((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    assert f"Best: trial {best.number}" in page and "Not computed" not in page
    importances = pd.read_csv(out / "param_importances.csv")
    assert set(importances["param"]) == {"optim.lr", "model.depth", "optim.name"}
    assert importances["importance"].sum() == pytest.approx(1.0)
    logged = {f.path for f in MlflowClient(uri).list_artifacts(parent, "report")}
    assert "report/index.html" in logged and "report/optimization_history.png" in logged

    page = assert_self_contained(index)
    assert len(page.imgs) == 2  # history and importances
    client = MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    trial_runs = pd.read_csv(out / "trials.csv", dtype={"experiment_id": str})
    assert trial_runs.columns[-1] == "experiment_id" and (trial_runs["experiment_id"] == experiment).all()
    assert all(client.get_run(rid).info.experiment_id == experiment for rid in trial_runs["run_id"])
    best_run = trial_runs.loc[trial_runs["trial"] == best.number, "run_id"].item()
    given = write_report("study", "lr-study", uri, tmp_path / "given", ui_url="http://mlflow.lab:5000")
    for page, base in ((page, "http://127.0.0.1:5000"), (Page(given.read_text()), "http://mlflow.lab:5000")):
        hrefs = run_hrefs(page)
        assert set(hrefs) == {parent, *trial_runs["run_id"]}  # every trial, pruned one included, and the parent
        for rid, found in hrefs.items():
            assert found == {f"{base}/#/experiments/{experiment}/runs/{rid}"}
    best_line = next(line for line in index.read_text().splitlines() if line.startswith("<p>Best:"))
    assert f"/#/experiments/{experiment}/runs/{best_run}'" in best_line


def test_study_with_too_few_trials_or_no_storage_still_reports(uri, tmp_path):
    make_study(uri, tmp_path, name="tiny", n_trials=1)
    page = write_report("study", "tiny", uri, tmp_path / "tiny").read_text()
    assert "Not computed: 1 completed trial; at least 2 are needed" in page
    assert not (tmp_path / "tiny" / "param_importances.png").exists()
    assert param_importances(None) == ({}, "no Optuna study loaded")

    gone = tmp_path / "moved" / "optuna.db"
    gone.parent.mkdir()
    make_study(uri, tmp_path, name="lost", n_trials=3, storage=f"sqlite:///{gone}")
    gone.unlink()  # the storage is not reachable from where the report is made
    trials, study = collect_study(uri, "lost")
    assert study is None and trials["state"].isna().all() and trials.attrs["direction"] is None
    assert "could not be loaded" in trials.attrs["notes"][0]
    page = write_report("study", "lost", uri, tmp_path / "lost").read_text()
    assert "could not be loaded" in page and "Not computed: no Optuna study loaded" in page


def test_study_errors(uri, tmp_path):
    with pytest.raises(ValueError, match="no study named 'x' in sqlite:///.*: no run is tagged study=x, "
                                         "kind=study; studies found there"):
        collect_study(uri, "x")
    client = MlflowClient(uri)
    exp = get_or_create_experiment("studies", uri)
    parent = client.create_run(exp, tags={"study": "bad", "kind": "study"}).info.run_id
    log_run(client, exp, {"study": "bad", "kind": "trial", "trial": "0", "mlflow.parentRunId": parent},
            status="FAILED")
    with pytest.raises(ValueError, match="has no FINISHED trial runs: found 1 FAILED"):
        collect_study(uri, "bad")
    log_run(client, exp, {"study": "bad", "kind": "trial", "trial": "1", "mlflow.parentRunId": parent})
    with pytest.raises(ValueError, match="none logged the metric 'objective'"):
        collect_study(uri, "bad")
    with pytest.raises(ValueError, match="quotes"):
        collect_study(uri, "it's")
