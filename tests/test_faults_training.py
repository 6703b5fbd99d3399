"""Faults during training: a run killed (SIGTERM, SIGKILL) and resumed in the same MLflow run, a loss that becomes
nan, and datasets with bad shards (--skip-bad-shards).

The kills are timed by the store, not by the clock: the test polls the run's first epoch metric while holding
SQLite's exclusive lock on the store, and signals the training process while it still holds it, so the process
cannot have logged anything more (let alone finished) by the time the signal is sent.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from hrtem_core.dataset import file_sha256
from hrtem_core.errors import InputError
from mlplatform.config import config_from_dict
from mlplatform.curation import scan_dataset
from mlplatform.store import ensure_store
from mlplatform.tracking import RunLock, checkpoint_folder
from mlplatform.train import train

EXPERIMENT = "faults"
EPOCHS = 3
# what the final metrics of a resumed run may differ by from an uninterrupted run's (measured: they are equal)
TOLERANCE = 1e-6
SCORES = ("train/loss", "train/lr", "val/dice", "val/iou", "ood/bench/dice", "ood/mean/dice")


def _config_dict(workspace: Path, **data) -> dict:
    return {
        "seed": 0, "epochs": EPOCHS,
        "data": {"train": [{"path": str(workspace / "train")}], "val_fraction": 0.34, "crop_px": 32,
                 "batch_size": 4, "steps_per_epoch": 2, **data},
        "benchmarks": [{"name": "bench", "path": str(workspace / "bench")}],
        "tracking": {"experiment": EXPERIMENT, "n_prediction_images": 0, "system_metrics": False},
    }


@pytest.fixture(scope="module")
def config_file(workspace, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "faults.yaml"
    path.write_text(yaml.safe_dump(_config_dict(workspace)))
    return path


def _store(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir(parents=True, exist_ok=True)
    ensure_store(uri)  # its tables exist before a training process and this test open it at the same time
    return uri


def _db(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """An uninterrupted run of the config (in this process: a CLI run gives the same numbers): (store, run id)."""
    store = _store(tmp_path_factory.mktemp("reference"))
    return store, train(config_from_dict(_config_dict(workspace)), tracking_uri=store, progress=False)


def _env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}  # as now: the session's HRTEM_CACHE_DIR included


def _cli(*args, store: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments", *map(str, args), "--quiet", "--tracking-uri", store],
                          capture_output=True, text=True, env=_env(), timeout=600, **kw)


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _assert_same_as_reference(client: MlflowClient, run_id: str, reference) -> None:
    """Every epoch logged once, and the curves and final metrics of the uninterrupted run (within TOLERANCE)."""
    ref_store, ref_id = reference
    ref = MlflowClient(ref_store)
    for key in SCORES:
        assert _steps(client, run_id, key) == list(range(EPOCHS)), key
        mine, theirs = _history(client, run_id, key), _history(ref, ref_id, key)
        assert [s for s, _ in mine] == [s for s, _ in theirs], key
        assert np.allclose([v for _, v in mine], [v for _, v in theirs], rtol=0, atol=TOLERANCE), (key, mine, theirs)
    final, ref_final = client.get_run(run_id).data.metrics, ref.get_run(ref_id).data.metrics
    assert all(abs(final[k] - ref_final[k]) <= TOLERANCE for k in SCORES), (final, ref_final)
    # the best epoch's checkpoint is the same epoch's (its callback's state went through the resume)
    best = [a.path for a in client.list_artifacts(run_id, "checkpoints") if a.path.endswith(".ckpt")
            and not a.path.endswith("/last.ckpt")]
    assert best == [a.path for a in ref.list_artifacts(ref_id, "checkpoints")], best


def _assert_finished_once(client: MlflowClient, uri: str, run_id: str) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "failure_reason" not in run.data.tags
    assert len(run.outputs.model_outputs) == 1 and run.data.tags["model.uri"]
    assert int(run.data.tags["resume.count"]) >= 1
    assert not checkpoint_folder(uri, run_id).exists()  # deleted once the run is FINISHED
    assert any(a.path == "checkpoints" for a in client.list_artifacts(run_id))  # the best epoch's, as always


# ------------------------------------------------------------------------------------------------ kill and resume


def _signal_after_first_epoch(proc: subprocess.Popen, uri: str, sig: int, timeout_s: float = 600) -> str:
    """Send ``sig`` to the training process once its run has logged its first epoch; the run's id. The store is
    polled under SQLite's exclusive lock, and the signal is sent before the lock is released: the process cannot log
    anything (or end its run) between the poll and the signal."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        con = sqlite3.connect(_db(uri), timeout=120, isolation_level=None)
        try:
            con.execute("BEGIN EXCLUSIVE")
            row = con.execute("SELECT run_uuid FROM metrics WHERE key = 'train/loss' LIMIT 1").fetchone()
            if row is None and proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the training process ended ({proc.returncode}) before its first epoch:\n{err[-3000:]}")
            if row is not None:
                assert proc.poll() is None, "the run cannot have ended: it could not write to the store"
                proc.send_signal(sig)
                return row[0]
        finally:
            con.execute("ROLLBACK")
            con.close()
        time.sleep(0.05)  # the polling interval (the lock, not the clock, synchronises)
    proc.kill()
    pytest.fail(f"no epoch logged within {timeout_s} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_run_resumes_in_the_same_run(sig, config_file, reference, tmp_path):
    uri = _store(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "experiments", "train", "--config", str(config_file), "--quiet",
                             "--tracking-uri", uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    run_id = _signal_after_first_epoch(proc, uri, sig)
    out, err = proc.communicate(timeout=300)
    client = MlflowClient(uri)
    killed = client.get_run(run_id)
    if sig == signal.SIGTERM:  # our handler ends the run
        assert proc.returncode == 130, err[-3000:]
        assert killed.info.status == "KILLED" and killed.data.tags["failure_reason"] == "interrupted (SIGTERM)"
    else:  # nothing ran in the process: the run stays RUNNING, its lock died with the process
        assert proc.returncode == -signal.SIGKILL
        assert killed.info.status == "RUNNING"
    # signalled after epoch 0 was logged and before anything else was: at most epoch 1 follows (SIGTERM is handled
    # once the write it waited in returns), none at all after a SIGKILL
    logged = _steps(client, run_id, "train/loss")
    assert logged == [0] or (sig == signal.SIGTERM and logged == [0, 1]), logged
    assert (checkpoint_folder(uri, run_id) / "last.ckpt").is_file()

    done = _cli("train", "--config", config_file, "--resume", run_id, store=uri)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == run_id  # the same run, not a new one
    assert [r.info.run_id for r in client.search_runs([killed.info.experiment_id])] == [run_id]
    _assert_finished_once(client, uri, run_id)
    _assert_same_as_reference(client, run_id, reference)
    tags = client.get_run(run_id).data.tags
    assert tags["resume.from"] == ("KILLED: interrupted (SIGTERM)" if sig == signal.SIGTERM else "RUNNING")
    assert 1 <= int(tags["resume.from_epoch"]) <= EPOCHS


class _InterruptAt(L.Callback):
    """Ctrl-C at the start of an epoch (Lightning's graceful shutdown, as from a real Ctrl-C)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt("interrupted by the test")


def _interrupted_run(workspace, uri: str, epoch: int = 1, **data) -> str:
    """A run of the test config interrupted (KILLED) at the start of ``epoch``, in this process; its id."""
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(_config_dict(workspace, **data)), tracking_uri=uri, progress=False,
              callbacks=[_InterruptAt(epoch)])
    client = MlflowClient(uri)
    killed = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                "attributes.status = 'KILLED'", order_by=["attributes.start_time DESC"])
    return killed[0].info.run_id


def test_a_run_resumes_from_its_uploaded_checkpoint(workspace, reference, tmp_path, monkeypatch):
    """A tracking server's run resumed on another machine: no local checkpoint folder, only the artifact
    checkpoints/last.ckpt that every epoch uploads to a server (forced here for the SQLite store)."""
    import mlplatform.train

    monkeypatch.setattr(mlplatform.train, "uploads_checkpoints", lambda uri: True)
    uri = _store(tmp_path)
    run_id = _interrupted_run(workspace, uri)
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/last.ckpt"]
    shutil.rmtree(checkpoint_folder(uri, run_id))  # the other machine's folder
    assert train(config_from_dict(_config_dict(workspace)), tracking_uri=uri, progress=False,
                 resume=run_id) == run_id
    _assert_finished_once(client, uri, run_id)
    _assert_same_as_reference(client, run_id, reference)
    assert client.get_run(run_id).data.tags["resume.from_epoch"] == "1"


def test_a_finetune_resumes_with_its_steps_after_the_pretrains(workspace, reference, tmp_path):
    store, pretrain = reference
    config = config_from_dict(_config_dict(workspace, train=[{"path": str(workspace / "target")}]))
    whole = train(config, phase="finetune", init_from=pretrain, tracking_uri=store, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(config, phase="finetune", init_from=pretrain, tracking_uri=store, progress=False,
              callbacks=[_InterruptAt(2)])
    client = MlflowClient(store)
    (killed,) = client.search_runs([client.get_run(pretrain).info.experiment_id], "attributes.status = 'KILLED'")
    run_id = killed.info.run_id
    with pytest.raises(InputError, match=f"--from: {whole}: run {run_id} was fine-tuned from {pretrain}"):
        train(config, phase="finetune", init_from=whole, tracking_uri=store, progress=False, resume=run_id)
    assert train(config, phase="finetune", init_from=pretrain, tracking_uri=store, progress=False,
                 resume=run_id) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume.from_epoch"] == "2"
    steps = list(range(EPOCHS, 2 * EPOCHS))  # the pretrain's count continues
    for key in SCORES:
        assert _steps(client, run_id, key) == steps == _steps(client, whole, key), key
        mine, theirs = [v for _, v in _history(client, run_id, key)], [v for _, v in _history(client, whole, key)]
        assert np.allclose(mine, theirs, rtol=0, atol=TOLERANCE), (key, mine, theirs)


def test_a_kill_between_an_epochs_checkpoint_and_its_metrics_loses_no_epoch(workspace, reference, tmp_path,
                                                                             monkeypatch):
    """Killed after epoch 1's checkpoint was written, before its metrics reached the store: the resume logs them
    from the checkpoint (once), then trains epoch 2."""
    from mlplatform.tracking import TrackedRun

    log_metrics = TrackedRun.log_metrics

    def killed_at_step_1(self, metrics, step):
        if step == 1:
            raise KeyboardInterrupt("killed between the checkpoint and the metrics")
        log_metrics(self, metrics, step)

    monkeypatch.setattr(TrackedRun, "log_metrics", killed_at_step_1)
    uri = _store(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(_config_dict(workspace)), tracking_uri=uri, progress=False)
    monkeypatch.setattr(TrackedRun, "log_metrics", log_metrics)
    client = MlflowClient(uri)
    (run,) = _runs(uri)
    assert run.info.status == "KILLED" and _steps(client, run.info.run_id, "train/loss") == [0]
    assert train(config_from_dict(_config_dict(workspace)), tracking_uri=uri, progress=False,
                 resume=run.info.run_id) == run.info.run_id
    _assert_finished_once(client, uri, run.info.run_id)
    _assert_same_as_reference(client, run.info.run_id, reference)
    assert client.get_run(run.info.run_id).data.tags["resume.from_epoch"] == "2"


def test_a_run_killed_before_its_first_checkpoint_restarts_in_the_same_run(workspace, reference, tmp_path):
    uri = _store(tmp_path)
    run_id = _interrupted_run(workspace, uri, epoch=0)
    client = MlflowClient(uri)
    assert not _steps(client, run_id, "train/loss")
    assert not (checkpoint_folder(uri, run_id) / "last.ckpt").exists()
    assert train(config_from_dict(_config_dict(workspace)), tracking_uri=uri, progress=False,
                 resume=run_id) == run_id
    _assert_finished_once(client, uri, run_id)
    _assert_same_as_reference(client, run_id, reference)
    assert client.get_run(run_id).data.tags["resume.from_epoch"].startswith("0 (no checkpoint")


def test_resume_refusals_change_nothing(workspace, reference, tmp_path):
    uri = _store(tmp_path)
    run_id = _interrupted_run(workspace, uri)
    client = MlflowClient(uri)
    config = config_from_dict(_config_dict(workspace))
    # the resume point of epoch 0: loadable with weights_only, it holds the epoch's metrics and the best-epoch
    # checkpoint's state already updated with that epoch (Lightning runs that callback first)
    state = torch.load(checkpoint_folder(uri, run_id) / "last.ckpt", weights_only=True)
    assert state["epoch"] == 0 and state["config_hash"] == config.hash()
    assert state["callbacks"]["EpochTracking"]["pending"]["step"] == 0
    assert state["callbacks"]["EpochTracking"]["pending"]["metrics"]["train/loss"] == \
        client.get_metric_history(run_id, "train/loss")[0].value
    (best,) = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert best["best_model_path"] == str(checkpoint_folder(uri, run_id).resolve() / "best-epoch0.ckpt")

    def refused(match: str, cfg=config, rid=run_id, **kw):
        with pytest.raises(InputError, match=match):
            train(cfg, tracking_uri=kw.pop("tracking_uri", uri), progress=False, resume=rid, **kw)
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "interrupted (KeyboardInterrupt)"
        assert "resume.count" not in run.data.tags

    refused("not a run id", rid="no-such-run")
    refused("no such run in the tracking store", rid="0" * 32)
    refused("FINISHED, there is nothing to resume", rid=reference[1], tracking_uri=reference[0])
    # another config: the first key that differs, where its value came from, and the run's value
    refused(r"--set optim\.lr: 0\.01: run [0-9a-f]{32} was trained with 0\.001",
            cfg=config_from_dict(_config_dict(workspace), ["optim.lr=0.01"]))
    refused(r"data\.skip_bad_shards: True: run [0-9a-f]{32} was trained with \(not set\)",
            cfg=config_from_dict(_config_dict(workspace), ["data.skip_bad_shards=true"]))
    refused(r"is a pretrain run; resume it with 'python -m experiments train --resume", phase="finetune",
            init_from=reference[1])
    # another process trains it now (the lock of a live process; one that died has released its lock)
    lock = RunLock()
    lock.acquire(checkpoint_folder(uri, run_id))
    try:
        refused(f"being trained right now by another process \\(pid {os.getpid()} ")
    finally:
        lock.release()
    # other data under the same path: a resume must read the samples the run read
    moved = tmp_path / "train-copy"
    shutil.copytree(Path(config.data.train[0].path), moved)
    other = tmp_path / "other"
    shutil.copytree(Path(config.data.train[0].path).with_name("target"), other)
    uri2 = _store(tmp_path / "second")
    copied_run = _interrupted_run(workspace, uri2, train=[{"path": str(moved)}])
    shutil.rmtree(moved)
    other.rename(moved)
    with pytest.raises(InputError, match=r"train data .*: other samples than the run read"):
        train(config_from_dict(_config_dict(workspace, train=[{"path": str(moved)}])), tracking_uri=uri2,
              progress=False, resume=copied_run)
    # a checkpoint that is gone while the run logged epochs: continuing would log them twice
    shutil.rmtree(checkpoint_folder(uri, run_id))
    refused(r"logged epochs up to step 0 but its checkpoint is gone")


@pytest.mark.slow
def test_cli_resume_refusal_is_one_error_line(workspace, config_file, tmp_path):
    uri = _store(tmp_path)
    done = _cli("train", "--config", config_file, "--resume", "0" * 32, store=uri)
    assert done.returncode == 2 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --resume: {'0' * 32}: no such run in the tracking store {uri}; give a run of this store "
                      "(--tracking-uri)"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------ a loss that diverges


@pytest.mark.slow
def test_a_nan_loss_fails_the_run_with_the_reason_and_no_model(config_file, tmp_path):
    uri = _store(tmp_path)
    # a finite learning rate that passes validation, with which Adam's first step makes the next loss nan
    done = _cli("train", "--config", config_file, "--set", "optim.lr=1e30", store=uri)
    assert done.returncode == 2 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training loss is nan at epoch 0 step 1 "), \
        done.stderr[-3000:]
    assert "lower optim.lr (now 1e+30)" in errors[0] and "Traceback" not in done.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == f"NonFiniteLoss: {errors[0][len('error: '):]}"
    assert not run.outputs.model_outputs and "model.uri" not in run.data.tags
    assert not _steps(client, run.info.run_id, "train/loss")  # it never finished an epoch
    assert not checkpoint_folder(uri, run.info.run_id).exists()  # nothing to resume
    with pytest.raises(InputError, match="failed with a non-finite loss .*training loss is nan"):
        train(config_from_dict(yaml.safe_load(config_file.read_text()), ["optim.lr=1e30"]), tracking_uri=uri,
              progress=False, resume=run.info.run_id)


# ------------------------------------------------------------------------------------------------ bad shards


def _flip_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def _bad_copy(source: Path, dest: Path, shard: str = "shard-000001.tar") -> Path:
    shutil.copytree(source, dest)
    _flip_byte(dest / shard)
    return dest


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_skip_bad_shards_trains_on_the_rest_and_records_what_it_left_out(workspace, tmp_path):
    bad = _bad_copy(workspace / "train", tmp_path / "bad-train")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_config_dict(workspace, train=[{"path": str(bad)}])))
    uri = _store(tmp_path)
    # without the flag: refused before the run exists, naming the shard
    refused = _cli("train", "--config", cfg, store=uri)
    assert refused.returncode == 2 and not _runs(uri)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "shard-000001.tar" in errors[0] and "--skip-bad-shards" in errors[0]

    done = _cli("train", "--config", cfg, "--skip-bad-shards", store=uri)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: skipping a bad shard")]
    assert len(warnings) == 1 and "shard-000001.tar" in warnings[0] and "sha256" in warnings[0]
    (run,) = _runs(uri)
    client = MlflowClient(uri)
    assert run.info.status == "FINISHED" and run.info.run_id == done.stdout.strip().splitlines()[-1]
    assert run.data.tags["data.skipped_shards"] == "1" and run.data.params["data.skip_bad_shards"] == "True"
    listed = json.loads(Path(client.download_artifacts(run.info.run_id, "data/skipped_shards.json",
                                                       str(tmp_path))).read_text())["skipped_shards"]
    assert [(s["role"], s["path"], s["shard"], s["n_samples"]) for s in listed] == [
        ("train", str(bad), "shard-000001.tar", 4)]
    assert "does not match the manifest" in listed[0]["reason"]
    # the run's data are the other shards' samples
    n = sum(int(t.value) for i in run.inputs.dataset_inputs for t in i.tags if t.key == "n_samples"
            and any(c.key == "mlflow.data.context" and c.value in ("train", "validation") for c in i.tags))
    assert n == scan_dataset(workspace / "train").n_samples - 4
    assert "1 bad shard(s) left out" in run.data.tags["mlflow.note.content"]


def _undecodable_copy(source: Path, dest: Path) -> tuple[Path, str]:
    """A copy whose shard-000000.tar holds a mask of the wrong shape, with a manifest that vouches for the file."""
    shutil.copytree(source, dest)
    shard = dest / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    victim = next(m.name for m, _ in members if m.name.endswith(".mask.npy"))
    buf = io.BytesIO()
    np.save(buf, np.zeros((7, 7), np.uint8))
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            if m.name == victim:
                payload, m.size = buf.getvalue(), len(buf.getvalue())
            tar.addfile(m, io.BytesIO(payload))
    manifest = json.loads((dest / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard.name:
            entry["sha256"] = file_sha256(shard)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest, victim.split(".")[0]


def test_skip_bad_shards_also_leaves_out_shards_that_do_not_decode(workspace, tmp_path):
    data, key = _undecodable_copy(workspace / "train", tmp_path / "train")
    index = scan_dataset(data)  # the metadata are fine: only a full read finds it
    assert not index.skipped and index.n_samples == scan_dataset(workspace / "train").n_samples
    index = scan_dataset(data, skip_bad_shards=True)
    assert [s.shard for s in index.skipped] == ["shard-000000.tar"]
    assert f"sample {key}" in index.skipped[0].reason and "mask shape (7, 7)" in index.skipped[0].reason
    assert index.records and all(r.shard != str(data / "shard-000000.tar") for r in index.records)


def test_skipping_every_shard_is_refused_before_the_run(workspace, tmp_path):
    bench = tmp_path / "bench"
    shutil.copytree(workspace / "bench", bench)
    for shard in bench.glob("shard-*.tar"):
        _flip_byte(shard)
    uri = _store(tmp_path)
    cfg = config_from_dict(_config_dict(workspace, skip_bad_shards=True) | {
        "benchmarks": [{"name": "bench", "path": str(bench)}]})
    with pytest.raises(InputError, match=r"benchmarks\.0\.path: .*all \d+ shard\(s\) are bad, nothing is left to read"):
        train(cfg, tracking_uri=uri, progress=False)
    assert not _runs(uri)
