"""A study declared whole in its file: the datasets it generates, the axes it crosses, its fine-tune variants, on one
exactly-once queue; sweeps and studies started together, killed and restarted, record each unit once."""

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from experiments import claims
from experiments.datasets import PHASE, _queue
from experiments.specs import cells_of, load_experiment, phases_for, unit_phase
from sweep_helpers import sweep_spec, tracked_runs, wait_while_running, write_spec

ROOT = Path(__file__).resolve().parents[1]
TRANSFER = ROOT / "experiments" / "configs" / "transfer-smoke.yaml"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _unit(run) -> tuple[str, str]:
    tags = run.data.tags
    variant = tags.get("sweep.variant")
    return tags["sweep.cell"], unit_phase(variant) if tags["phase"] == "finetune" and variant else tags["phase"]


def _assert_recorded_as_declared(store, exp) -> list:
    """Every unit the definition declares (cells x phases) has exactly one FINISHED run and nothing else has one; each
    fine-tune descends from its own cell's recorded pretrain."""
    runs = tracked_runs(store, exp.config(exp.spec.subsets[0].set).tracking.experiment,
                        f"tags.kind = 'cell' and tags.sweep = '{exp.name}'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    counts = Counter(_unit(r) for r in finished)
    declared = {(c.key, p) for c in cells_of(exp) for p in phases_for(exp, c)}
    assert set(counts) == declared and set(counts.values()) == {1}, (declared ^ set(counts), counts.most_common(3))
    assert not [r for r in runs if r.info.status == "RUNNING"]
    pretrain = {r.data.tags["sweep.cell"]: r.info.run_id for r in finished if r.data.tags["phase"] == "pretrain"}
    for r in finished:
        if r.data.tags["phase"] == "finetune":
            assert r.data.tags["pretrain_run"] == pretrain[r.data.tags["sweep.cell"]]
    return finished


@pytest.mark.slow
def test_transfer_smoke_killed_while_generating_records_every_unit_once(tmp_path, cli):
    """experiments/configs/transfer-smoke.yaml, as shipped but one epoch per run: its own four datasets, 2 subsets x
    2 learning rates x 1 seed, 3 fine-tune variants. SIGKILLed while its first dataset is half written (sweeps
    killed while units train: tests/test_exactly_once.py), then run to the end: the dataset has the content hash of
    an uninterrupted generation, every declared unit is recorded once with its cell's lineage, the runs carry their
    levels, and the report judges the trends."""
    store, queue = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'claims.db'}"
    # one epoch per run: the file as shipped otherwise (its own timing is in the README)
    cmd = [sys.executable, "-m", "experiments", "sweep", "--config", str(TRANSFER), "--workers", "2", "--quiet",
           "--tracking-uri", store, "--storage", queue, "--set", "epochs=1"]
    pool = tmp_path / "data" / "transfer-smoke" / "pool"

    def start():
        return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                                start_new_session=True)

    def kill(proc):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    proc = start()  # killed with one shard of the pool written and the others being made
    assert wait_while_running(proc, lambda: list(pool.glob("shard-*.tar"))), "the pool's first shard did not appear"
    kill(proc)
    assert not (pool / "manifest.json").exists()
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    # the resumed pool is the pool an uninterrupted run makes
    from datagen.pipeline import generate
    from datagen.recipe import load_recipe

    reference = generate(load_recipe("tiny"), n=24, seed=11, out=tmp_path / "reference", workers=2, dataset="pool",
                         progress=False)
    made = yaml.safe_load((pool / "manifest.json").read_text())
    assert made["content_hash"] == reference["content_hash"]
    row = claims.unit_rows(claims.open_engine(queue), _queue(pool))
    assert [(r["phase"], r["state"], r["run_id"]) for r in row] == [(PHASE, "done", reference["content_hash"])]

    exp = load_experiment(TRANSFER, "sweep", ["epochs=1"])
    finished = _assert_recorded_as_declared(store, exp)
    for r in finished:  # the run's name and tags carry its level on every axis, and its variant
        lr, variant = r.data.tags["sweep.axis.optim.lr"], r.data.tags.get("sweep.variant")
        assert f"optim.lr={lr}" in r.info.run_name and r.data.params["optim.lr"] == lr
        assert (variant or "pretrain") in r.info.run_name
        if variant:
            assert r.data.params["data.train"].count(f'"max_samples": {variant[1:]}') == 1
    report = cli.run(["experiments", "report", "--sweep", "transfer-smoke", "--tracking-uri", store, "--out",
                      str(tmp_path / "report")], tmp_path, timeout_s=300)
    assert report.returncode == 0, report.stderr[-2000:]
    found = pd.read_csv(tmp_path / "report" / "findings.csv")
    assert found["test"].tolist() == ["jonckheere", "spearman"] and (found["n_b"] == 3).all()
    assert (found["n_a"] == 12).all() and found["p_adjusted"].between(0, 1).all()
    runs = pd.read_csv(tmp_path / "report" / "runs.csv")
    ft = runs[runs["phase"].str.startswith("finetune:")]
    assert len(ft) == 12 and ft["ft_drop/target"].ge(0).all() and runs["axis:optim.lr"].notna().all()
    assert (tmp_path / "report" / "transfer.png").is_file() and (tmp_path / "report" / "decay.csv").is_file()


def _together(cmd, cwd, env, n=3):
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(
        f"--- process {i}: exit {p.returncode}\nstdout: {o[0][-3000:]}\nstderr: {o[1][-8000:]}"
        for i, (p, o) in enumerate(zip(procs, outs)) if p.returncode)
    return [o[0] for o in outs]


@pytest.mark.slow
def test_three_sweeps_and_three_studies_started_together_make_one_parent_and_each_unit_once(
        workspace, stores, tmp_path):
    """Three `sweep` commands, then three `study` commands, each leaving the same instant on fresh stores: the sweep's
    own dataset is generated by one of them (the others wait and use it), one parent run per sweep and per study,
    every unit and every trial recorded once."""
    queue, store = stores
    env = ENV
    if store.startswith("sqlite:"):  # no cache folder, so no schema template: the store is made by migrations, at once
        (tmp_path / "no-cache").write_text("")
        env = {**ENV, "HRTEM_CACHE_DIR": str(tmp_path / "no-cache")}
    spec = sweep_spec("together", seeds=(0,), data_root=str(tmp_path / "own"), subsets=[{"name": "all", "set": {}}],
                      datasets={"tgt": {"recipe": "tiny", "n": 8, "seed": 3, "set": ["imaging.dose_e_per_A2=150"]}},
                      finetune=[{"name": "n4", "set": {"data.train": [{"dataset": "tgt", "max_samples": 4}]}}])
    path = write_spec(workspace, f"together-{tmp_path.name}.yaml", spec)
    outs = _together([sys.executable, "-m", "experiments", "sweep", "--config", str(path), "--workers", "1",
                      "--quiet", "--tracking-uri", store, "--storage", queue], tmp_path, env)
    assert sum("dataset tgt: 8 samples" in out for out in outs) == 1, outs
    rows = claims.unit_rows(claims.open_engine(queue), _queue(tmp_path / "own" / "tgt"))
    assert [(r["state"], r["epoch"]) for r in rows] == [("done", 1)]  # claimed once, by the one that made it
    _assert_recorded_as_declared(store, load_experiment(path, "sweep"))
    assert len(tracked_runs(store, filter_string="tags.kind = 'sweep' and tags.sweep = 'together'")) == 1

    study = {"kind": "study", "name": f"together-{tmp_path.name}", "base": "base.yaml", "n_trials": 2,
             "search_space": {"optim.lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}},
             "pruner": {"kind": "none"}}
    path = write_spec(workspace, f"study-together-{tmp_path.name}.yaml", study)
    _together([sys.executable, "-m", "experiments", "study", "--config", str(path), "--workers", "1", "--quiet",
               "--tracking-uri", store, "--storage", queue], tmp_path, env)
    parents = tracked_runs(store, filter_string=f"tags.kind = 'study' and tags.study = '{study['name']}'")
    assert len(parents) == 1
    trials = tracked_runs(store, filter_string=f"tags.kind = 'trial' and tags.study = '{study['name']}'")
    finished = Counter(r.data.tags["trial"] for r in trials if r.info.status == "FINISHED")
    assert len(finished) == 2 and set(finished.values()) == {1}, finished
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    # the candidates that lost are deleted, never left as a second parent
    client = MlflowClient(store)
    everything = client.search_runs([parents[0].info.experiment_id], "tags.`study.candidate` != ''",
                                    run_view_type=3)
    assert all(r.info.lifecycle_stage == "deleted" or r.info.run_id == parents[0].info.run_id for r in everything)
