"""Helpers of the sweep and study tests: definition files and run look-ups (the data are conftest's ``workspace``)."""

import time

import pytest
import yaml
from mlflow import MlflowClient

from mlplatform.store import ensure_store


def write_spec(root, name, spec):
    path = root / name
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_spec(name, seeds=(0, 1, 2), **extra):
    """Two subsets (all, near-focus) x seeds, fine-tuned on PLACEHOLDER data (tests set the target set)."""
    return {"kind": "sweep", "name": name, "base": "base.yaml",
            "subsets": [{"name": "all", "set": {}},
                        {"name": "near-focus", "set": {"data.train.0.filter": "abs(imaging.defocus_A) <= 300"}}],
            "seeds": list(seeds), "finetune": {"set": {"data.train": [{"path": "PLACEHOLDER"}]}}, **extra}


def tracked_runs(store, experiment="exp-test", filter_string=""):
    # through the store's creation lock: a poller that opens a new store while the command under test creates it
    # would race MLflow's migrations (and crash either side)
    ensure_store(store)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string) if exp else []


def wait_while_running(proc, condition, timeout_s=300) -> bool:
    """Poll ``condition`` every 0.1 s while ``proc`` runs: True once it holds, False if ``proc`` ended or time ran
    out first (kill tests land on the run's own state, not after a sleep)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.1)
    return False


def assert_one_run_per_trial(study, runs):
    """Every finished trial has the one run its state says, named by its mlflow_run attr; no run RUNNING."""
    by_trial = {}
    for r in runs:
        by_trial.setdefault(int(r.data.tags["trial"]), []).append(r)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert set(by_trial) <= {t.number for t in study.trials}
    for t in study.trials:
        mine = by_trial.get(t.number, [])
        assert len(mine) <= 1, (t.number, [r.info.run_id for r in mine])
        if t.state.name in ("COMPLETE", "PRUNED"):
            assert len(mine) == 1 and mine[0].info.status == "FINISHED", (t.number, t.state, mine)
            assert t.user_attrs["mlflow_run"] == mine[0].info.run_id
            if t.state.name == "COMPLETE":
                assert mine[0].data.metrics["objective"] == pytest.approx(t.value)
            else:
                assert "stopped_by" in mine[0].data.tags
        elif t.state.name == "FAIL":
            # no run only when the trial failed before its run existed (bad data, or killed while preparing)
            if mine:
                assert mine[0].info.status in ("FAILED", "KILLED"), (t.number, mine[0].info.status)
                assert t.user_attrs["mlflow_run"] == mine[0].info.run_id
            else:
                assert "mlflow_run" not in t.user_attrs
        if t.state.name != "RUNNING":
            assert "worker" in t.user_attrs
