"""Generation and studies on a real Dask cluster (``dask scheduler`` + two ``dask worker`` processes on loopback); a sweep
on Dask, with claims in PostgreSQL and runs on an MLflow server, is the walkthrough's (tests/test_cluster_walkthrough.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from datagen.pipeline import PROGRESS_DIR, generate
from datagen.recipe import load_recipe
from hrtem_core.dataset import verify_dataset
from hrtem_core.errors import InputError
from sweep_helpers import tracked_runs, write_spec

# one structure a shard: many small tasks, so both workers get some and a kill lands mid-run
SHARDS = ("imaging.crop_px=64", "structure.particle.radius_A={dist: uniform, low: 5, high: 6.5}",
          "simulation.n_phonons=1", "output.structures_per_shard=1")


def test_generation_on_dask_gives_the_local_content_hash(dask_cluster, tmp_path):
    recipe = load_recipe("tiny", SHARDS)
    local = generate(recipe, n=8, seed=11, out=tmp_path / "local", workers=1, progress=False)
    on_dask = generate(recipe, n=8, seed=11, out=tmp_path / "dask", progress=False, scheduler=dask_cluster.address)
    assert on_dask["content_hash"] == local["content_hash"]
    assert verify_dataset(tmp_path / "dask")["content_hash"] == local["content_hash"]
    assert not (tmp_path / "dask" / PROGRESS_DIR).exists()
    # the scheduler file is the other way to name the cluster (what a SLURM job hands over)
    again = generate(recipe, n=8, seed=11, out=tmp_path / "dask2", progress=False, scheduler=str(dask_cluster.file))
    assert again["content_hash"] == local["content_hash"]


@pytest.mark.slow
def test_a_worker_killed_mid_run_costs_only_its_shard(dask_cluster, tmp_path):
    recipe = load_recipe("tiny", SHARDS)
    reference = generate(recipe, n=12, seed=12, out=tmp_path / "local", workers=1, progress=False)
    out = tmp_path / "dask"
    result, before = {}, dask_cluster.worker_pids()
    run = threading.Thread(target=lambda: result.update(generate(recipe, n=12, seed=12, out=out, progress=False,
                                                                 scheduler=dask_cluster.address)))
    run.start()
    deadline = time.monotonic() + 300
    while not list((out / PROGRESS_DIR).glob("shard-*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = sorted(before.values())[0]
    os.kill(victim, signal.SIGKILL)  # its nanny starts a new worker process; its task goes to another worker
    run.join(timeout=600)
    assert not run.is_alive()
    assert result["content_hash"] == reference["content_hash"]
    assert verify_dataset(out)["n_samples"] == 12
    deadline = time.monotonic() + 60
    while victim in dask_cluster.worker_pids().values() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert victim not in dask_cluster.worker_pids().values()  # the kill really happened during the run


def test_bad_scheduler_arguments_fail_cleanly(tmp_path):
    recipe = load_recipe("tiny", SHARDS)
    with pytest.raises(InputError, match="neither a scheduler address"):
        generate(recipe, n=2, seed=1, out=tmp_path / "x", progress=False, scheduler=str(tmp_path / "nope.json"))
    res = subprocess.run([sys.executable, "-m", "datagen", "generate", "--recipe", "tiny", "--n", "2", "--seed", "1",
                          "--out", str(tmp_path / "y"), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--workers (local processes) and --scheduler" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_a_study_on_dask_runs_its_trials_once(dask_cluster, workspace, tmp_path):
    """The workers of an Optuna study as Dask tasks, on a PostgreSQL-free journal file the workers share. A design
    study: each trial generates its own data on its Dask worker (one recipe value drawn from two: a recipe that an
    earlier trial made is reused, not made again)."""
    import optuna
    import yaml

    name = f"dask-{tmp_path.name}"
    data = tmp_path / "data"
    spec = {"kind": "study", "name": name, "base": "base.yaml", "data_root": str(data),
            "datasets": {"pool": {"recipe": "tiny", "n": 4, "seed": 3, "set": list(SHARDS[:2])}},
            "set": {"data.train": [{"dataset": "pool"}], "data.val_fraction": 0.5},
            "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                             "datasets.pool.simulation.n_phonons": {"type": "categorical", "choices": [1, 2]}},
            "n_trials": 3, "pruner": {"kind": "none"}}
    path = write_spec(workspace, f"{name}.yaml", spec)
    store, journal = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "journal.log"
    res = subprocess.run([sys.executable, "-m", "experiments", "study", "--config", str(path), "--storage",
                          f"journal:{journal}", "--tracking-uri", store, "--scheduler", dask_cluster.address,
                          "--quiet"], capture_output=True, text=True, timeout=900, cwd=workspace,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=f"study:{name}", storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) >= 3
    runs = tracked_runs(store, filter_string="tags.kind = 'trial'")
    assert sorted(r.data.tags["trial"] for r in runs if r.info.status == "FINISHED") == \
        sorted(str(t.number) for t in complete)
    # one folder per recipe drawn, each trial's run naming the data it trained on
    folders = {r.data.params["design.pool.folder"]: r.data.params["design.pool.content_hash"] for r in runs
               if r.info.status == "FINISHED"}
    assert len(folders) == len({t.params["datasets.pool.simulation.n_phonons"] for t in complete})
    assert sorted(p.name for p in data.glob("pool-*")) == sorted(folders)
    for folder, content in folders.items():
        assert yaml.safe_load((data / folder / "manifest.json").read_text())["content_hash"] == content
