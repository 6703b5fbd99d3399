"""Sweeps: data subsets x seeds x phases (pretrain, then a fine-tune of each pretrained model).

Cells are handed out through an Optuna study used as a work queue: every cell is enqueued once as a trial with fixed
params (cell index, attempt); a worker takes the next waiting trial — an atomic operation of Optuna's RDB storage — so
any number of workers, in one process pool or on many machines sharing ``--storage``, never run a cell twice at
once. Heartbeats mark the cells of a killed worker stale; they are handed out again.

The tracking store is the record of what is done: before training a phase, a worker looks for a FINISHED run of that
cell and phase and reuses it. Killing a sweep and starting it again therefore loses nothing and duplicates nothing.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from dataclasses import dataclass

import optuna
from mlflow import MlflowClient

from mlplatform.tracking import get_or_create_experiment, resolve_tracking_uri
from mlplatform.train import train

from .specs import Experiment, load_experiment
from .storage import HEARTBEAT_S, sweep_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
WAITING, RUNNING, COMPLETE, FAIL = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING,
                                    optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)


@dataclass(frozen=True)
class Cell:
    index: int
    subset: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.subset}/s{self.seed}"


def cells_of(exp: Experiment) -> list[Cell]:
    pairs = [(s.name, seed) for s in exp.spec.subsets for seed in exp.spec.seed_list]
    return [Cell(i, subset, seed) for i, (subset, seed) in enumerate(pairs)]


def study_name(exp: Experiment) -> str:
    return f"sweep:{exp.name}"


def _experiment_name(exp: Experiment) -> str:
    return exp.config(exp.spec.subsets[0].set).tracking.experiment


def finished_run(client: MlflowClient, experiment_id: str, sweep: str, cell: Cell, phase: str):
    runs = client.search_runs(
        [experiment_id],
        f"tags.sweep = '{sweep}' and tags.`sweep.cell` = '{cell.key}' and tags.phase = '{phase}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0] if runs else None


def _open(exp: Experiment, storage_url: str | None, tracking_uri: str) -> optuna.Study:
    """Create the queue (and the sweep's MLflow parent run) once; later processes load it and check it matches."""
    storage = sweep_storage(storage_url)
    name = study_name(exp)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        creator = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        creator = False
    if creator:
        client = MlflowClient(tracking_uri)
        exp_id = get_or_create_experiment(_experiment_name(exp), tracking_uri)
        parent = client.create_run(exp_id, run_name=f"sweep-{exp.name}", tags={
            "sweep": exp.name, "kind": "sweep", "sweep.fingerprint": exp.fingerprint(),
            "optuna.storage": storage.url, "optuna.study_name": name})
        client.log_dict(parent.info.run_id, exp.spec.model_dump(mode="json"), "sweep/definition.yaml")
        client.log_dict(parent.info.run_id, exp.base, "sweep/base.yaml")
        client.set_terminated(parent.info.run_id, "FINISHED")  # a container: the cells are its children
        study.set_user_attr("mlflow_parent_run", parent.info.run_id)
        study.set_user_attr("fingerprint", exp.fingerprint())
        study.set_user_attr("initialized", True)
    deadline = time.time() + 120
    while not study.user_attrs.get("initialized"):  # another process is creating it right now
        if time.time() > deadline:
            raise RuntimeError(f"sweep {exp.name}: the queue in {storage.url} was never initialised")
        time.sleep(1)
    if study.user_attrs["fingerprint"] != exp.fingerprint():
        raise ValueError(f"sweep {exp.name!r} already exists in {storage.url} with a different definition; "
                         "give the changed sweep a new name")
    return study


def reconcile(study: optuna.Study, exp: Experiment) -> int:
    """Enqueue every cell that has no waiting, running or completed trial and failures left; returns how many."""
    by_cell: dict[int, list] = {}
    for t in study.get_trials(deepcopy=False):
        if "cell" in t.user_attrs:
            by_cell.setdefault(t.user_attrs["cell"], []).append(t)
    added = 0
    for cell in cells_of(exp):
        trials = by_cell.get(cell.index, [])
        if any(t.state in (WAITING, RUNNING, COMPLETE) for t in trials):
            continue
        errors = sum(t.state == FAIL and "error" in t.user_attrs for t in trials)
        if errors > exp.spec.max_retries:
            continue
        study.enqueue_trial({"cell": cell.index, "attempt": len(trials)},
                            user_attrs={"cell": cell.index, "cell_key": cell.key}, skip_if_exists=True)
        added += 1
    return added


def _close_orphans(client: MlflowClient, experiment_id: str, sweep: str, cell: Cell | None = None) -> None:
    """Runs still RUNNING belong to a worker that died (SIGKILL, power loss): the queue gives a cell to one worker
    at a time, so whoever holds the cell now — or anyone, once no cell is running at all — may end them."""
    where = f" and tags.`sweep.cell` = '{cell.key}'" if cell else ""
    for run in client.search_runs([experiment_id], f"tags.sweep = '{sweep}' and tags.kind = 'cell'{where} "
                                  "and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "failure_reason", "worker died; the sweep handed the cell out again")
        client.set_terminated(run.info.run_id, "KILLED")


def _run_cell(exp: Experiment, cell: Cell, parent: str, tracking_uri: str, progress: bool) -> float:
    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(_experiment_name(exp), tracking_uri)
    _close_orphans(client, exp_id, exp.name, cell)
    subset = next(s for s in exp.spec.subsets if s.name == cell.subset)
    tags = {"sweep": exp.name, "kind": "cell", "sweep.subset": cell.subset, "sweep.cell": cell.key}
    config = exp.config(subset.set, {"seed": cell.seed, "tracking.subset": cell.subset})
    done = finished_run(client, exp_id, exp.name, cell, "pretrain")
    pre_id = done.info.run_id if done else train(config, "pretrain", tracking_uri=tracking_uri, progress=progress,
                                                extra_tags=tags, nest_under=parent)
    final_id = pre_id
    if exp.spec.finetune is not None:
        ft_config = exp.config(subset.set, exp.spec.finetune.set, {"seed": cell.seed, "tracking.subset": cell.subset})
        done = finished_run(client, exp_id, exp.name, cell, "finetune")
        final_id = done.info.run_id if done else train(ft_config, "finetune", init_from=pre_id,
                                                       tracking_uri=tracking_uri, progress=progress,
                                                       extra_tags=tags, nest_under=parent)
    metrics = client.get_run(final_id).data.metrics
    return float(metrics.get("ood/mean/dice", metrics.get("val/dice", 0.0)))


def worker(exp: Experiment, storage_url: str | None, tracking_uri: str, progress: bool = False) -> int:
    """Take cells until none is waiting or running; returns the number of cells this worker completed."""
    study = _open(exp, storage_url, tracking_uri)
    parent = study.user_attrs["mlflow_parent_run"]
    cells = cells_of(exp)
    done = []

    def objective(trial: optuna.Trial) -> float:
        if "cell" not in trial.user_attrs:  # the queue emptied between our look and our take: nothing to do
            raise optuna.TrialPruned("no cell")
        cell = cells[trial.suggest_int("cell", 0, len(cells) - 1)]
        trial.suggest_int("attempt", 0, 10_000)
        try:
            value = _run_cell(exp, cell, parent, tracking_uri, progress)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            print(f"sweep {exp.name}: cell {cell.key} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            raise
        done.append(cell.key)
        return value

    reconcile(study, exp)
    while True:
        optuna.storages.fail_stale_trials(study)
        states = {t.state for t in study.get_trials(deepcopy=False)}
        if WAITING in states:
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
            except Exception as exc:  # Optuna's own bookkeeping, e.g. our trial was declared stale meanwhile
                print(f"sweep {exp.name}: trial bookkeeping failed ({type(exc).__name__}: {exc}); the queue "
                      "decides what is left", file=sys.stderr)
        elif RUNNING in states:  # another worker's, or a dead one's that will turn stale and come back
            time.sleep(HEARTBEAT_S / 2)
        elif not reconcile(study, exp):  # nothing left, not even a failed cell with retries to spare
            return len(done)


def share_cores(workers: int) -> None:
    """Give each of ``workers`` local processes its share of the cores: torch's default (all cores per process)
    oversubscribes the machine and slows every worker down many times over."""
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _worker_main(path: str, cli_sets: list[str], storage_url: str | None, tracking_uri: str, workers: int) -> int:
    share_cores(workers)
    return worker(load_experiment(path, "sweep", cli_sets), storage_url, tracking_uri)


def run_sweep(path: str, cli_sets: list[str], workers: int, storage_url: str | None, tracking_uri: str | None,
              progress: bool = True) -> dict:
    exp = load_experiment(path, "sweep", cli_sets)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    study = _open(exp, storage_url, tracking_uri)
    if workers <= 1:
        worker(exp, storage_url, tracking_uri, progress)
    else:  # each process loads the definition and joins the same queue, as a worker on another machine would
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.starmap(_worker_main, [(str(path), list(cli_sets), storage_url, tracking_uri, workers)] * workers)
    return summarize(exp, study, tracking_uri)


def summarize(exp: Experiment, study: optuna.Study, tracking_uri: str) -> dict:
    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(_experiment_name(exp), tracking_uri)
    if not any(t.state == RUNNING for t in study.get_trials(deepcopy=False)):
        _close_orphans(client, exp_id, exp.name)
    phases = ["pretrain"] + (["finetune"] if exp.spec.finetune else [])
    missing = [f"{c.key}:{p}" for c in cells_of(exp) for p in phases
               if finished_run(client, exp_id, exp.name, c, p) is None]
    runs = client.search_runs([exp_id], f"tags.sweep = '{exp.name}' and tags.kind = 'cell'")
    return {"sweep": exp.name, "parent_run": study.user_attrs["mlflow_parent_run"],
            "cells": len(cells_of(exp)), "phases": phases, "missing": missing,
            "runs_by_status": {s: sum(r.info.status == s for r in runs) for s in {r.info.status for r in runs}}}
