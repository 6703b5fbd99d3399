"""Optuna studies over hyperparameters and data curation.

Each trial samples the search space (dotted config keys: ``optim.lr``, ``data.batch_size``, ``data.train.0.weight``,
``data.train.0.max_samples``, a curation filter through a template...), trains one model as an MLflow child run of
the study's run, and returns the configured aggregate of a per-epoch metric (default: final ``ood/mean/dice``).
optuna-integration's Lightning callback reports that metric every epoch and prunes unpromising trials. A trial that
fails is recorded (FAILED run, FAIL trial) and the study goes on. Workers — local processes or other machines on
the same storage — share the trial budget through Optuna's own ``MaxTrialsCallback``.
"""

from __future__ import annotations

import multiprocessing as mp

import optuna
from mlflow import MlflowClient

from mlplatform.tracking import get_or_create_experiment, resolve_tracking_uri
from mlplatform.train import train

from .specs import Experiment, Param, load_experiment
from .storage import storage_url, study_storage
from .sweep import share_cores

optuna.logging.set_verbosity(optuna.logging.WARNING)


def suggest(trial: optuna.Trial, name: str, p: Param):
    if p.type == "float":
        return trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    if p.type == "categorical":
        return trial.suggest_categorical(name, p.choices)
    return p.template.format(**{k: suggest(trial, f"{name}.{k}", sub) for k, sub in p.params.items()})


def _pruner(exp: Experiment):
    p = exp.spec.pruner
    if p.kind == "none":
        return optuna.pruners.NopPruner()
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                           n_warmup_steps=p.n_warmup_steps)


def _open(exp: Experiment, storage, tracking_uri: str, worker: int = 0) -> optuna.Study:
    spec = exp.spec
    name = f"study:{exp.name}"
    # one seed per worker: workers with the same seed would propose the same trials
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                direction=spec.objective.direction, pruner=_pruner(exp),
                                sampler=optuna.samplers.TPESampler(seed=spec.sampler_seed + worker))
    if "mlflow_parent_run" not in study.user_attrs:
        client = MlflowClient(tracking_uri)
        exp_id = get_or_create_experiment(exp.config().tracking.experiment, tracking_uri)
        parent = client.create_run(exp_id, run_name=f"study-{exp.name}", tags={
            "study": exp.name, "kind": "study", "optuna.storage": storage_url(storage), "optuna.study_name": name,
            "study.fingerprint": exp.fingerprint()})
        client.log_dict(parent.info.run_id, spec.model_dump(mode="json"), "study/definition.yaml")
        client.set_terminated(parent.info.run_id, "FINISHED")  # a container: the trials are its children
        study.set_user_attr("mlflow_parent_run", parent.info.run_id)
        study.set_user_attr("fingerprint", exp.fingerprint())
    if study.user_attrs.get("fingerprint") != exp.fingerprint():
        raise ValueError(f"study {exp.name!r} already exists in {storage_url(storage)} with a different definition; "
                         "give the changed study a new name")
    return study


def make_objective(exp: Experiment, parent: str, tracking_uri: str, progress: bool):
    from optuna_integration import PyTorchLightningPruningCallback

    spec = exp.spec
    client = MlflowClient(tracking_uri)

    def objective(trial: optuna.Trial) -> float:
        sampled = {key: suggest(trial, key, p) for key, p in spec.search_space.items()}
        config = exp.config(sampled, {"tracking.run_name": f"{exp.name}-trial{trial.number}"})
        pruning = PyTorchLightningPruningCallback(trial, monitor=spec.objective.metric)
        run_id = train(config, tracking_uri=tracking_uri, progress=progress, nest_under=parent,
                       extra_tags={"study": exp.name, "kind": "trial", "trial": str(trial.number)},
                       extra_params={f"trial.{k}": v for k, v in sampled.items()},
                       callbacks=[pruning], stop_exceptions=(optuna.TrialPruned,))
        trial.set_user_attr("mlflow_run", run_id)
        history = sorted(client.get_metric_history(run_id, spec.objective.metric), key=lambda m: m.step)
        if not history:
            raise ValueError(f"trial {trial.number}: run {run_id} logged no {spec.objective.metric!r}")
        values = [m.value for m in history]
        better = max if spec.objective.direction == "maximize" else min
        value = values[-1] if spec.objective.aggregate == "final" else better(values)
        client.log_metric(run_id, "objective", value)
        return value

    return objective


def _work(exp: Experiment, storage_arg: str | None, tracking_uri: str, progress: bool, n_trials: int,
          worker: int = 0) -> None:
    storage = study_storage(storage_arg)
    study = _open(exp, storage, tracking_uri, worker)
    objective = make_objective(exp, study.user_attrs["mlflow_parent_run"], tracking_uri, progress)
    # running trials count too: two workers finishing at once must not both start one more
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL,
              optuna.trial.TrialState.RUNNING)
    # the budget is the study's, shared by every worker on this storage
    study.optimize(objective, catch=(Exception,), gc_after_trial=True,
                   callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=states)])


def _worker_main(path: str, cli_sets: list[str], storage_arg: str | None, tracking_uri: str, n_trials: int,
                 worker: int, workers: int) -> None:
    share_cores(workers)
    _work(load_experiment(path, "study", cli_sets), storage_arg, tracking_uri, False, n_trials, worker)


def run_study(path: str, cli_sets: list[str], n_trials: int | None, workers: int, storage_arg: str | None,
              tracking_uri: str | None, progress: bool = True) -> dict:
    exp = load_experiment(path, "study", cli_sets)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    n_trials = n_trials or exp.spec.n_trials
    storage = study_storage(storage_arg)
    study = _open(exp, storage, tracking_uri)
    if workers <= 1:
        _work(exp, storage_arg, tracking_uri, progress, n_trials)
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.starmap(_worker_main, [(str(path), list(cli_sets), storage_arg, tracking_uri, n_trials, w, workers)
                                        for w in range(workers)])
    trials = study.get_trials(deepcopy=False)
    by_state = {s.name: sum(t.state == s for t in trials) for s in {t.state for t in trials}}
    best = None
    try:
        best = {"number": study.best_trial.number, "value": study.best_value, "params": study.best_params}
    except ValueError:  # no completed trial
        pass
    return {"study": exp.name, "parent_run": study.user_attrs["mlflow_parent_run"], "trials": by_state,
            "best": best, "storage": storage_url(storage)}
