"""Sweeps and studies: definitions, the resume logic of the cell queue, and real runs (killed and resumed)."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
from mlflow import MlflowClient

from experiments.specs import load_experiment
from experiments.sweep import cells_of
from mlplatform.config import ConfigError
from sweep_helpers import assert_one_run_per_trial, sweep_spec, tracked_runs, write_spec

def test_definitions_are_validated_before_any_work(workspace):
    spec = sweep_spec("v")
    spec["finetune"]["set"]["data.train"] = [{"path": str(workspace / "target")}]
    exp = load_experiment(write_spec(workspace, "ok.yaml", spec), "sweep")
    assert [c.key for c in cells_of(exp)] == ["all/s0", "all/s1", "all/s2", "near-focus/s0", "near-focus/s1",
                                             "near-focus/s2"]
    assert exp.config(exp.spec.subsets[1].set).data.train[0].filter == "abs(imaging.defocus_A) <= 300"
    bad = dict(spec, subsets=[{"name": "x", "set": {"data.batch_size": 0}}])
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_experiment(write_spec(workspace, "bad.yaml", bad), "sweep")
    with pytest.raises(ConfigError, match="kind: study"):
        load_experiment(write_spec(workspace, "ok2.yaml", spec), "study")
    with pytest.raises(ConfigError, match="subsets"):
        load_experiment(write_spec(workspace, "dup.yaml", dict(spec, subsets=[{"name": "a"}, {"name": "a"}])), "sweep")
    with pytest.raises(ConfigError, match="indexes a list"):
        load_experiment(write_spec(workspace, "idx.yaml", dict(spec, set={"data.train.5.filter": "x"})), "sweep")


def test_a_sweep_registered_before_config_hash_is_the_same_sweep(workspace, tmp_path):
    """Fingerprints moved to hrtem_core.config.config_hash: a claims database written with the previous form of the
    same definition (make demo run before the change) resumes, and is updated; another definition is still refused."""
    from experiments import claims
    from experiments.specs import load_experiment

    exp = load_experiment(write_spec(workspace, f"fp-{tmp_path.name}.yaml", sweep_spec("fp", seeds=(0,))), "sweep")
    assert exp.fingerprint() != exp.legacy_fingerprint()
    engine = claims.open_engine(f"sqlite:///{tmp_path / 'claims.db'}")
    units = [(0, "all/s0", "pretrain")]
    claims.register_sweep(engine, "fp", exp.legacy_fingerprint(), "exp", units)  # as the previous version did
    row = claims.register_sweep(engine, "fp", exp.fingerprint(), "exp", units,
                                previous_fingerprint=exp.legacy_fingerprint())
    assert row["fingerprint"] == exp.fingerprint() and len(claims.unit_rows(engine, "fp")) == 1
    with pytest.raises(ValueError, match="different definition"):
        claims.register_sweep(engine, "fp", "other", "exp", units, previous_fingerprint="another")


def test_claims_record_each_unit_once_and_retry_only_the_units_own_failures(workspace, tmp_path):
    """The claim statements themselves, on one process: race, takeover, fencing of the old holder, retries."""
    from experiments import claims

    engine = claims.open_engine(f"sqlite:///{tmp_path / 'claims.db'}")
    units = [(0, "all/s0", "pretrain"), (1, "all/s1", "pretrain")]
    claims.register_sweep(engine, "r", "fp", "exp", units)
    claims.register_sweep(engine, "r", "fp", "exp", units)  # idempotent: queued once, not twice
    rows = claims.unit_rows(engine, "r")
    assert len(rows) == 2 and {r["state"] for r in rows} == {"pending"}
    with pytest.raises(ValueError, match="different definition"):
        claims.register_sweep(engine, "r", "other", "exp", units)
    first = claims.try_claim(engine, rows[0], "host-a/1/1.0/a", grace_s=60)
    assert first is not None and first.epoch == 1
    assert claims.try_claim(engine, rows[0], "host-b/1/1.0/b", grace_s=60) is None  # the row we read is gone
    row = claims.unit_rows(engine, "r")[0]
    assert not claims.claimable(row, time.time())  # a live lease on another host
    stale = dict(row)
    assert claims.claimable(stale, row["lease_until"] + 1)
    # the lease ran out (as seen by a later clock): another worker takes over with a newer epoch
    with engine.begin() as conn:
        conn.execute(claims.units.update().where(claims.units.c.cell == 0).values(lease_until=0.0))
    second = claims.try_claim(engine, claims.unit_rows(engine, "r")[0], "host-b/1/1.0/b", grace_s=60)
    assert second is not None and second.epoch == 2
    assert not first.renew() and first.lost.is_set()
    assert not first.commit("run-first")  # fenced off: the old holder cannot record its result
    assert second.commit("run-second")
    assert not second.commit("run-again")  # recorded once: a second result for the unit is refused
    row = claims.unit_rows(engine, "r")[0]
    assert (row["state"], row["run_id"]) == ("done", "run-second")
    assert not claims.claimable(row, time.time() + 1e6)
    # failures: the unit's own count against max_retries; infrastructure and interruptions do not
    other = claims.try_claim(engine, claims.unit_rows(engine, "r")[1], "host-a/1/1.0/a", grace_s=60)
    assert other.release("interrupted", "interrupted", max_retries=1) == "pending"
    for kind, expected in (("infra", "pending"), ("unit", "pending"), ("unit", "failed")):
        claim = claims.try_claim(engine, claims.unit_rows(engine, "r")[1], "host-a/1/1.0/a", grace_s=60)
        assert claim.release(f"{kind} error", kind, max_retries=1) == expected
    row = claims.unit_rows(engine, "r")[1]
    assert (row["failures"], row["infra_failures"], row["error"]) == (2, 1, "unit error")


def _dead_worker() -> str:
    """The worker identity of a process that has exited."""
    return subprocess.run([sys.executable, "-c", "from experiments.claims import worker_identity; "
                           "print(worker_identity())"], capture_output=True, text=True, check=True).stdout.strip()


def test_a_claim_held_by_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    from experiments import claims

    dead = _dead_worker()
    me = claims.worker_identity()
    assert claims.holder_is_dead(dead) and not claims.holder_is_dead(me)
    # a live holder stays alive when the clock is stepped: its start is kernel ticks since boot, not wall-clock time
    # (psutil's create time moved by 2 s under a running sweep once, and every worker took the others for dead);
    # the same pid with another start is a reused pid: dead
    host, pid, ticks, tag = me.split("/")
    assert ticks.startswith("t") and claims.holder_is_dead(f"{host}/{pid}/t{int(ticks[1:]) + 1}/{tag}")
    import psutil
    created = psutil.Process().create_time()  # identities written before ticks: a few seconds of slack
    assert not claims.holder_is_dead(f"{host}/{pid}/{created + 2:.3f}/{tag}")
    assert claims.holder_is_dead(f"{host}/{pid}/{created - 3600:.3f}/{tag}")
    engine = claims.open_engine(f"sqlite:///{tmp_path / 'claims.db'}")
    claims.register_sweep(engine, "d", "fp", "exp", [(0, "all/s0", "pretrain")])
    held = claims.try_claim(engine, claims.unit_rows(engine, "d")[0], dead, grace_s=3600)
    assert held is not None
    row = claims.unit_rows(engine, "d")[0]
    assert claims.claimable(row, time.time())  # an hour of lease left, but its holder is gone
    assert claims.try_claim(engine, row, claims.worker_identity(), grace_s=60).epoch == 2


@pytest.mark.slow
def test_study_with_pruning_and_a_failing_trial_runs_on_two_workers(workspace, tmp_path):
    spec = {"kind": "study", "name": "s", "base": "base.yaml", "set": {"epochs": 3},
            "search_space": {
                "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                # a radius bound below every particle selects nothing: that trial fails, the study goes on
                "data.train.0.filter": {"type": "template", "template": "structure.radius_A <= {rmax}",
                                        "params": {"rmax": {"type": "categorical", "choices": [1.0, 7.0]}}}},
            "n_trials": 6, "pruner": {"kind": "median", "n_startup_trials": 1, "n_warmup_steps": 0}}
    path = write_spec(workspace, "study.yaml", spec)
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
    trials = tracked_runs(store, filter_string="tags.kind = 'trial'")
    parent = tracked_runs(store, filter_string="tags.kind = 'study'")
    assert len(parent) == 1 and all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in trials)
    completed = [r for r in trials if "objective" in r.data.metrics]
    assert completed and all("trial.optim.lr" in r.data.params for r in completed)
    assert not [r for r in trials if r.info.status == "RUNNING"]
    for t in study.trials:
        if t.state.name == "COMPLETE":
            run = next(r for r in trials if r.data.tags["trial"] == str(t.number))
            assert run.data.metrics["objective"] == pytest.approx(t.value)
    assert_one_run_per_trial(study, trials)
    # the parent says what the study found, for a reader of the MLflow UI
    top = parent[0].data
    assert top.metrics["summary/best_objective"] == pytest.approx(study.best_value)
    assert top.metrics["summary/n_complete"] == states["COMPLETE"]
    best_run = study.best_trial.user_attrs["mlflow_run"]
    assert f"/runs/{best_run})" in top.tags["mlflow.note.content"] and "dashboard --study s" in top.tags[
        "mlflow.note.content"]


def _journal(path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


@pytest.mark.slow
def test_study_killed_midway_resumes_with_one_run_per_trial(workspace, tmp_path):
    """SIGKILL of the whole study (driver and both workers) while trials train, then the same command again: the
    killed trials are settled from their runs, and trials and runs agree one to one. On an RDB storage (with Optuna
    heartbeats); on a journal file (the default storage) the kill test of tests/test_design_study.py does the same."""
    spec = {"kind": "study", "name": "killed", "base": "base.yaml", "set": {"epochs": 2},
            "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "n_trials": 4, "pruner": {"kind": "median", "n_startup_trials": 1, "n_warmup_steps": 0}}
    path = write_spec(workspace, "killed.yaml", spec)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "experiments", "study", "--config", str(path), "--workers", "2", "--quiet",
           "--tracking-uri", store, "--storage", url]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path,
                            start_new_session=True)
    running, deadline = [], time.time() + 300
    while time.time() < deadline and not running and proc.poll() is None:
        time.sleep(0.5)
        running = tracked_runs(store, filter_string="attributes.status = 'RUNNING' and tags.kind = 'trial'")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and both workers, as a crash would
    proc.wait()
    assert running, "the kill must land while a trial trains"
    study = optuna.load_study(study_name="study:killed", storage=url)
    left = [t for t in study.trials if t.state.name == "RUNNING"]
    assert left and all("worker" in t.user_attrs for t in left)  # what the next start must settle
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="study:killed", storage=url)
    states = Counter(t.state.name for t in study.trials)
    assert "RUNNING" not in states and states["COMPLETE"] >= 1, states
    assert states["COMPLETE"] + states["PRUNED"] + states["FAIL"] >= 4, states
    runs = tracked_runs(store, filter_string="tags.kind = 'trial'")
    assert_one_run_per_trial(study, runs)
    for t in left:  # the killed trials: failed with the reason, their runs KILLED (or settled from a FINISHED run)
        t = study.trials[t.number]
        if t.state.name == "FAIL":
            assert t.user_attrs["fail_reason"].startswith("worker died")
    from experiments import claims
    from experiments.study import align_study, study_problems, trial_queue

    exp = load_experiment(path, "study")
    assert align_study(study, exp, store, fix=False) == [] and study_problems(study, exp, store) == []
    # the budget is the claims database's: 4 slots, each done once, each recording a counted trial's run (the
    # killed trials gave their slots back: they ran again, in new trials)
    engine, queue = trial_queue(study._storage, "killed")
    slots = claims.unit_rows(engine, queue)
    assert [r["state"] for r in slots] == ["done"] * 4
    counted = {t.user_attrs.get("mlflow_run") for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")}
    assert {r["run_id"] for r in slots} <= counted | {f"trial:{t.number}" for t in study.trials}
    assert len(counted) == sum(r["run_id"] in counted for r in slots)


@pytest.mark.slow
def test_a_trial_failed_while_it_trains_ends_its_run_killed_and_the_worker_goes_on(workspace, tmp_path):
    """Another process fails the trial (as stale) while its worker trains: the worker stops, its run ends KILLED
    tagged superseded (never FINISHED), the trial stays FAIL, and the worker's next trial runs normally."""
    import threading

    from experiments.claims import worker_identity
    from experiments.study import COMPLETE, FAIL, _open, align_study, run_trial, study_problems

    spec = {"kind": "study", "name": "taken", "base": "base.yaml", "set": {"epochs": 3},
            "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "pruner": {"kind": "none"}}
    exp = load_experiment(write_spec(workspace, "taken.yaml", spec), "study")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    journal = tmp_path / "journal.log"
    study = _open(exp, _journal(journal), store)
    failed = []

    def fail_it_while_it_trains():  # as another worker finding the trial stale would, through its own storage
        other = optuna.load_study(study_name="study:taken", storage=_journal(journal))
        deadline = time.time() + 300
        while time.time() < deadline and not tracked_runs(store, filter_string="attributes.status = 'RUNNING' and "
                                                                         "tags.kind = 'trial'"):
            time.sleep(0.2)
        trial = next(t for t in other.get_trials() if t.state.name == "RUNNING")
        other._storage.set_trial_state_values(trial._trial_id, FAIL)
        failed.append(trial.number)

    thread = threading.Thread(target=fail_it_while_it_trains)
    thread.start()
    frozen = run_trial(study, exp, study.user_attrs["mlflow_parent_run"], store, worker_identity())
    thread.join()
    assert failed == [frozen.number] and frozen.state == FAIL
    (run,) = tracked_runs(store, filter_string="tags.kind = 'trial'")
    assert run.info.status == "KILLED" and run.data.tags["superseded"] == "true", run.data.tags
    assert "objective" not in run.data.metrics
    again = run_trial(study, exp, study.user_attrs["mlflow_parent_run"], store, worker_identity())
    assert again.state == COMPLETE
    assert_one_run_per_trial(study, tracked_runs(store, filter_string="tags.kind = 'trial'"))
    assert align_study(study, exp, store, fix=False) == [] and study_problems(study, exp, store) == []


def test_align_study_settles_stale_trials_and_ends_runs_out_of_line(workspace, tmp_path):
    """Every rule of align_study on hand-made trials and runs (no training): a dead worker's trials take the state
    their runs prove, runs end as their trials say, duplicates are only reported."""
    from experiments.study import COMPLETE, FAIL, PRUNED, _new_trial, _open, align_study, study_problems
    from experiments.claims import worker_identity

    spec = {"kind": "study", "name": "align", "base": "base.yaml",
            "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
    exp = load_experiment(write_spec(workspace, "align.yaml", spec), "study")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = _open(exp, _journal(tmp_path / "journal.log"), store)
    client = MlflowClient(store)
    parent = study.user_attrs["mlflow_parent_run"]
    exp_id = client.get_run(parent).info.experiment_id
    dead, alive = _dead_worker(), worker_identity()

    def trial(worker=dead):
        return _new_trial(study, worker)

    def run(t, status="RUNNING", history=(), objective=None, record=True, **tags):
        r = client.create_run(exp_id, tags={"study": "align", "kind": "trial", "trial": str(t.number),
                                             "mlflow.parentRunId": parent, **tags}).info.run_id
        for step, v in enumerate(history):
            client.log_metric(r, "ood/mean/dice", v, step=step)
        if objective is not None:
            client.log_metric(r, "objective", objective)
        if status != "RUNNING":
            client.set_terminated(r, status)
        if record:
            t.set_user_attr("mlflow_run", r)
        return r

    done = trial()
    r_done = run(done, "FINISHED", [0.1, 0.3], objective=0.3)
    pruned = trial()
    r_pruned = run(pruned, "FINISHED", [0.05], stopped_by="TrialPruned: at epoch 0")
    unscored = trial()  # died between ending its run FINISHED and logging the objective
    r_unscored = run(unscored, "FINISHED", [0.2, 0.4])
    training = trial()
    r_training = run(training, "RUNNING", [0.2])
    early = trial()  # died before its run existed
    unrecorded = trial()  # died between creating its run and recording it
    r_unrecorded = run(unrecorded, record=False)
    live = trial(alive)
    r_live = run(live, "RUNNING", [0.1])
    told = trial(alive)
    r_told = run(told, "RUNNING", [0.5], objective=0.5)
    study.tell(told.number, 0.5)
    told_bare = trial(alive)
    r_told_bare = run(told_bare, "KILLED")
    study.tell(told_bare.number, 0.7)
    failed = trial(alive)  # failed as stale while its worker went on: its run ended FINISHED after that
    r_failed = run(failed, "FINISHED", [0.9], objective=0.9)
    study.tell(failed.number, state=FAIL)
    twice = trial(alive)
    r_twice = run(twice, "FINISHED", [0.6], objective=0.6)
    r_twice_2 = run(twice, "FINISHED", [0.6], objective=0.6, record=False)
    study.tell(twice.number, 0.6)

    before = {r.info.run_id: r.info.status for r in tracked_runs(store, filter_string="tags.kind = 'trial'")}
    preview = align_study(study, exp, store, fix=False)
    assert {r.info.run_id: r.info.status for r in tracked_runs(store, filter_string="tags.kind = 'trial'")} == before
    assert study.trials[training.number].state.name == "RUNNING"
    changes = align_study(study, exp, store)
    assert changes == preview, (changes, preview)
    assert len(changes) == 11, changes

    trials = {t.number: t for t in study.trials}
    status = {r.info.run_id: r for r in tracked_runs(store, filter_string="tags.kind = 'trial'")}
    assert trials[done.number].state == COMPLETE and trials[done.number].value == pytest.approx(0.3)
    assert trials[pruned.number].state == PRUNED and status[r_pruned].info.status == "FINISHED"
    assert trials[unscored.number].state == COMPLETE and trials[unscored.number].value == pytest.approx(0.4)
    assert status[r_unscored].data.metrics["objective"] == pytest.approx(0.4)
    assert trials[training.number].state == FAIL and status[r_training].info.status == "KILLED"
    assert trials[training.number].user_attrs["fail_reason"].startswith("worker died")
    assert status[r_training].data.tags["failure_reason"] == "worker died"
    assert trials[early.number].state == FAIL and "no run recorded" in trials[early.number].user_attrs["fail_reason"]
    assert trials[unrecorded.number].state == FAIL and status[r_unrecorded].info.status == "KILLED"
    assert trials[unrecorded.number].user_attrs["mlflow_run"] == r_unrecorded  # linked while settling
    assert trials[live.number].state.name == "RUNNING" and status[r_live].info.status == "RUNNING"
    assert status[r_told].info.status == "FINISHED"
    assert status[r_told_bare].info.status == "KILLED"  # no objective to show for COMPLETE: reported, not changed
    assert status[r_failed].info.status == "KILLED" and status[r_failed].data.tags["superseded"] == "true"
    assert {status[r_twice].info.status, status[r_twice_2].info.status} == {"FINISHED"}
    assert status[r_done].info.status == "FINISHED"

    problems = study_problems(study, exp, store)
    assert len(problems) == 2, problems
    assert any(f"trial {twice.number}" in p and r_twice in p and r_twice_2 in p for p in problems)
    assert any(f"trial {told_bare.number}" in p and r_told_bare in p for p in problems)
    assert align_study(study, exp, store) == []  # settled: nothing more to do


@pytest.mark.slow
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
