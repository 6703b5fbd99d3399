"""Faults of the tracking store during long work: a server that goes away mid-run is retried for a bounded time, then
the command fails with one clear line (never a hang), and the run is recorded FAILED — in the store if it answers
again in time, else on this machine and in the store by the next command that reaches it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from benchmarks.services import free_loopback_port, stop_process_group
from cli_forkserver import _env
from conftest import _wait_http


def _server(backend: Path, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{backend}", "--artifacts-destination", str(artifacts), "--host",
                                 "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=out, stderr=out, start_new_session=True,
                                env={**_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    _wait_http(f"http://127.0.0.1:{port}/health", proc, log)
    return proc


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


@pytest.mark.slow
def test_a_tracking_server_lost_mid_run_ends_the_command_and_the_run_fails(workspace, tmp_path):
    port, backend, artifacts = free_loopback_port(), tmp_path / "server.db", tmp_path / "artifacts"
    uri = f"http://127.0.0.1:{port}"
    server = _server(backend, artifacts, port, tmp_path / "server.log")
    config = yaml.safe_load((workspace / "base.yaml").read_text())
    config["epochs"] = 200  # far longer than the test: the run is still training when its server goes
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(config))
    # the user's own retry budget replaces ours (mlplatform.store.HTTP_RETRY_ENV: 4 retries with back-off factor 2,
    # about 30 s per call): one quick retry here, so the test waits seconds, not the default budget, per lost call
    retries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    train = subprocess.Popen([sys.executable, "-m", "experiments", "train", "--quiet", "--config",
                              str(tmp_path / "long.yaml"), "--tracking-uri", uri],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**_env(), **retries},
                             cwd=tmp_path)
    try:
        client = MlflowClient(uri)

        def first_epoch():  # the run exists and has logged an epoch's metrics
            exp = client.get_experiment_by_name("exp-test")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return runs and "val/dice" in runs[0].data.metrics and runs[0]

        run = _wait(first_epoch, 300, "the run's first epoch")
        stop_process_group(server, timeout_s=10)
        lost = time.monotonic()
        out, err = train.communicate(timeout=400)
        took = time.monotonic() - lost
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
        if server.poll() is None:
            stop_process_group(server)

    assert train.returncode == 2, (train.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert f"lost during run {run.info.run_id}" in errors[0] and uri in errors[0], errors[0]
    # bounded by the retry budget it was given (MLflow's own defaults, 7 retries of 120 s, take minutes per call)
    assert took < 60, took
    pending = json.loads((Path(os.environ["HRTEM_CACHE_DIR"]) / "pending-run-ends.json").read_text())
    assert [e["run_id"] for e in pending if e["uri"] == uri] == [run.info.run_id]

    # the server comes back on the same store: the next command that reaches it records the failure
    server = _server(backend, artifacts, port, tmp_path / "server2.log")
    try:
        assert MlflowClient(uri).get_run(run.info.run_id).info.status == "RUNNING"
        res = subprocess.run([sys.executable, "-m", "experiments", "doctor", "--tracking-uri", uri, "--storage",
                              f"sqlite:///{tmp_path / 'claims.db'}"],
                             capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
        assert f"run {run.info.run_id}: ended FAILED" in res.stderr, res.stderr[-3000:]
        after = MlflowClient(uri).get_run(run.info.run_id)
        assert after.info.status == "FAILED"
        assert "tracking store" in after.data.tags["failure_reason"]
        assert after.info.end_time is not None and after.info.end_time <= int(time.time() * 1000)
        pending = json.loads((Path(os.environ["HRTEM_CACHE_DIR"]) / "pending-run-ends.json").read_text())
        assert not [e for e in pending if e["uri"] == uri]
        assert not [m for m in MlflowClient(uri).search_logged_models([run.info.experiment_id])
                    if m.source_run_id == run.info.run_id]  # no model from a run that did not finish
    finally:
        stop_process_group(server)


def test_a_tracking_server_that_never_answers_is_refused_in_bounded_time(workspace, tmp_path):
    """A port where nothing listens: three quick tries, then one line (MLflow alone retries for minutes)."""
    port = free_loopback_port()
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "experiments", "train", "--quiet", "--config",
                          str(workspace / "base.yaml"), "--tracking-uri", f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert time.monotonic() - start < 60
    assert f"error: tracking URI http://127.0.0.1:{port}: the tracking server does not answer (connection refused)" \
        in res.stderr
    assert not list(tmp_path.iterdir())  # nothing written: no local store, no mlruns/
