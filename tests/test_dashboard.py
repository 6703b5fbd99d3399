"""``python -m experiments dashboard``: optuna-dashboard on the storage a study lives in, refused for a study that
is not there (exit 2, one error line, nothing created)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import optuna
import pytest

from benchmarks.services import free_loopback_port
from experiments.cli import main
from experiments.storage import study_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _make_study(url: str, name: str = "tiny", n_trials: int = 3) -> int:
    """A study as ``experiments study`` names it (``study:NAME``, its user attrs) with ``n_trials`` completed
    trials; its Optuna id."""
    study = optuna.create_study(study_name=f"study:{name}", storage=study_storage(url), direction="maximize")
    study.set_user_attr("experiment", "dashboard-test")
    study.set_user_attr("objective", {"metric": "ood/mean/dice", "direction": "maximize"})
    study.optimize(lambda t: t.suggest_float("optim.lr", 1e-4, 1e-2, log=True), n_trials=n_trials)
    return study._study_id


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _ctrl_c_default() -> None:
    # a runner started in the background has SIGINT ignored, and the child would inherit that: give Ctrl-C back
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # a server, stopped by a signal
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "terminate"])
def test_dashboard_serves_the_study(tmp_path, signum):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study_id = _make_study(url)
    port = free_loopback_port()
    proc = subprocess.Popen([sys.executable, "-m", "experiments", "dashboard", "--study", "tiny", "--storage", url,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=tmp_path, preexec_fn=_ctrl_c_default)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 15
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the dashboard did not answer within 15 s"
                time.sleep(0.2)
        assert [(s["study_id"], s["study_name"]) for s in studies] == [(study_id, "study:tiny")]
        trials = _get(f"{base}/api/studies/{study_id}")["trials"]
        assert len(trials) == 3 and {t["state"] for t in trials} == {"Complete"}
        # Ctrl-C (or SIGTERM) while requests are in flight (the page polls the API) stops it, cleanly
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    _get(f"{base}/api/studies/{study_id}")
                except (urllib.error.URLError, ConnectionError):
                    stop.wait(0.05)

        pollers = [threading.Thread(target=poll) for _ in range(2)]
        for t in pollers:
            t.start()
        try:
            time.sleep(1)
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=10)
        finally:
            stop.set()
            for t in pollers:
                t.join()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"{base}/dashboard/studies/{study_id}" in out
    assert "Traceback" not in err, err


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_unknown_study_exits_2(tmp_path, kind):
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'optuna.log'}"
    _make_study(url, n_trials=1)
    res = subprocess.run([sys.executable, "-m", "experiments", "dashboard", "--study", "nope", "--storage", url,
                          "--port", str(free_loopback_port())], capture_output=True, text=True, env=ENV,
                         cwd=tmp_path, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: no study 'nope' in ") and lines[0].endswith("; studies there: tiny")
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_missing_storage_is_not_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["dashboard", "--study", "nope"]) == 2  # the default journal, mlruns/optuna-journal.log
    assert main(["dashboard", "--study", "nope", "--storage", f"sqlite:///{tmp_path / 'absent.db'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: no study 'nope': ") for line in err)
    assert "optuna-journal.log does not exist" in err[0] and "absent.db does not exist" in err[1]
    assert list(tmp_path.iterdir()) == []


def test_port_in_use_exits_2(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _make_study(url, n_trials=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--study", "tiny", "--storage", url, "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot serve on 127.0.0.1:{port}: Address already in use"
