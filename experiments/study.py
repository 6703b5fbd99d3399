"""Optuna studies over hyperparameters and data curation.

Each trial samples the search space (dotted config keys: ``optim.lr``, ``data.batch_size``, ``data.train.0.weight``,
``data.train.0.max_samples``, a curation filter through a template...), trains one model as an MLflow child run of
the study's run, and returns the configured aggregate of a per-epoch metric (default: final ``ood/mean/dice``).
optuna-integration's Lightning callback reports that metric every epoch and prunes unpromising trials. A trial that
fails is recorded (FAILED run, FAIL trial) and the study goes on. Workers — local processes, Dask tasks or other
machines on the same storage — share the study's budget through the claims database, as sweep workers share units:
slot i of ``n_trials`` is the unit (``study:<name>``, i, ``trial``), claimed, fenced and committed like a sweep's
(:mod:`experiments.claims`), and a worker runs one trial in each slot it holds. The slot's commit records the
trial's run; a trial that fails for its own reasons uses up its slot, one whose worker dies gives it back.

One trial, one run, whatever the timing:

* a trial is created RUNNING with user attr ``worker`` (the process running it, :func:`claims.worker_identity`), and
  gets ``mlflow_run`` as soon as its run exists; the run has tags ``study``, ``kind=trial`` and ``trial`` (number);
* the run may end FINISHED only while its trial is still RUNNING in the storage (the commit hook of
  :func:`~mlplatform.train.train` reads it back); the ``objective`` metric is logged then, so a FINISHED run of a
  completed trial always has it. Otherwise the run ends KILLED, tagged ``superseded``;
* a RUNNING trial is stale when its worker is provably dead (same host, process gone) or, on an RDB storage, its
  heartbeat is older than the grace period. :func:`align_study` settles stale trials from their runs (FINISHED with
  ``objective`` -> COMPLETE, FINISHED and pruned -> PRUNED, RUNNING but recorded by its slot -> FINISHED and COMPLETE,
  anything else -> FAIL and the run KILLED) and brings every
  run's status in line with its trial; it runs before the workers start, in every worker before each trial (stale
  trials only) and at the end. What it cannot settle (two FINISHED runs for one trial, a completed trial without a
  FINISHED run) is reported by :func:`study_problems`, never changed.
"""

from __future__ import annotations

import gc
import math
import random
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from hrtem_core.config import show_value
from hrtem_core.errors import ConfigError, InputError
from mlplatform import mlflow_ui
from mlplatform.store import resolve_tracking_uri
from mlplatform.tracking import Superseded, close_run, find_runs, get_or_create_experiment
from mlplatform.train import check_trainer, curate_checked, logged_metrics, train

from . import claims
from .claims import DONE, FAILED
from .specs import Experiment, Objective, Param, load_experiment
from .storage import journal_path, storage_url, study_storage
from .datasets import datasets_read, ensure_datasets
from .design import best_recipe_file, confirm_findings, confirm_sweep_file, designed, trial_experiment
from .progress import QueueProgress
from .sweep import run_sweep
from .workers import dispatch, share_cores

optuna.logging.set_verbosity(optuna.logging.WARNING)

RUNNING, COMPLETE, PRUNED, FAIL = TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
POLL_S = 1.0  # how often a worker with no trial slot to claim looks again
WORKER_DIED = "worker died"


def suggest(trial: optuna.Trial, name: str, p: Param):
    if p.type == "float":
        return trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    if p.type == "categorical":
        return trial.suggest_categorical(name, p.choices)
    return p.template.format(**{k: suggest(trial, f"{name}.{k}", sub) for k, sub in p.params.items()})


def objective_value(client: MlflowClient, run_id: str, objective: Objective) -> float:
    """The trial's value from its run's per-epoch metric: the final value, or the best over epochs."""
    history = sorted(client.get_metric_history(run_id, objective.metric), key=lambda m: m.step)
    if not history:
        raise ValueError(f"run {run_id} logged no {objective.metric!r}")
    values = [m.value for m in history]
    better = max if objective.direction == "maximize" else min
    return values[-1] if objective.aggregate == "final" else better(values)


def _pruner(exp: Experiment):
    p = exp.spec.pruner
    if p.kind == "none":
        return optuna.pruners.NopPruner()
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                           n_warmup_steps=p.n_warmup_steps)


# what curation depends on: a search space that varies one of these is checked trial by trial instead
_CURATION_KEYS = ("seed", "data.train", "data.val_fraction", "data.max_val_samples", "benchmarks")


def _varies(exp: Experiment, key: str) -> bool:
    """Whether the search space sets ``key``, a section above it or a key inside it."""
    return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in exp.spec.search_space)


def check_study(exp: Experiment, machine: bool = True) -> None:
    """What the study's definition implies, checked before the study exists (no trial, no MLflow run): its objective
    is a metric the runs log, and what the search space leaves fixed — the trainer settings on this machine
    (``machine``; not when other machines train, e.g. Dask workers), the data (filters that select something, enough
    structures to split, the crop size within the images) — is usable. InputError naming the key and where its value
    came from."""
    config = exp.config()
    metric, allowed = exp.spec.objective.metric, logged_metrics(config)
    known = metric in allowed or (_varies(exp, "benchmarks") and metric.startswith("ood/"))
    if not known:
        raise ConfigError(f"study {exp.source}: objective.metric: {show_value(metric)}: not a metric the runs log "
                          f"(benchmarks: {', '.join(b.name for b in config.benchmarks) or 'none'}); allowed: "
                          f"{', '.join(allowed)}")
    if machine and not _varies(exp, "trainer"):
        check_trainer(config)
    # a design study's training data are made by its trials: checked trial by trial too
    if not any(_varies(exp, key) for key in _CURATION_KEYS) and not designed(exp.spec):
        curate_checked(config, crop=not _varies(exp, "data.crop_px"))


def _open(exp: Experiment, storage, tracking_uri: str, worker: int = 0) -> optuna.Study:
    spec = exp.spec
    name = f"study:{exp.name}"
    # one seed per worker: workers with the same seed would propose the same trials
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                direction=spec.objective.direction, pruner=_pruner(exp),
                                sampler=optuna.samplers.TPESampler(seed=spec.sampler_seed + worker))
    attrs = study.user_attrs
    if attrs.get("fingerprint") == exp.legacy_fingerprint():  # recorded before one hashing convention
        study.set_user_attr("fingerprint", exp.fingerprint())
    elif attrs.get("fingerprint", exp.fingerprint()) != exp.fingerprint():
        raise InputError(f"study {exp.name!r} already exists in {storage_url(storage)} with a different definition; "
                         "give the changed study a new name")
    parent = _parent_run(exp, storage, tracking_uri, attrs.get("mlflow_parent_run"))
    if attrs.get("mlflow_parent_run") != parent:
        study.set_user_attr("mlflow_parent_run", parent)
    if "fingerprint" not in attrs:
        study.set_user_attr("fingerprint", exp.fingerprint())
    # what align_study needs, so that a doctor can align a study by its name alone
    for key, value in (("experiment", exp.config().tracking.experiment),
                       ("objective", spec.objective.model_dump(mode="json"))):
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    return study


def claims_url(storage) -> str:
    """The claims database of a study: its Optuna storage's own database when that is one (PostgreSQL, SQLite; the
    claims tables sit beside Optuna's), else an SQLite file beside the journal file (``<journal>.claims.db``): a
    study is known by its storage and its name, and two journals may hold studies of the same name. ``storage``:
    a storage object, or the ``--storage`` argument (None: the default journal), which creates nothing."""
    if storage is None or isinstance(storage, str):
        path = journal_path(storage)
        url = f"journal:{path}" if path is not None else storage
    else:
        url = storage_url(storage)
    if "://" in url and not url.startswith("journal:"):
        return url
    path = Path(url.removeprefix("journal:")).resolve()
    return f"sqlite:///{path.with_name(path.name + '.claims.db')}"


TRIAL = "trial"  # the phase of a study's trial slots in the claims database


def trial_queue(storage, name: str) -> tuple:
    """(engine, queue name) of a study's trial slots: unit (study:<name>, i, trial) is the i-th trial of the budget."""
    return claims.open_engine(claims_url(storage)), f"study:{name}"


def _queue_trials(study: optuna.Study, engine, queue: str, n_trials: int) -> None:
    """Queue the slots of a budget of ``n_trials`` (idempotent; a larger budget adds slots). A study that ran
    trials before they had slots (no user attr ``slot``) has that many of its first slots recorded as done by them,
    once, whoever does it first."""
    claims.register_units(engine, queue, [(i, f"trial-{i}", TRIAL) for i in range(n_trials)])
    older = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE, PRUNED, FAIL))
             if "slot" not in t.user_attrs]
    for t, slot in zip(sorted(older, key=lambda t: t.number), range(n_trials)):
        claims.adopt(engine, claims.UnitKey(queue, slot, TRIAL), f"trial:{t.number}")


def _committed_runs(study: optuna.Study) -> set[str]:
    """The runs that the study's trial slots recorded (the claims database's word: they count)."""
    try:
        engine, queue = trial_queue(study._storage, study.study_name.removeprefix("study:"))
    except InputError:  # no claims database to read (a study made before slots): nothing is committed there
        return set()
    return {r["run_id"] for r in claims.unit_rows(engine, queue) if r["state"] == DONE and r["run_id"]}


def _parent_run(exp: Experiment, storage, tracking_uri: str, known: str | None) -> str:
    """The study's parent run, made the way a sweep's is: the claims database keeps one, whatever starts together
    (every process that finds none makes a candidate; the first recorded wins, the others are deleted), and it is
    completed under the study's write lock. ``known``: the parent a study made before this rule recorded."""
    engine = claims.open_engine(claims_url(storage))
    key = f"study:{exp.name}"
    experiment = exp.config().tracking.experiment
    row = claims.register_sweep(engine, key, exp.fingerprint(), experiment, [],
                                previous_fingerprint=exp.legacy_fingerprint(), kind="study")
    exp_id = get_or_create_experiment(experiment, tracking_uri)
    client = MlflowClient(tracking_uri)
    parent = row["parent_run"] or known
    if parent is None:
        run = client.create_run(exp_id, run_name=f"study-{exp.name}", tags={"study.candidate": exp.name})
        parent = claims.set_parent_run(engine, key, run.info.run_id)
        if parent != run.info.run_id:
            client.delete_run(run.info.run_id)
    else:
        parent = claims.set_parent_run(engine, key, parent)
    with claims.exclusive(engine, f"study-mlflow-writes:{exp.name}"):
        run = client.get_run(parent)
        if not (run.data.tags.get("kind") == "study" and run.info.status == "FINISHED"):
            client.log_dict(parent, exp.spec.model_dump(mode="json"), "study/definition.yaml")
            # the tags that make it the study's parent come last: a run that has them is complete
            for tag, value in {"optuna.storage": storage_url(storage), "optuna.study_name": f"study:{exp.name}",
                               "study.fingerprint": exp.fingerprint(), "study": exp.name, "kind": "study"}.items():
                client.set_tag(parent, tag, value)
            client.set_terminated(parent, "FINISHED")  # a container: the trials are its children
    return parent


# -- one trial -------------------------------------------------------------------------------------------------------

def _superseded(trial: optuna.Trial) -> Superseded:
    return Superseded(f"trial {trial.number} was finished by another process meanwhile (failed as stale)")


def _pruning_callback(trial: optuna.Trial, monitor: str):
    """optuna-integration's Lightning pruning callback, remembering whether it pruned (the commit hook asks), and
    stopping the training as soon as the trial is no longer this worker's (its report is refused)."""
    from optuna_integration import PyTorchLightningPruningCallback

    class Pruning(PyTorchLightningPruningCallback):
        pruned = False

        def on_fit_start(self, trainer, pl_module) -> None:
            # Only rank 0 runs callbacks here (mlplatform.train starts the other ranks without them), so the
            # integration's DDP mode, a broadcast from rank 0 that no other rank would answer, must stay off: rank 0
            # prunes as one process does, and its TrialPruned ends the other ranks.
            self.is_ddp_backend = False

        def on_validation_end(self, trainer, pl_module) -> None:
            try:
                super().on_validation_end(trainer, pl_module)
            except optuna.TrialPruned:
                self.pruned = True
                raise
            except UpdateFinishedTrialError as exc:
                raise _superseded(trial) from exc

    return Pruning(trial, monitor)


def _unfinished_in_slot(study: optuna.Study, slot: int) -> FrozenTrial | None:
    """The last trial of trial slot ``slot`` if it ended without its slot recording it (its worker died, was
    interrupted or lost the slot; a trial that fails for its own reasons uses its slot up): the slot's next trial
    re-runs its values."""
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("slot") == slot]
    last = max(mine, key=lambda t: t.number, default=None)
    return last if last is not None and last.state == FAIL and last.params else None


def _new_trial(study: optuna.Study, me: str, claim: claims.Claim | None = None) -> optuna.Trial:
    """A new RUNNING trial that names its worker (and its slot) from its first moment (what ``study.ask()`` does,
    plus the attrs in the same storage write: a worker killed a moment later still leaves a trial that can be seen
    to be stale). In a slot whose last trial was cut short, the new trial takes that trial's values (Optuna's
    ``fixed_params``, as for an enqueued trial) and names it in ``rerun_of``: a killed trial is re-run, and a design
    study's half-made data are resumed rather than abandoned."""
    attrs = {"worker": me, **({"slot": claim.key.cell, "slot_epoch": claim.epoch} if claim is not None else {})}
    system_attrs = {}
    cut = _unfinished_in_slot(study, claim.key.cell) if claim is not None else None
    if cut is not None:
        attrs["rerun_of"] = cut.number
        system_attrs["fixed_params"] = dict(cut.params)
    template = FrozenTrial(number=-1, state=RUNNING, value=None, datetime_start=datetime.now(),
                           datetime_complete=None, params={}, distributions={}, user_attrs=attrs,
                           system_attrs=system_attrs, intermediate_values={}, trial_id=-1)
    study._thread_local.cached_all_trials = None  # the sampler sees every trial finished so far (as ask() does)
    return optuna.Trial(study, study._storage.create_new_trial(study._study_id, template_trial=template))


def run_trial(study: optuna.Study, exp: Experiment, parent: str, tracking_uri: str, me: str,
              progress: bool = False, claim: claims.Claim | None = None) -> FrozenTrial:
    """Create one trial, train it, and tell the storage how it ended; never raises for the trial's own failure
    (KeyboardInterrupt is re-raised after the trial is recorded as FAIL and its slot given back).

    ``claim``: the trial slot this worker holds. The run counts only if the slot's commit lands (the slot was not
    taken over meanwhile); a trial that fails for its own reasons uses up its slot too, as a FAIL trial uses up
    Optuna's budget."""
    spec, storage, client = exp.spec, study._storage, MlflowClient(tracking_uri)
    trial = _new_trial(study, me, claim)
    tid, run = trial._trial_id, {}
    pruning = _pruning_callback(trial, spec.objective.metric)

    recipes = {}  # a design study's: name -> the trial's recipe, logged beside its run

    def on_start(run_id: str) -> None:
        run["id"] = run_id
        try:
            trial.set_user_attr("mlflow_run", run_id)
        except UpdateFinishedTrialError as exc:
            raise _superseded(trial) from exc
        for name, recipe in recipes.items():
            client.log_dict(run_id, recipe.resolved(), f"design/{name}.recipe.yaml")

    def commit(run_id: str) -> bool:
        # the run counts only while its trial does: a trial failed as stale meanwhile has lost it
        if storage.get_trial(tid).state != RUNNING:
            return False
        if not pruning.pruned:
            run["value"] = objective_value(client, run_id, spec.objective)
            client.log_metric(run_id, "objective", run["value"])
        # ... and while its slot is this worker's: the commit that records the run in the claims database
        return claim is None or claim.commit(run_id)

    state, reason, interrupted = FAIL, None, None
    with get_heartbeat_thread(tid, storage):
        try:
            sampled = {key: suggest(trial, key, p) for key, p in spec.search_space.items()}
            trial_exp, values, designed_recipes = trial_experiment(exp, sampled)
            recipes.update(designed_recipes)
            made = {}
            if recipes:  # a design study: the trial's own data first (made once per recipe, resumed after a kill)
                made = ensure_datasets(trial_exp, list(recipes), claims_url(storage), workers=1,
                                       log=lambda line: print(f"study {exp.name}: trial {trial.number}: {line}",
                                                              flush=True))
            config = trial_exp.config(values, {"tracking.run_name": f"{exp.name}-trial{trial.number}"},
                                      where=(f"search_space (trial {trial.number})", "trial"))
            design_params = {f"design.{name}.{what}": value for name, recipe in recipes.items()
                             for what, value in (("recipe_hash", recipe.hash()), ("content_hash", made[name]),
                                                 ("folder", trial_exp.spec.dataset_path(name).name))}
            train(config, tracking_uri=tracking_uri, progress=progress, nest_under=parent,
                  extra_tags={"study": exp.name, "kind": "trial", "trial": str(trial.number)},
                  extra_params={**{f"trial.{k}": v for k, v in sampled.items()}, **design_params},
                  callbacks=[pruning], stop_exceptions=(optuna.TrialPruned,), on_start=on_start, commit=commit)
            state = COMPLETE
        except optuna.TrialPruned:
            state = PRUNED
        except Superseded as exc:
            reason = f"superseded: {exc}"
        except Exception as exc:  # noqa: BLE001  the trial failed; the study goes on
            reason = f"{type(exc).__name__}: {exc}"
            print(f"study {exp.name}: trial {trial.number} failed: {reason}\n{traceback.format_exc()}",
                  file=sys.stderr)
        except KeyboardInterrupt as exc:
            reason, interrupted = "interrupted", exc
    if state == COMPLETE and not math.isfinite(run["value"]):  # Optuna would fail the trial: the run must not count
        state, reason = FAIL, f"objective {run['value']} is not a finite number"
        close_run(client, run["id"], "FAILED", reason)
    if claim is not None:
        if interrupted is not None:  # Ctrl-C: the slot goes back at once, uncounted
            try:
                claim.release("interrupted", "interrupted", 0)
            except Exception:  # noqa: BLE001  the lease runs out instead
                pass
        elif state == FAIL and not (reason or "").startswith("superseded") and not claim.lost.is_set():
            claim.commit(f"trial:{trial.number}")  # the trial's own failure uses up its slot
    try:
        if state == FAIL:
            storage.set_trial_user_attr(tid, "fail_reason", reason[:1000])
        frozen = study.tell(trial, run.get("value") if state == COMPLETE else None, state=state,
                            skip_if_finished=True)
    except UpdateFinishedTrialError:  # finished by another process between our look and our write
        frozen = storage.get_trial(tid)
    if frozen.state != state and state in (COMPLETE, PRUNED):
        # the run ended FINISHED, but its trial was failed as stale meanwhile: the run must not count
        why = (f"superseded: trial {trial.number} was settled as {frozen.state.name} by another process "
               f"({frozen.user_attrs.get('fail_reason', 'no reason recorded')}) before this worker recorded it")
        print(f"study {exp.name}: {why}; run {run['id']} ends KILLED", file=sys.stderr)
        close_run(client, run["id"], "KILLED", why, superseded=True)
    if interrupted is not None:
        raise interrupted
    return frozen


# -- trials and runs brought into line -----------------------------------------------------------------------------

@dataclass
class _StudyInfo:
    name: str
    experiment: str
    objective: Objective
    parent: str


def _info(study: optuna.Study, exp: Experiment | None) -> _StudyInfo:
    attrs = study.user_attrs
    if exp is not None:
        return _StudyInfo(exp.name, exp.config().tracking.experiment, exp.spec.objective, attrs["mlflow_parent_run"])
    if "experiment" not in attrs or "objective" not in attrs:
        raise InputError(f"study {study.study_name!r} predates the attributes that let it be aligned by name: run "
                         "its `study` command once (with the same definition)")
    return _StudyInfo(study.study_name.removeprefix("study:"), attrs["experiment"],
                      Objective.model_validate(attrs["objective"]), attrs["mlflow_parent_run"])


def trial_runs(study: optuna.Study, info: _StudyInfo, tracking_uri: str) -> list:
    """The study's trial runs: tagged ``study=<name>``, ``kind=trial``, children of this study's parent run (a
    study deleted and created again under the same name has a new parent)."""
    name = info.name.replace("'", "\\'")
    runs = find_runs(tracking_uri, info.experiment, f"tags.study = '{name}' and tags.kind = 'trial'")
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == info.parent]


def _number(run) -> int | None:
    try:
        return int(run.data.tags.get("trial", ""))
    except ValueError:
        return None


def _recorded_run(trial: FrozenTrial, runs: list):
    """The trial's run: the one its ``mlflow_run`` attr names; without the attr (its worker died before recording
    it), the only run tagged with its number."""
    rid = trial.user_attrs.get("mlflow_run")
    if rid is not None:
        return next((r for r in runs if r.info.run_id == rid), None)
    mine = [r for r in runs if _number(r) == trial.number]
    return mine[0] if len(mine) == 1 else None


def stale_trials(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> dict[int, str]:
    """trial number -> why, for each RUNNING trial whose worker is provably dead, or (RDB storages with heartbeats)
    whose heartbeat is older than the grace period."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    stale = {}
    for t in trials:
        worker = t.user_attrs.get("worker")
        if t.state == RUNNING and worker and claims.holder_is_dead(worker):
            stale[t.number] = f"{WORKER_DIED} ({worker})"
    storage = study._storage
    if is_heartbeat_enabled(storage):
        by_id = {t._trial_id: t for t in trials}
        for tid in storage._get_stale_trial_ids(study._study_id):
            if tid in by_id and by_id[tid].state == RUNNING:
                grace = getattr(getattr(storage, "_backend", storage), "grace_period", None)
                stale.setdefault(by_id[tid].number, f"{WORKER_DIED} or stalled (no heartbeat for {grace} s; "
                                                    f"worker {by_id[tid].user_attrs.get('worker')})")
    return stale


def _settle(study: optuna.Study, trial: FrozenTrial, why: str, run, info: _StudyInfo, client: MlflowClient,
            fix: bool, committed: set[str] = frozenset()) -> list[str]:
    """A stale trial gets the state its run proves; the changes made (described)."""
    state, value, rid = FAIL, None, run.info.run_id if run is not None else None
    status = run.info.status if run is not None else None
    lines = []
    if status == "FINISHED" and "objective" in run.data.metrics:
        state, value = COMPLETE, run.data.metrics["objective"]
    elif status == "FINISHED" and "stopped_by" in run.data.tags:
        state = PRUNED
    elif status == "FINISHED":
        try:
            value = objective_value(client, rid, info.objective)
            state = COMPLETE
            lines.append(f"run {rid} (trial {trial.number}): objective {value:.6g} computed from its "
                         f"{info.objective.metric!r} and logged")
        except ValueError as exc:
            lines.append(f"run {rid} (trial {trial.number}): FINISHED -> FAILED ({exc})")
            if fix:
                close_run(client, rid, "FAILED", f"no objective: {exc}")
    elif status == "RUNNING" and rid in committed:
        # its slot recorded it, and the worker died before ending the run: the run is the trial's result
        try:
            value = objective_value(client, rid, info.objective)
            state = COMPLETE
            lines.append(f"run {rid} (trial {trial.number}): RUNNING -> FINISHED (its trial slot recorded it; "
                         f"objective {value:.6g} from its {info.objective.metric!r})")
            if fix:
                client.set_terminated(rid, "FINISHED")
        except ValueError as exc:
            lines.append(f"run {rid} (trial {trial.number}): RUNNING -> KILLED (recorded, but {exc})")
            if fix:
                close_run(client, rid, "KILLED", f"{WORKER_DIED}; {exc}")
    elif status == "RUNNING":
        lines.append(f"run {rid} (trial {trial.number}): RUNNING -> KILLED ({WORKER_DIED})")
        if fix:
            close_run(client, rid, "KILLED", WORKER_DIED)
    if state == FAIL:
        reason = why if run is not None else f"{why}; no run recorded"
        lines.insert(0, f"trial {trial.number}: RUNNING -> FAIL ({reason}{f'; run {rid} {status}' if rid else ''})")
    else:
        lines.insert(0, f"trial {trial.number}: RUNNING -> {state.name}{f' {value:.6g}' if value is not None else ''}"
                        f" ({why}, after its run {rid} ended FINISHED)")
    if not fix:
        return lines
    storage = study._storage
    try:
        if rid is not None and "mlflow_run" not in trial.user_attrs:
            storage.set_trial_user_attr(trial._trial_id, "mlflow_run", rid)
        if state == FAIL:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason[:1000])
        if state == COMPLETE and "objective" not in run.data.metrics:
            client.log_metric(rid, "objective", value)
        study.tell(trial.number, value, state=state, skip_if_finished=True)
    except UpdateFinishedTrialError:  # another process settled it first
        return [f"trial {trial.number}: settled by another process meanwhile"]
    return lines


def settle_stale_trials(study: optuna.Study, exp: Experiment | None, tracking_uri: str, fix: bool = True) -> list[str]:
    """The stale-trial rule of :func:`align_study` alone (cheap when nothing is stale: workers call it before every
    trial)."""
    stale = stale_trials(study)
    if not stale:
        return []
    info = _info(study, exp)
    runs = trial_runs(study, info, tracking_uri)
    client, lines, committed = MlflowClient(tracking_uri), [], _committed_runs(study)
    for t in study.get_trials(deepcopy=False):
        if t.number in stale:
            lines += _settle(study, t, stale[t.number], _recorded_run(t, runs), info, client, fix, committed)
    return lines


def align_study(study: optuna.Study, exp: Experiment | None, tracking_uri: str, fix: bool = True) -> list[str]:
    """Bring the study's trials and MLflow runs into line; returns one line per change (made, or without ``fix``,
    that would be made). ``exp`` may be None for a study created by this version (its attrs say the rest).

    * a stale RUNNING trial (dead worker; stale heartbeat) takes the state its run proves: FINISHED with
      ``objective`` -> COMPLETE with that value; FINISHED and pruned (``stopped_by``) -> PRUNED; FINISHED without
      ``objective`` -> the objective is computed from the run's metric history, logged, COMPLETE; otherwise FAIL
      (user attr ``fail_reason``) and a RUNNING run ends KILLED (``failure_reason`` "worker died");
    * a COMPLETE or PRUNED trial's run that is not FINISHED ends FINISHED, if it has what the state needs
      (``objective`` equal to the trial's value; a per-epoch metric for a pruned one);
    * a FAIL trial's runs that are RUNNING or FINISHED end KILLED (a FINISHED one ended after its trial was failed as
      stale: tagged ``superseded``, it must not count);
    * a RUNNING run that its trial does not name (its worker died between creating and recording it) ends KILLED,
      unless that trial is still RUNNING on a live worker without a run recorded yet.

    Duplicates and what cannot be repaired are left to :func:`study_problems`.
    """
    info = _info(study, exp)
    client = MlflowClient(tracking_uri)
    lines = settle_stale_trials(study, exp, tracking_uri, fix)
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    stale = stale_trials(study, trials)  # without fix: still RUNNING, already described
    for run in trial_runs(study, info, tracking_uri):
        rid, status, n = run.info.run_id, run.info.status, _number(run)
        t = by_number.get(n)
        recorded = t is not None and t.user_attrs.get("mlflow_run") == rid
        if t is None or t.state == TrialState.WAITING or n in stale:
            continue  # no such trial: a problem for a person; stale: described above
        if t.state == RUNNING:
            if status == "RUNNING" and not recorded and t.user_attrs.get("mlflow_run") is not None:
                lines.append(f"run {rid} (trial {n}): RUNNING -> KILLED (its trial records run "
                             f"{t.user_attrs['mlflow_run']})")
                if fix:
                    close_run(client, rid, "KILLED", f"superseded: trial {n} records another run", superseded=True)
            continue
        if t.state == FAIL:
            if status in ("RUNNING", "FINISHED"):
                why = t.user_attrs.get("fail_reason", "no fail_reason recorded")
                lines.append(f"run {rid} (trial {n}): {status} -> KILLED (trial {n} is FAIL: {why})")
                if fix:
                    close_run(client, rid, "KILLED", f"superseded: trial {n} was failed ({why})" if status ==
                             "FINISHED" else f"trial {n} was failed ({why})", superseded=status == "FINISHED")
            continue
        # COMPLETE or PRUNED
        if not recorded:
            if status == "RUNNING":
                lines.append(f"run {rid} (trial {n}): RUNNING -> KILLED (trial {n} is {t.state.name} with run "
                             f"{t.user_attrs.get('mlflow_run')})")
                if fix:
                    close_run(client, rid, "KILLED", f"superseded: trial {n} records another run", superseded=True)
            continue
        if status == "FINISHED":
            continue
        if _can_finish(t, run, info, client):
            lines.append(f"run {rid} (trial {n}): {status} -> FINISHED (trial {n} is {t.state.name})")
            if fix:
                if t.state == COMPLETE and "objective" not in run.data.metrics:
                    client.log_metric(rid, "objective", t.value)
                if t.state == PRUNED and "stopped_by" not in run.data.tags:
                    client.set_tag(rid, "stopped_by", "TrialPruned (recorded by align_study)")
                for tag in ("superseded", "failure_reason"):
                    if tag in run.data.tags:
                        client.delete_tag(rid, tag)
                client.set_terminated(rid, "FINISHED")
    return lines


def _can_finish(trial: FrozenTrial, run, info: _StudyInfo, client: MlflowClient) -> bool:
    """Whether a COMPLETE/PRUNED trial's run has what FINISHED needs: the trial's value as its objective (logged, or
    computed from its history), or for a pruned trial at least one value of the per-epoch metric."""
    if trial.state == COMPLETE:
        value = run.data.metrics.get("objective")
        if value is None:
            try:
                value = objective_value(client, run.info.run_id, info.objective)
            except ValueError:
                return False
        return _same(value, trial.value)
    return bool(client.get_metric_history(run.info.run_id, info.objective.metric))


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def study_problems(study: optuna.Study, exp: Experiment | None, tracking_uri: str) -> list[str]:
    """What is out of line between trials and runs (after :func:`align_study`, what it could not repair): one line
    each, naming the trial and the run ids. Empty when every finished trial has exactly the run its state says."""
    info = _info(study, exp)
    trials = study.get_trials(deepcopy=False)
    runs = trial_runs(study, info, tracking_uri)
    by_number: dict[int | None, list] = {}
    for r in runs:
        by_number.setdefault(_number(r), []).append(r)
    problems = []
    numbers = {t.number for t in trials}
    for n, rs in by_number.items():
        if n not in numbers:
            problems.append(f"runs {', '.join(r.info.run_id for r in rs)}: tagged trial {n}, which the study "
                            "does not have")
    stale = stale_trials(study, trials)
    for t in trials:
        rs = by_number.get(t.number, [])
        finished = [r.info.run_id for r in rs if r.info.status == "FINISHED"]
        rid = t.user_attrs.get("mlflow_run")
        if len(finished) > 1:
            problems.append(f"trial {t.number} ({t.state.name}): {len(finished)} FINISHED runs "
                            f"{', '.join(finished)} (recorded: {rid}); end the ones that must not count")
        if t.state == RUNNING:
            if t.number in stale:
                problems.append(f"trial {t.number}: RUNNING but stale ({stale[t.number]}); run {rid}")
            elif "worker" not in t.user_attrs and not is_heartbeat_enabled(study._storage):
                problems.append(f"trial {t.number}: RUNNING without a worker attr (started by an older version): "
                                f"whether it is alive cannot be told; run {rid}")
            continue
        if t.state == FAIL:
            live = [f"{r.info.run_id} {r.info.status}" for r in rs if r.info.status in ("RUNNING", "FINISHED")]
            if live:
                problems.append(f"trial {t.number} (FAIL): runs {', '.join(live)} should have ended KILLED")
            continue
        if t.state not in (COMPLETE, PRUNED):
            continue
        run = next((r for r in rs if r.info.run_id == rid), None)
        if run is None:
            problems.append(f"trial {t.number} ({t.state.name}): its run {rid} is not among the study's runs")
            continue
        if run.info.status != "FINISHED":
            problems.append(f"trial {t.number} ({t.state.name}): its run {rid} is {run.info.status}, and lacks "
                            f"{'the trial value as objective' if t.state == COMPLETE else 'a per-epoch metric'} "
                            "to end FINISHED")
        elif t.state == COMPLETE and not _same(run.data.metrics.get("objective"), t.value):
            problems.append(f"trial {t.number} (COMPLETE {t.value}): its run {rid} has objective "
                            f"{run.data.metrics.get('objective')}")
        others = [f"{r.info.run_id} {r.info.status}" for r in rs if r.info.run_id != rid
                  and r.info.status == "RUNNING"]
        if others:
            problems.append(f"trial {t.number} ({t.state.name}, run {rid}): other runs still RUNNING: "
                            f"{', '.join(others)}")
    return problems


def load_study(name: str, storage_arg: str | None) -> optuna.Study:
    """An existing study by name (as ``study`` created it), for ``doctor``; ValueError if there is none (a journal
    file that does not exist is not created)."""
    path = journal_path(storage_arg)
    if path is not None and not path.is_file():
        raise InputError(f"no study {name!r}: the journal {path} does not exist")
    storage = study_storage(storage_arg)
    try:
        return optuna.load_study(study_name=f"study:{name}", storage=storage)
    except KeyError:
        raise InputError(f"no study {name!r} in {storage_url(storage)}") from None


def doctor_study(name: str, storage_arg: str | None, tracking_uri: str | None, fix: bool) -> tuple[list[str], bool]:
    """(lines to print, whether problems remain) for the study ``name``: what align_study changes (or, without
    ``fix``, would change) and what it cannot repair."""
    tracking_uri = resolve_tracking_uri(tracking_uri)
    study = load_study(name, storage_arg)
    changes = align_study(study, None, tracking_uri, fix=fix)
    problems = study_problems(study, None, tracking_uri)
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in {t.state for t in trials}}
    lines = [f"aligned: {c}" if fix else f"would align: {c}" for c in changes]
    lines += [f"problem: {p}" for p in problems]
    lines.append(f"study {name}: trials {states}")
    return lines, bool(problems or (not fix and changes))


# -- workers ---------------------------------------------------------------------------------------------------------

def _work(exp: Experiment, storage_arg: str | None, tracking_uri: str, progress: bool, n_trials: int,
          worker: int = 0) -> None:
    """Claim trial slots and run one trial in each until every slot of the budget is settled: the budget is the
    study's, shared through the claims database by every worker (local, Dask, other machines)."""
    storage = study_storage(storage_arg)
    study = _open(exp, storage, tracking_uri, worker)
    engine, queue = trial_queue(storage, exp.name)
    _queue_trials(study, engine, queue, n_trials)
    parent, me = study.user_attrs["mlflow_parent_run"], claims.worker_identity()
    while True:
        # a trial left RUNNING by a dead worker is settled first (its run decides what it was)
        try:
            for line in settle_stale_trials(study, exp, tracking_uri):
                print(f"study {exp.name}: {line}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001  e.g. the tracking store unreachable for a moment: settled later
            print(f"study {exp.name}: could not settle stale trials now: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
        rows = [r for r in claims.unit_rows(engine, queue) if r["phase"] == TRIAL and r["cell"] < n_trials]
        ready = [r for r in rows if claims.claimable(r, time.time())]
        if not ready:
            if all(r["state"] in (DONE, FAILED) for r in rows):
                return
            time.sleep(POLL_S * random.uniform(0.5, 1.5))  # others hold the rest; a silent one's lease runs out
            continue
        claim = claims.try_claim(engine, ready[0], me)
        if claim is None:  # another worker was first: look again
            continue
        with claim:
            run_trial(study, exp, parent, tracking_uri, me, progress, claim=claim)
        gc.collect()


def _worker_main(path: str, cli_sets: list[str], storage_arg: str | None, tracking_uri: str, n_trials: int,
                 worker: int, workers: int) -> None:
    share_cores(workers)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    _work(load_experiment(path, "study", cli_sets), storage_arg, tracking_uri, False, n_trials, worker)


def finish_parent(study: optuna.Study, exp: Experiment, tracking_uri: str, storage_arg: str | None) -> None:
    """Give the study's parent run what a reader of the UI needs: summary metrics (trials per state, the best
    objective), a description with the objective, the search space, the best trial's run and the way to open the
    study's comparison view and optuna-dashboard, and the study's real duration. Idempotent."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(study.user_attrs["mlflow_parent_run"])
    exp_id = parent.info.experiment_id
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    metrics = {f"summary/n_{state.lower()}": float(n) for state, n in counts.items()}
    best_line = "no trial completed yet"
    try:
        best = study.best_trial
        metrics["summary/best_objective"] = float(best.value)
        run_id = best.user_attrs.get("mlflow_run")
        where = mlflow_ui.run_link(exp_id, run_id, f"trial {best.number}") if run_id else f"trial {best.number}"
        best_line = (f"best: {where}, {exp.spec.objective.aggregate} `{exp.spec.objective.metric}` = {best.value:.4f} "
                     f"with {', '.join(f'`{k}` = {v!r}' for k, v in best.params.items())}")
    except ValueError:  # no completed trial
        pass
    view = mlflow_ui.comparison_view(f"tags.study = '{exp.name}' and tags.kind = 'trial'", [])
    key = mlflow_ui.save_view(client, exp_id, view)
    space = ", ".join(f"`{k}`" for k in exp.spec.search_space)
    storage = f" --storage {storage_arg}" if storage_arg else ""
    note = "\n".join([
        f"**Study `{exp.name}`**: {exp.spec.objective.direction} the {exp.spec.objective.aggregate} value of "
        f"`{exp.spec.objective.metric}` over {space}; trials: "
        f"{', '.join(f'{n} {state.lower()}' for state, n in sorted(counts.items())) or 'none'}.",
        "",
        f"{best_line[0].upper()}{best_line[1:]}.",
        "",
        f"[Compare the trials' runs, per epoch]({mlflow_ui.view_link(exp_id, key)}); the study's own view: "
        f"`python -m experiments dashboard --study {exp.name}{storage}` (optuna-dashboard); the report (when "
        f"written: `python -m experiments report --study {exp.name}`) is under Artifacts, `report/index.html`.",
    ])
    runs = [client.get_run(t.user_attrs["mlflow_run"]).info for t in trials if t.user_attrs.get("mlflow_run")
            and t.state.is_finished()]
    mlflow_ui.update_parent(client, parent, note, metrics, max((r.end_time or 0 for r in runs), default=0))


def finish_design(study, exp: Experiment, claims_db: str, tracking_uri: str, workers: int,
                  scheduler=None, quiet: bool = False) -> dict:
    """After the trials: the best trial's recipes as files, logged on the study's parent run (``design/``), then the
    declared test as its sweep (exactly once, like any sweep: several study processes ending together share it).
    Returns what was made: best trial, recipe files, the confirmation sweep's summary and findings."""
    try:
        best = study.best_trial
    except ValueError:
        return {"best_trial": None, "recipes": {}, "confirm": None, "note": "no trial completed: no best recipe"}
    client = MlflowClient(tracking_uri)
    parent = study.user_attrs["mlflow_parent_run"]
    run_id = best.user_attrs.get("mlflow_run")
    params = client.get_run(run_id).data.params if run_id else {}
    files = {name: best_recipe_file(exp, name, best, params.get(f"design.{name}.content_hash"))
             for name in designed(exp.spec)}
    for path in files.values():
        client.log_artifact(parent, str(path), "design")
    client.set_tag(parent, "design.best_trial", str(best.number))
    out = {"best_trial": best.number, "value": best.value, "recipes": {n: str(p) for n, p in files.items()},
           "confirm": None}
    if exp.spec.confirm is None:
        return out
    path = confirm_sweep_file(exp, best, files)
    client.log_artifact(parent, str(path), "design")
    summary = run_sweep(str(path), exp.cli_sets, workers, claims_db, tracking_uri, progress=False,
                        scheduler=scheduler, quiet=quiet)
    client.set_tag(parent, "design.confirm_sweep", summary["sweep"])
    out["confirm"] = summary
    if not summary["missing"] and not summary["duplicates"]:
        out["findings"] = confirm_findings(tracking_uri, summary["sweep"])
    return out


def run_study(path: str, cli_sets: list[str], n_trials: int | None, workers: int, storage_arg: str | None,
              tracking_uri: str | None, progress: bool = True, scheduler=None, quiet: bool = False) -> dict:
    """Run the study to its trial budget with ``workers`` local processes, or one worker per slot of the Dask cluster
    ``scheduler``; the summary has ``aligned`` (what align_study changed, at the start and at the end) and
    ``problems`` (what is still out of line, see :func:`study_problems`; non-empty: exit non-zero)."""
    exp = load_experiment(path, "study", cli_sets)
    # the study's own datasets first (reused by identity), then, before the study exists anywhere: a bad definition
    # leaves no trial, no run and no storage (the hardware is the workers' own when they run on a Dask cluster)
    needed = [n for n in datasets_read(exp, [exp.config()]) if n not in designed(exp.spec)]  # trials make those
    if needed:
        ensure_datasets(exp, needed, claims_url(storage_arg), workers, scheduler,
                        log=lambda line: print(line, flush=True))
    check_study(exp, machine=scheduler is None)
    storage = study_storage(storage_arg)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    n_trials = n_trials or exp.spec.n_trials
    study = _open(exp, storage, tracking_uri)
    aligned = align_study(study, exp, tracking_uri)
    if scheduler is not None:
        storage_arg = storage_arg or f"journal:{journal_path(None)}"  # the same file for every worker
    engine, queue = trial_queue(storage, exp.name)
    _queue_trials(study, engine, queue, n_trials)
    with QueueProgress(engine, queue, tracking_uri, f"study {exp.name}", exp.spec.objective.metric,
                       enabled=not quiet, select=lambda r: r["phase"] == TRIAL and r["cell"] < n_trials,
                       name=lambda r: f"trial slot {r['cell']}"):
        dispatch(_worker_main, lambda slot, share: (str(Path(path).absolute()), list(cli_sets), storage_arg,
                                                    tracking_uri, n_trials, slot, share),
                 f"study {exp.name}", workers, scheduler,
                 inline=lambda: _work(exp, storage_arg, tracking_uri, progress and quiet, n_trials))
    aligned += align_study(study, exp, tracking_uri)
    problems = study_problems(study, exp, tracking_uri)
    trials = study.get_trials(deepcopy=False)
    by_state = {s.name: sum(t.state == s for t in trials) for s in {t.state for t in trials}}
    best = None
    try:
        best = {"number": study.best_trial.number, "value": study.best_value, "params": study.best_params}
    except ValueError:  # no completed trial
        pass
    outcome = None
    if not problems:
        finish_parent(study, exp, tracking_uri, storage_arg)
        if designed(exp.spec):  # the best recipe, then the declared test of it
            outcome = finish_design(study, exp, claims_url(storage), tracking_uri, workers, scheduler, quiet)
    return {"study": exp.name, "parent_run": study.user_attrs["mlflow_parent_run"], "trials": by_state,
            "best": best, "storage": storage_url(storage), "aligned": aligned, "problems": problems,
            "design": outcome}
