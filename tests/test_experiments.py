"""Sweeps and studies: definitions, the resume logic of the cell queue, and real runs (killed and resumed)."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from datagen.pipeline import generate
from datagen.recipe import load_recipe
from experiments.specs import load_experiment
from experiments.sweep import FAIL, cells_of, reconcile
from mlplatform.config import ConfigError

TINY = ["imaging.crop_px=64", "structure.particle.radius_A={dist: uniform, low: 5, high: 6.5}",
        "simulation.n_phonons=1", "output.structures_per_shard=2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    for name, n, seed, extra in (("train", 12, 1, []), ("bench", 4, 2, []),
                                 ("target", 8, 3, ["imaging.dose_e_per_A2=150"])):
        generate(load_recipe("tiny", TINY + extra), n=n, seed=seed, out=root / name, workers=1, progress=False)
    base = {
        "seed": 0, "epochs": 1,
        "data": {"train": [{"path": str(root / "train")}], "val_fraction": 0.34, "crop_px": 32, "batch_size": 4,
                 "steps_per_epoch": 3},
        "benchmarks": [{"name": "bench", "path": str(root / "bench")}],
        "tracking": {"experiment": "exp-test", "n_prediction_images": 0, "system_metrics": False},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root


def _write(root, name, spec):
    path = root / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _sweep_spec(name, seeds=(0, 1, 2), **extra):
    return {"kind": "sweep", "name": name, "base": "base.yaml",
            "subsets": [{"name": "all", "set": {}},
                        {"name": "near-focus", "set": {"data.train.0.filter": "abs(imaging.defocus_A) <= 300"}}],
            "seeds": list(seeds), "finetune": {"set": {"data.train": [{"path": "PLACEHOLDER"}]}}, **extra}


def test_definitions_are_validated_before_any_work(workspace):
    spec = _sweep_spec("v")
    spec["finetune"]["set"]["data.train"] = [{"path": str(workspace / "target")}]
    exp = load_experiment(_write(workspace, "ok.yaml", spec), "sweep")
    assert [c.key for c in cells_of(exp)] == ["all/s0", "all/s1", "all/s2", "near-focus/s0", "near-focus/s1",
                                             "near-focus/s2"]
    assert exp.config(exp.spec.subsets[1].set).data.train[0].filter == "abs(imaging.defocus_A) <= 300"
    bad = dict(spec, subsets=[{"name": "x", "set": {"data.batch_size": 0}}])
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_experiment(_write(workspace, "bad.yaml", bad), "sweep")
    with pytest.raises(ConfigError, match="kind: study"):
        load_experiment(_write(workspace, "ok2.yaml", spec), "study")
    with pytest.raises(ConfigError, match="subsets"):
        load_experiment(_write(workspace, "dup.yaml", dict(spec, subsets=[{"name": "a"}, {"name": "a"}])), "sweep")
    with pytest.raises(ConfigError, match="indexes a list"):
        load_experiment(_write(workspace, "idx.yaml", dict(spec, set={"data.train.5.filter": "x"})), "sweep")


def test_reconcile_queues_each_cell_once_and_retries_only_real_failures(workspace, tmp_path):
    spec = _sweep_spec("r", seeds=(0,), max_retries=1)
    spec["finetune"] = None
    exp = load_experiment(_write(workspace, "r.yaml", spec), "sweep")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'q.db'}", study_name="q")
    assert reconcile(study, exp) == 2 and reconcile(study, exp) == 0  # queued once, not twice

    def take(outcome):
        trial = study.ask()
        cell = trial.suggest_int("cell", 0, 1)
        trial.suggest_int("attempt", 0, 10_000)
        if outcome == "error":
            trial.set_user_attr("error", "boom")
        study.tell(trial, 1.0 if outcome == "ok" else None,
                   state=optuna.trial.TrialState.COMPLETE if outcome == "ok" else FAIL)
        return cell

    done = take("ok")
    failed = take("error")
    assert {done, failed} == {0, 1}
    assert reconcile(study, exp) == 1  # the failed cell comes back (1 retry allowed)
    take("error")
    assert reconcile(study, exp) == 0  # retries used up
    # a worker that died without recording an error (killed) does not use up a retry
    spec2 = dict(spec, name="r2")
    exp2 = load_experiment(_write(workspace, "r2.yaml", spec2), "sweep")
    study2 = optuna.create_study(storage=f"sqlite:///{tmp_path / 'q.db'}", study_name="q2")
    reconcile(study2, exp2)
    for _ in range(2):
        trial = study2.ask()
        trial.suggest_int("cell", 0, 1)
        trial.suggest_int("attempt", 0, 10_000)
        study2.tell(trial, state=FAIL)
    assert reconcile(study2, exp2) == 2


def _runs(store, experiment="exp-test", filter_string=""):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string) if exp else []


@pytest.mark.slow
def test_sweep_killed_midway_resumes_without_losing_or_duplicating(workspace, tmp_path):
    spec = _sweep_spec("kill")
    spec["finetune"]["set"]["data.train"] = [{"path": str(workspace / "target")}]
    path = _write(workspace, "kill.yaml", spec)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    queue = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SWEEP_HEARTBEAT_GRACE_S": "60"}
    cmd = [sys.executable, "-m", "experiments", "sweep", "--config", str(path), "--workers", "2", "--quiet",
           "--tracking-uri", store, "--storage", queue]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_runs(store, filter_string="attributes.status = 'FINISHED' and "
                                                                       "tags.kind = 'cell'")) < 3:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and both workers, as a crash would
    proc.wait()
    finished_before = len(_runs(store, filter_string="attributes.status = 'FINISHED' and tags.kind = 'cell'"))
    assert 3 <= finished_before < 12, "the kill must land midway"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    cells = _runs(store, filter_string="tags.kind = 'cell'")
    finished = Counter((r.data.tags["sweep.cell"], r.data.tags["phase"]) for r in cells
                       if r.info.status == "FINISHED")
    assert len(finished) == 12 and set(finished.values()) == {1}, finished  # every cell x phase exactly once
    assert not [r for r in cells if r.info.status == "RUNNING"]
    parent = _runs(store, filter_string="tags.kind = 'sweep'")
    assert len(parent) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {parent[0].info.run_id}
    for r in cells:
        if r.data.tags["phase"] == "finetune" and r.info.status == "FINISHED":
            pre = MlflowClient(store).get_run(r.data.tags["parent_run"])
            assert pre.data.tags["sweep.cell"] == r.data.tags["sweep.cell"] and pre.data.tags["phase"] == "pretrain"
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)  # idempotent: nothing to do
    assert again.returncode == 0 and len(_runs(store, filter_string="tags.kind = 'cell'")) == len(cells)


@pytest.mark.slow
def test_study_with_pruning_and_a_failing_trial_runs_on_two_workers(workspace, tmp_path):
    spec = {"kind": "study", "name": "s", "base": "base.yaml", "set": {"epochs": 3},
            "search_space": {
                "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                # a radius bound below every particle selects nothing: that trial fails, the study goes on
                "data.train.0.filter": {"type": "template", "template": "structure.radius_A <= {rmax}",
                                        "params": {"rmax": {"type": "categorical", "choices": [1.0, 7.0]}}}},
            "n_trials": 6, "pruner": {"kind": "median", "n_startup_trials": 1, "n_warmup_steps": 0}}
    path = _write(workspace, "study.yaml", spec)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    journal = f"journal:{tmp_path / 'journal.log'}"
    res = subprocess.run([sys.executable, "-m", "experiments", "study", "--config", str(path), "--workers", "2",
                          "--quiet", "--tracking-uri", store, "--storage", journal],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path /
                                                                                            "journal.log")))
    study = optuna.load_study(study_name="study:s", storage=storage)
    states = Counter(t.state.name for t in study.trials if t.state.name != "RUNNING")
    assert sum(states.values()) >= 6 and states["COMPLETE"] >= 1
    trials = _runs(store, filter_string="tags.kind = 'trial'")
    parent = _runs(store, filter_string="tags.kind = 'study'")
    assert len(parent) == 1 and all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in trials)
    completed = [r for r in trials if "objective" in r.data.metrics]
    assert completed and all("trial.optim.lr" in r.data.params for r in completed)
    assert not [r for r in trials if r.info.status == "RUNNING"]
    for t in study.trials:
        if t.state.name == "COMPLETE":
            run = next(r for r in trials if r.data.tags["trial"] == str(t.number))
            assert run.data.metrics["objective"] == pytest.approx(t.value)


def test_ui_serves_the_same_store(tmp_path):
    import json
    import socket
    import urllib.request

    from mlplatform.tracking import get_or_create_experiment

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    get_or_create_experiment("seen-by-ui", store)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "experiments", "ui", "--port", str(port), "--tracking-uri", store],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        names, deadline = [], time.time() + 90
        while time.time() < deadline and "seen-by-ui" not in names:
            time.sleep(1)
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                             data=b'{"max_results": 10}', headers={"Content-Type": "application/json"})
                names = [e["name"] for e in json.load(urllib.request.urlopen(req, timeout=5))["experiments"]]
            except OSError:
                pass
        assert "seen-by-ui" in names
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
