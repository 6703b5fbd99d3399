"""Sweep and study records as tables: MLflow runs (and the Optuna study) -> pandas DataFrames, and the tables and
values derived from them for a report.

A sweep is a parent run tagged ``sweep=<name>, kind=sweep`` whose children (``mlflow.parentRunId``) are cells tagged
``kind=cell, sweep.subset, seed, phase`` (fine-tunes also ``pretrain_run`` = their pretrain run, ``parent_run`` in runs
made before that tag, and ``epoch_offset``: their steps continue the pretrain's epoch count). A study is a parent
run tagged ``study=<name>, kind=study`` (plus ``optuna.storage`` and ``optuna.study_name``) whose children are trials
tagged ``kind=trial, trial=<number>`` with params ``trial.<name>`` and the metric ``objective``.

Only ``collect_sweep`` and ``collect_study`` read anything: every MLflow call goes through an MlflowClient bound to
the resolved URI (the process-wide tracking URI is neither read nor changed). The functions below them are pure.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import ViewType

from hrtem_core.errors import InputError

from . import analysis
from .model_format import EPOCH_OFFSET, LEGACY_PRETRAIN_RUN, PRETRAIN_RUN
from .store import resolve_tracking_uri

PHASES = ("pretrain", "finetune")
MEASURES = {"final": "final epoch", "best": "best epoch (max over epochs)"}
MIN_IMPORTANCE_TRIALS = 2
_OOD_DICE = re.compile(r"^ood/(.+)/dice$")
RUN_COLUMNS = ["run_id", "subset", "seed", "phase", "status", "parent_run", "epochs"]
HISTORY_COLUMNS = ["run_id", "subset", "seed", "phase", "benchmark", "epoch", "dice", "t"]
NON_TARGET = "non-target"  # the mean over the benchmarks other than the fine-tune's target, per epoch
AXIS_PREFIX = "axis:"  # runs.csv column of a declared axis: its level in each run
VALIDATION = "val"  # history rows of val/dice (the validation split of the run's own training data)


# ---------------------------------------------------------------------------------------------------- MLflow reads
def _client(tracking_uri: str | None) -> tuple[str, MlflowClient]:
    uri = resolve_tracking_uri(tracking_uri)
    return uri, MlflowClient(uri)


def _search(client: MlflowClient, filter_string: str) -> list:
    """Runs matching the filter in every active experiment, newest first (a sweep's name is global, not per
    experiment)."""
    ids, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=token)
        ids += [e.experiment_id for e in page]
        if not (token := page.token):
            break
    runs = []
    while ids:
        page = client.search_runs(ids, filter_string, max_results=1000, order_by=["attributes.start_time DESC"],
                                  page_token=token)
        runs += page
        if not (token := page.token):
            break
    return runs


def _literal(value: str) -> str:
    if "'" in value or "\\" in value:  # MLflow's filter grammar has no escape for them
        raise InputError(f"name {value!r}: quotes and backslashes are not supported in sweep/study names")
    return f"'{value}'"


def _parent(client: MlflowClient, uri: str, kind: str, name: str):
    parents = _search(client, f"tags.{kind} = {_literal(name)} AND tags.kind = '{kind}'")
    if not parents:
        known = sorted({r.data.tags.get(kind, "?") for r in _search(client, f"tags.kind = '{kind}'")})
        raise InputError(f"no {kind} named {name!r} in {uri}: no run is tagged {kind}={name}, kind={kind}; "
                         f"{'studies' if kind == 'study' else 'sweeps'} found there: {', '.join(known) or 'none'}")
    if len(parents) > 1:  # a relaunch under the same name: the newest parent is the one being reported
        warnings.warn(f"{len(parents)} parent runs are tagged {kind}={name!r}; reporting the newest, "
                      f"{parents[0].info.run_id} (others: {', '.join(r.info.run_id for r in parents[1:])})")
    return parents[0]


def _children(client: MlflowClient, parent, kind: str, child_kind: str, name: str) -> tuple[list, Counter]:
    """All the parent's children of this kind and their status counts; ValueError unless one FINISHED."""
    pid = parent.info.run_id
    runs = _search(client, f"tags.mlflow.parentRunId = '{pid}' AND tags.kind = '{child_kind}'")
    statuses = Counter(r.info.status for r in runs)
    if not statuses["FINISHED"]:
        found = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or f"no {child_kind} runs at all"
        raise InputError(f"{kind} {name!r} (parent run {pid}) has no FINISHED {child_kind} runs: found {found}")
    return runs, statuses


def _int_or_none(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """step -> value; a step logged twice keeps its latest value."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {int(m.step): float(m.value) for m in points}


def _pretrain_of(run) -> str | None:
    tags = run.data.tags
    return tags.get(PRETRAIN_RUN) or tags.get(LEGACY_PRETRAIN_RUN)


def _epochs(client: MlflowClient, run, steps: list[int] | None = None) -> int | None:
    """Epochs a run trained: its ``epochs`` param (the config), else its last logged step + 1."""
    n = _int_or_none(run.data.params.get("epochs"))
    if n is not None:
        return n
    if steps is None:
        steps = list(_history(client, run.info.run_id, "train/loss"))
    return max(steps) + 1 if steps else None


def collect_sweep(tracking_uri: str | None, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, history) of a sweep's FINISHED cell runs.

    runs: one row per run: run_id, subset (tag ``sweep.subset``), seed (int), phase, status, parent_run (pretrain run
    of a fine-tune, else None), epochs, and per benchmark ``final/<b>`` (ood/<b>/dice at the last logged epoch),
    ``best/<b>`` (its maximum over epochs) and ``best_epoch/<b>``.
    history: long format, one row per run, benchmark and logged epoch: run_id, subset, seed, phase, benchmark, epoch,
    dice, t — t is the epoch for a pretrain and (its parent's pretrain epochs) + epoch for a fine-tune, so both phases
    share one axis (NaN, with a warning, when the parent is unknown).
    Benchmarks are whatever ``ood/<b>/dice`` metrics the runs logged, ``mean`` (ood/mean/dice) included. A cell with
    several FINISHED runs is an error naming them: a seed counted twice would shift every statistic.
    ``runs.attrs``: parent_run_id, tracking_uri, cell_statuses (status -> count over all cells, finished or not).
    """
    uri, client = _client(tracking_uri)
    parent = _parent(client, uri, "sweep", name)
    cells, statuses = _children(client, parent, "sweep", "cell", name)
    cells = [r for r in cells if r.info.status == "FINISHED"]
    duplicates = _duplicated_cells(cells)
    if duplicates:  # one seed counted twice would shift every statistic: no report until the record is repaired
        raise InputError(f"sweep {name!r} has more than one FINISHED run for a (cell, seed, phase): " + "; ".join(
            f"{group}/s{seed}:{phase}: {', '.join(ids)}" for (group, seed, phase), ids in duplicates.items())
            + f". `python -m experiments doctor --sweep {name}` lists them; end the runs that must not count "
            "(e.g. MlflowClient().set_terminated(run_id, 'KILLED')) and report again")
    declared = _declared(client, parent)
    target = declared.get("target")
    by_id = {r.info.run_id: r for r in cells}
    rows, hist, epochs, refs = [], [], {}, {}
    for r in cells:
        tags = r.data.tags
        phase = _phase(tags)
        row = dict(run_id=r.info.run_id, subset=tags.get("sweep.subset", tags.get("subset")),
                   seed=_int_or_none(tags.get("seed")), phase=phase, status=r.info.status,
                   parent_run=_pretrain_of(r) if tags.get("phase") == "finetune" else None,
                   group=tags.get("sweep.group") or tags.get("sweep.subset", tags.get("subset")),
                   variant=tags.get("sweep.variant"))
        row.update({f"{AXIS_PREFIX}{k.removeprefix('sweep.axis.')}": v for k, v in tags.items()
                    if k.startswith("sweep.axis.")})
        steps = []
        shift = _int_or_none(tags.get(EPOCH_OFFSET)) or 0  # logged step = epoch_offset + epoch
        curves = {}
        for b in sorted(m.group(1) for k in r.data.metrics if (m := _OOD_DICE.match(k))):
            points = {s - shift: v for s, v in _history(client, r.info.run_id, f"ood/{b}/dice").items()}
            if points:
                curves[b] = points
        others = [b for b in curves if b not in ("mean", target)]
        if target is not None and others:  # the mean over the non-target benchmarks, epoch by epoch
            common = set.intersection(*(set(curves[b]) for b in others))
            curves[NON_TARGET] = {s: float(np.mean([curves[b][s] for b in others])) for s in sorted(common)}
        for b, points in curves.items():
            steps += points
            last, best = max(points), max(points, key=lambda s: (points[s], -s))  # earliest epoch among ties
            row.update({f"final/{b}": points[last], f"best/{b}": points[best], f"best_epoch/{b}": best})
            hist += [dict(run_id=r.info.run_id, subset=row["subset"], seed=row["seed"], phase=row["phase"],
                          benchmark=b, epoch=s, dice=v) for s, v in points.items()]
        # the simulated validation set (the pretrain's; a fine-tune's is its own data's), for the dynamics figure
        val = {s - shift: v for s, v in _history(client, r.info.run_id, "val/dice").items()}
        hist += [dict(run_id=r.info.run_id, subset=row["subset"], seed=row["seed"], phase=row["phase"],
                      benchmark=VALIDATION, epoch=s, dice=v) for s, v in val.items()]
        if r.data.params.get("benchmarks"):
            refs.setdefault(row["phase"], r.data.params["benchmarks"])
        row["epochs"] = epochs[r.info.run_id] = _epochs(client, r, steps)
        rows.append(row)
    def offset(run_id: str) -> float:
        """Where a fine-tune's epoch 0 lies on the t axis: after all of its parent's epochs."""
        parent_id = _pretrain_of(by_id[run_id])
        if not parent_id:
            return np.nan
        if parent_id not in epochs:  # the pretrain is not a finished cell of this sweep: ask MLflow
            try:
                epochs[parent_id] = _epochs(client, client.get_run(parent_id))
            except Exception:  # noqa: BLE001  deleted or unreadable: t unknown, said below
                epochs[parent_id] = None
        return np.nan if epochs[parent_id] is None else float(epochs[parent_id])

    runs = pd.DataFrame(rows)
    for c in RUN_COLUMNS:
        runs[c] = runs.get(c)
    found = sorted({c.split("/", 1)[1] for c in runs.columns if c.startswith("final/")})
    metric_cols = [f"{m}/{b}" for b in found for m in ("final", "best", "best_epoch")]
    decay_cols = _fine_tune_decay(runs, found)
    extra = [c for c in ("group", "variant") if runs[c].notna().any() and not runs[c].equals(runs["subset"])]
    axis_cols = sorted(c for c in runs.columns if c.startswith(AXIS_PREFIX))
    runs = _order(runs[RUN_COLUMNS + extra + axis_cols + metric_cols + decay_cols], declared.get("phases"))
    history = pd.DataFrame(hist, columns=HISTORY_COLUMNS[:-1])
    offsets = {rid: 0.0 if by_id[rid].data.tags.get("phase") != "finetune" else offset(rid) for rid in by_id}
    history["t"] = history["epoch"] + history["run_id"].map(offsets).astype(float)
    lost = sorted(history.loc[history["t"].isna(), "run_id"].unique())
    if lost:
        warnings.warn(f"fine-tune runs without a readable parent pretrain, left off the time axis: {', '.join(lost)}")
    group = runs.set_index("run_id")["group"] if "group" in runs.columns else None
    if group is not None:
        history.insert(2, "group", history["run_id"].map(group))
    history = _order(history, declared.get("phases"))  # stable: each run's rows stay by benchmark, then epoch
    runs.attrs = dict(parent_run_id=parent.info.run_id, tracking_uri=uri, cell_statuses=dict(statuses),
                      declared=declared, benchmark_refs=_benchmark_refs(refs))
    # for links to the MLflow UI: each run's experiment (the last column of runs.csv) and the parent's
    runs["experiment_id"] = runs["run_id"].map({r.info.run_id: r.info.experiment_id for r in cells})
    runs.attrs["experiment_id"] = parent.info.experiment_id
    return runs, history


def _phase(tags: dict) -> str | None:
    """A run's phase in the report: pretrain, finetune, or ``finetune:<variant>`` for a named fine-tune variant."""
    phase, variant = tags.get("phase"), tags.get("sweep.variant")
    return f"finetune:{variant}" if phase == "finetune" and variant else phase


def _fine_tune_decay(runs: pd.DataFrame, benchmarks: list[str]) -> list[str]:
    """Adds, for every fine-tune run and benchmark, what fine-tuning did to it: ``ft_peak/<b>``, the best Dice from
    the start of fine-tuning (its pretrained model's final Dice, epoch 0) through its epochs (1 = after the first);
    ``ft_peak_epoch/<b>``, where that peak was; ``ft_drop/<b>``, the peak minus the final Dice (the decay: 0 when
    the last epoch is the best). The column names added, in order."""
    final = runs.set_index("run_id")
    added = []
    ft = runs["phase"].fillna("").str.startswith("finetune")
    for b in benchmarks:
        if f"best/{b}" not in runs.columns:
            continue
        start = runs["parent_run"].map(final[f"final/{b}"]) if f"final/{b}" in final else np.nan
        best, best_epoch, last = runs[f"best/{b}"], runs[f"best_epoch/{b}"], runs[f"final/{b}"]
        from_start = start >= best  # the pretrained model was at least as good as any fine-tuned epoch
        peak = np.where(from_start, start, best)
        runs[f"ft_peak/{b}"] = np.where(ft, peak, np.nan)
        runs[f"ft_peak_epoch/{b}"] = np.where(ft & best.notna(), np.where(from_start, 0, best_epoch + 1), np.nan)
        runs[f"ft_drop/{b}"] = np.where(ft, peak - last, np.nan)
        added += [f"ft_peak/{b}", f"ft_peak_epoch/{b}", f"ft_drop/{b}"]
    return added


def _declared(client: MlflowClient, parent) -> dict:
    """What the sweep declared when it was registered (logged on its parent run before any cell ran): its
    ``comparisons``, their ``alpha`` and the fine-tune's ``target`` benchmark. The report judges these, never the
    ones in a sweep file edited since. Empty for a sweep without a logged definition."""
    import tempfile

    import yaml

    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    with tempfile.TemporaryDirectory() as tmp:
        shown = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
        os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"  # one small file: no progress bar
        try:
            path = client.download_artifacts(parent.info.run_id, "sweep/definition.yaml", tmp)
        except Exception:  # noqa: BLE001  a sweep registered before definitions were logged: nothing declared
            return {}
        finally:
            if shown is None:
                os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
            else:
                os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = shown
        definition = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(definition, dict):
        return {}
    finetune = definition.get("finetune")
    variants = finetune if isinstance(finetune, list) else None
    target = (variants[0] if variants else finetune or {}).get("target")
    phases = ["pretrain", *([f"finetune:{v.get('name')}" for v in variants] if variants else ["finetune"])]
    return {"comparisons": list(definition.get("comparisons") or []),
            "alpha": float(definition.get("alpha", analysis.ALPHA)), "target": target, "phases": phases,
            "definition": definition}


def _benchmark_refs(refs: dict[str, str]) -> list[dict]:
    """The benchmarks the pretrain runs were scored on (name, path, filter, max_samples), from their params."""
    text = refs.get("pretrain") or next(iter(refs.values()), None)
    try:
        return list(json.loads(text)) if text else []
    except ValueError:
        return []


def _duplicated_cells(runs: list) -> dict[tuple, list[str]]:
    """(cell group, seed, phase) -> run ids, for every unit with more than one of the given runs."""
    by_cell: dict[tuple, list[str]] = {}
    for r in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        t = r.data.tags
        group = t.get("sweep.group") or t.get("sweep.subset", t.get("subset"))
        by_cell.setdefault((group, t.get("seed"), _phase(t)), []).append(r.info.run_id)
    return {k: ids for k, ids in by_cell.items() if len(ids) > 1}



def _order(df: pd.DataFrame, phases: list[str] | None = None) -> pd.DataFrame:
    """subset (then cell group), then the phases in their declared order (pretrain first), then seed."""
    if df.empty:
        return df.reset_index(drop=True)
    phases = list(phases or PHASES)
    rank = df["phase"].map({p: i for i, p in enumerate(phases)}).fillna(len(phases))
    keys = ["subset", *(["group"] if "group" in df.columns else []), "_rank", "seed"]
    return (df.assign(_rank=rank).sort_values(keys, kind="stable", na_position="last")
            .drop(columns="_rank").reset_index(drop=True))


def _optuna_storage(url: str):
    """The Optuna storage a study parent's ``optuna.storage`` tag names: a database URL as it is, ``journal:PATH``
    as Optuna's journal file (read where it lies; a missing file is an error, not a new empty journal)."""
    import optuna

    if not url.startswith("journal:"):
        return url
    path = Path(url.removeprefix("journal:"))
    if not path.is_file():
        raise FileNotFoundError(f"the journal file {path} does not exist here")
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def collect_study(tracking_uri: str | None, name: str):
    """(trials, optuna_study) of a study.

    trials: one row per trial run (any status), ordered by trial number: run_id, trial, status (MLflow), state
    (Optuna's, when the study loads), objective (metric ``objective``; NaN if not logged), then the ``trial.*``
    params (numbers where they parse). optuna_study: the Optuna study loaded from the parent's ``optuna.storage`` /
    ``optuna.study_name`` tags, or None when it cannot be loaded (the reason is in ``trials.attrs['notes']``).
    ``trials.attrs``: parent_run_id, tracking_uri, direction ('maximize'/'minimize'/None), notes.
    Raises ValueError unless at least one FINISHED trial run logged an objective.
    """
    import optuna

    uri, client = _client(tracking_uri)
    parent = _parent(client, uri, "study", name)
    runs, _ = _children(client, parent, "study", "trial", name)
    trials = pd.DataFrame([dict(run_id=r.info.run_id, trial=_int_or_none(r.data.tags.get("trial")),
                                status=r.info.status, objective=r.data.metrics.get("objective", np.nan),
                                **{k: v for k, v in r.data.params.items() if k.startswith("trial.")})
                           for r in runs])
    for c in [c for c in trials.columns if c.startswith("trial.")]:
        try:
            trials[c] = pd.to_numeric(trials[c])
        except (ValueError, TypeError):
            pass  # categorical parameter: keep the strings
    trials = trials.sort_values(["trial", "run_id"], kind="stable", na_position="last").reset_index(drop=True)
    if not (trials["status"].eq("FINISHED") & trials["objective"].notna()).any():
        raise InputError(f"study {name!r} (parent run {parent.info.run_id}) has FINISHED trial runs but none "
                         f"logged the metric 'objective'")
    notes, study, direction = [], None, None
    storage, study_name = parent.data.tags.get("optuna.storage"), parent.data.tags.get("optuna.study_name")
    if storage and study_name:
        try:
            study = optuna.load_study(study_name=study_name, storage=_optuna_storage(storage))
        except Exception as exc:  # noqa: BLE001  e.g. a storage only the launching machine can reach
            notes.append(f"the Optuna study {study_name!r} could not be loaded from {storage}: "
                         f"{type(exc).__name__}: {exc}")
    else:
        notes.append("the study parent run has no optuna.storage / optuna.study_name tags")
    trials.insert(3, "state", None)
    if study is not None:
        states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
        trials["state"] = trials["trial"].map(states)
        if len(study.directions) == 1:
            direction = study.direction.name.lower()
        else:
            notes.append(f"multi-objective study ({len(study.directions)} objectives): no best-so-far line")
    trials.attrs = dict(parent_run_id=parent.info.run_id, tracking_uri=uri, direction=direction, notes=notes,
                        storage=storage, study_name=study_name)
    # for links to the MLflow UI: each trial run's experiment (the last column) and the parent's
    trials["experiment_id"] = trials["run_id"].map({r.info.run_id: r.info.experiment_id for r in runs})
    trials.attrs["experiment_id"] = parent.info.experiment_id
    return trials, study



# ---------------------------------------------------------------------------------------------------- derived (pure)
def benchmarks(runs: pd.DataFrame) -> list[str]:
    """The benchmarks of a sweep's runs table: ``mean`` (ood/mean/dice, the sweep's default objective) first."""
    return sorted((c.split("/", 1)[1] for c in runs.columns if c.startswith("final/")), key=lambda b: (b != "mean", b))


def benchmark_tables(runs: pd.DataFrame, benchmark: str, method: str, correction: str
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, tests) of one benchmark, for each measure (final, best).

    summary: one row per (measure, subset, phase), the columns of ``analysis.summarize`` over seeds. tests: the
    pairwise comparisons between subsets within each phase and measure (``analysis.pairwise_tests`` with ``method``
    and ``correction``), with the two medians; empty when there is nothing to compare.
    """
    summary, tests = [], []
    for measure in MEASURES:
        col = f"{measure}/{benchmark}"
        for (subset, phase), g in runs.groupby(["subset", "phase"], sort=False):
            summary.append(dict(benchmark=benchmark, measure=measure, subset=subset, phase=phase,
                                **analysis.summarize(g[col])))
        for phase in [p for p in PHASES if (runs["phase"] == p).any()]:
            sel = runs[runs["phase"] == phase]
            groups = {s: sel.loc[sel["subset"] == s, col] for s in sorted(sel["subset"].dropna().unique())}
            t = analysis.pairwise_tests(groups, method=method, correction=correction)
            t.insert(0, "measure", measure)
            t.insert(0, "phase", phase)
            t.insert(0, "benchmark", benchmark)
            t.insert(t.columns.get_loc("n_b") + 1, "median_a", [np.nanmedian(groups[a]) for a in t["a"]])
            t.insert(t.columns.get_loc("median_a") + 1, "median_b", [np.nanmedian(groups[x]) for x in t["b"]])
            tests.append(t)
    return pd.DataFrame(summary), pd.concat(tests, ignore_index=True) if tests else pd.DataFrame()


def underpowered(tests: pd.DataFrame) -> list[tuple[int, int]]:
    """The (n_a, n_b) seed counts among the tests for which no exact two-sided test can reach ``analysis.ALPHA``."""
    if not len(tests):
        return []
    return sorted({(int(r.n_a), int(r.n_b)) for r in tests.itertuples()
                   if r.n_a and r.n_b and analysis.min_attainable_p(r.n_a, r.n_b) >= analysis.ALPHA})


def completed(trials: pd.DataFrame) -> pd.Series:
    """Finished runs with an objective, and COMPLETE in Optuna where that is known (a pruned trial's run FINISHES)."""
    return (trials["status"].eq("FINISHED") & trials["objective"].notna()
            & (trials["state"].isna() | trials["state"].eq("COMPLETE")))



def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The completed trial with the best objective, when the study's direction is known."""
    done = trials[completed(trials)]
    direction = trials.attrs.get("direction")
    if direction not in ("maximize", "minimize") or not len(done):
        return None
    return done.loc[done["objective"].idxmax() if direction == "maximize" else done["objective"].idxmin()]


def param_importances(study, min_trials: int = MIN_IMPORTANCE_TRIALS) -> tuple[dict[str, float], str | None]:
    """(importances, None), or ({}, why not) when they cannot be computed meaningfully."""
    import optuna

    if study is None:
        return {}, "no Optuna study loaded"
    n = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if n < min_trials:
        return {}, f"{n} completed trial{'s' if n != 1 else ''}; at least {min_trials} are needed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except Exception as exc:  # noqa: BLE001  e.g. no parameters shared by the completed trials
            return {}, f"{type(exc).__name__}: {exc}"
    equal = [str(w.message) for w in caught if "importances will be equal" in str(w.message).lower()]
    if equal:  # Optuna's fallback is a uniform answer, which would look like a result
        return {}, equal[0]
    if not importances:
        return {}, "the completed trials have no parameters"
    return importances, None



__all__ = ["collect_sweep", "collect_study", "declared_findings", "benchmarks", "benchmark_tables", "underpowered", "completed",
           "best_trial", "param_importances"]


def level_name(item) -> str:
    """What a level of an axis is called when it is written as a plain value (numbers, strings, booleans as in
    YAML): the sweep file's ``experiments.specs`` and the report name levels alike."""
    if isinstance(item, dict) and set(item) == {"name", "value"}:
        return str(item["name"])
    return ("true" if item else "false") if isinstance(item, bool) else str(item)


class _Dims:
    """The dimensions of a recorded sweep (subset, each axis, finetune) as its definition declared them, for
    resolving the groups of its comparisons against the runs' columns."""

    def __init__(self, definition: dict):
        self.definition = definition
        finetune = definition.get("finetune")
        phases = ["none"] + ([str(v.get("name")) for v in finetune] if isinstance(finetune, list)
                             else ["finetune"] if finetune else [])
        self.levels = {"subset": [str(s.get("name")) for s in definition.get("subsets") or []],
                       **{k: [level_name(i) for i in items] for k, items in (definition.get("axes") or {}).items()},
                       "finetune": phases}
        self.values = {k: {level_name(i): (i["value"] if isinstance(i, dict) and "value" in i else i) for i in items}
                       for k, items in (definition.get("axes") or {}).items()}

    def name(self, key: str, level) -> str:
        if key == "finetune" and level == "pretrain":
            return "none"
        text = level_name(level)
        if key in self.values and text not in self.values[key]:
            text = next((n for n, v in self.values[key].items() if v == level), text)
        return text

    def selector(self, group) -> dict[str, str]:
        if isinstance(group, str):
            subset, _, phase = group.partition("/")
            group = {"subset": subset, "finetune": phase or "none"}
        out = {k: self.name(k, v) for k, v in group.items()}
        out.setdefault("finetune", "none")
        return out

    def groups(self, c: dict) -> list[dict[str, str]]:
        if not c.get("axis"):
            return [self.selector(c["a"]), self.selector(c["b"])]
        fixed = self.selector(c.get("where") or {})
        axis = c["axis"]
        levels = [self.name(axis, lv) for lv in c["levels"]] if c.get("levels") else list(self.levels.get(axis, []))
        return [{**fixed, axis: lv} for lv in levels]


def _label(sel: dict[str, str]) -> str:
    """A group in words: ``all (fine-tuned n8)``, ``all, optim.lr=0.001``."""
    parts = [sel["subset"]] if "subset" in sel else []
    parts += [f"{k}={v}" for k, v in sel.items() if k not in ("subset", "finetune")]
    text = ", ".join(parts) or "all cells"
    phase = sel.get("finetune", "none")
    return text if phase == "none" else f"{text} (fine-tuned{'' if phase == 'finetune' else ' ' + phase})"


def _select(runs: pd.DataFrame, sel: dict[str, str]) -> pd.DataFrame:
    keep = pd.Series(True, index=runs.index)
    for key, level in sel.items():
        if key == "finetune":
            phase = "pretrain" if level == "none" else "finetune" if level == "finetune" else f"finetune:{level}"
            keep &= runs["phase"] == phase
        elif key == "subset":
            keep &= runs["subset"] == level
        else:
            col = f"{AXIS_PREFIX}{key}"
            keep &= (runs[col] == level) if col in runs.columns else False
    return runs[keep]


def _column(sel: dict[str, str], benchmark: str, statistic: str) -> str:
    if statistic == "final":
        return f"final/{benchmark}"
    if statistic == "peak":
        return f"best/{benchmark}" if sel.get("finetune", "none") == "none" else f"ft_peak/{benchmark}"
    return f"ft_drop/{benchmark}"


def _values(runs: pd.DataFrame, sel: dict[str, str], benchmark: str, statistic: str = "final") -> pd.Series:
    """A group's values (``statistic`` of ``benchmark``), indexed by what pairs runs of otherwise equal cells: the
    seed and the level of every dimension the group leaves open."""
    rows = _select(runs, sel)
    col = _column(sel, benchmark, statistic)
    if col not in rows.columns or rows.empty:
        return pd.Series(dtype=float)
    open_dims = [c for c in runs.columns if c.startswith(AXIS_PREFIX) and c.removeprefix(AXIS_PREFIX) not in sel]
    if "subset" not in sel:
        open_dims.insert(0, "subset")
    index = pd.MultiIndex.from_frame(rows[["seed", *open_dims]]) if open_dims else rows["seed"]
    return pd.Series(rows[col].astype(float).to_numpy(), index=index).sort_index()


_STATISTIC_WORDS = {"final": "final-epoch Dice", "peak": "peak Dice", "drop": "drop from the peak to the final Dice"}


def findings(runs: pd.DataFrame, comparisons: list[dict], correction: str = "holm", alpha: float = analysis.ALPHA,
             definition: dict | None = None) -> pd.DataFrame:
    """The declared comparisons judged on the runs: ``analysis.declared_tests`` plus the groups, the benchmark, the
    hypothesis and a plain sentence saying what the numbers say. Paired (wilcoxon) groups are matched by seed within
    otherwise equal cells; a trend's groups are the levels of its axis, lowest first. ``definition``: the sweep's
    logged definition (its subsets, axes and fine-tune variants: how a selector's levels are named)."""
    if not comparisons:
        return pd.DataFrame()
    dims = _Dims(definition or {"subsets": [{"name": s} for s in runs["subset"].dropna().unique()],
                                "finetune": {} if (runs["phase"] == "finetune").any() else None})
    inputs, described = [], []
    for c in comparisons:
        test, statistic, benchmark = c.get("test", "mannwhitney"), c.get("statistic", "final"), c["benchmark"]
        groups = dims.groups(c)
        values = [_values(runs, g, benchmark, statistic) for g in groups]
        if c.get("axis"):
            inputs.append(dict(name=c["name"], test=test, groups=[v.to_numpy() for v in values],
                               alternative=c.get("alternative", "two-sided")))
            described.append((f"{c['axis']}: " + " → ".join(g[c["axis"]] for g in groups),
                              _label({k: v for k, v in groups[0].items() if k != c["axis"]})))
            continue
        a, b = values
        if test == "wilcoxon":
            keys = sorted(set(a.index) & set(b.index))
            a, b = a.reindex(keys), b.reindex(keys)
        inputs.append(dict(name=c["name"], test=test, a=a.to_numpy(), b=b.to_numpy()))
        described.append((_label(groups[0]), _label(groups[1])))
    df = analysis.declared_tests(inputs, correction=correction, alpha=alpha)
    df.insert(1, "a", [d[0] for d in described])
    df.insert(2, "b", [d[1] for d in described])
    df.insert(3, "benchmark", [c["benchmark"] for c in comparisons])
    df.insert(4, "measure", [c.get("statistic", "final") for c in comparisons])
    df["hypothesis"] = [c.get("hypothesis", "") for c in comparisons]
    adjusted = f"{correction.capitalize() if correction == 'holm' else correction}-adjusted over {len(df)}"
    sentences = []
    for c, r, (la, lb) in zip(comparisons, df.itertuples(), described):
        bench = c["benchmark"]
        where = ("the mean over benchmarks" if bench == "mean" else "the mean over the non-target benchmarks"
                 if bench == NON_TARGET else bench)
        what = _STATISTIC_WORDS[c.get("statistic", "final")]
        verdict = f"significant at {alpha:g}" if r.significant else f"not significant at {alpha:g}"
        if np.isnan(r.effect) or np.isnan(r.p_value):
            sentences.append(f"{la} vs {lb} on {where}: not enough finished runs to test ({r.n_a} and {r.n_b}).")
            continue
        if c.get("axis"):
            trend = "rises" if r.effect > 0 else "falls" if r.effect < 0 else "does not change"
            name = "Jonckheere-Terpstra" if r.test == "jonckheere" else "Spearman permutation"
            sentences.append(f"The {what} on {where} {trend} along {la} ({lb}): Theil-Sen slope {r.effect:+.3f} "
                             f"per level, 95 % CI [{r.ci_lo:+.3f}, {r.ci_hi:+.3f}]; mean {r.mean_a:.3f} at the "
                             f"lowest level, {r.mean_b:.3f} at the highest; p = {r.p_adjusted:.3g} ({name}, "
                             f"{c.get('alternative', 'two-sided')}, {adjusted}): {verdict}.")
            continue
        direction = "higher" if r.effect > 0 else "lower" if r.effect < 0 else "no different"
        amount = f"{abs(r.effect):.3f} {direction}" if r.effect else "no different"
        sentences.append(f"{la} scores {amount} than {lb} on {where} ({what}: mean {r.mean_a:.3f} vs "
                         f"{r.mean_b:.3f}; difference {r.effect:+.3f}, 95 % CI [{r.ci_lo:+.3f}, {r.ci_hi:+.3f}]), p = "
                         f"{r.p_adjusted:.3g} ({'paired Wilcoxon' if r.test == 'wilcoxon' else 'Mann-Whitney U'}, "
                         f"{adjusted}): {verdict}.")
    df["finding"] = sentences
    return df


def declared_findings(runs: pd.DataFrame, correction: str = "holm") -> pd.DataFrame:
    """:func:`findings` of the comparisons a recorded sweep declared (``runs.attrs['declared']``, as
    :func:`collect_sweep` reads them), at its declared alpha."""
    declared = runs.attrs.get("declared") or {}
    return findings(runs, declared.get("comparisons") or [], correction, declared.get("alpha", analysis.ALPHA),
                    declared.get("definition"))


def decay_table(runs: pd.DataFrame) -> pd.DataFrame:
    """What fine-tuning did to every benchmark, per cell group and fine-tune phase (variant): the mean over seeds of
    the peak Dice during fine-tuning (from the pretrained model's final Dice on), the epoch of the peak, the final
    Dice and the drop from the peak to the final epoch (the decay), with the number of runs."""
    ft = runs[runs["phase"].fillna("").str.startswith("finetune")]
    benchmarks = [c.removeprefix("ft_drop/") for c in runs.columns if c.startswith("ft_drop/")]
    key = "group" if "group" in runs.columns else "subset"
    rows = []
    for (group, phase), g in ft.groupby([key, "phase"], sort=False):
        for b in benchmarks:
            drop = g[f"ft_drop/{b}"].dropna()
            if drop.empty:
                continue
            rows.append(dict(group=group, phase=phase, benchmark=b, n=len(drop),
                             peak=float(g[f"ft_peak/{b}"].mean()), peak_epoch=float(g[f"ft_peak_epoch/{b}"].mean()),
                             final=float(g[f"final/{b}"].mean()), drop=float(drop.mean()),
                             drop_max=float(drop.max())))
    return pd.DataFrame(rows, columns=["group", "phase", "benchmark", "n", "peak", "peak_epoch", "final", "drop",
                                       "drop_max"])


def baseline_table(runs: pd.DataFrame, baseline: dict[str, dict]) -> pd.DataFrame:
    """Per benchmark: the classical baseline (tuned on the benchmark) next to every subset and phase's final Dice
    (mean and minimum over seeds), and whether every model of the group beats it."""
    rows = []
    for b, base in baseline.items():
        col = f"final/{b}"
        if col not in runs.columns:
            continue
        for (subset, phase), g in runs.groupby(["subset", "phase"], sort=False):
            values = g[col].dropna()
            rows.append(dict(benchmark=b, subset=subset, phase=phase, n=len(values),
                             model_mean=float(values.mean()) if len(values) else np.nan,
                             model_min=float(values.min()) if len(values) else np.nan,
                             baseline=base["dice"], baseline_sigma_px=base["sigma_px"],
                             baseline_polarity=base["polarity"],
                             all_beat_baseline=bool(len(values)) and bool((values > base["dice"]).all())))
    return pd.DataFrame(rows)
