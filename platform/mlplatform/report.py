"""Reports on sweeps and studies: MLflow runs -> DataFrames -> figures, CSV tables and one HTML page.

A sweep is a parent run tagged ``sweep=<name>, kind=sweep`` whose children (``mlflow.parentRunId``) are cells tagged
``kind=cell, sweep.subset, seed, phase`` (fine-tunes also ``parent_run`` = their pretrain run). A study is a parent
run tagged ``study=<name>, kind=study`` (plus ``optuna.storage`` and ``optuna.study_name``) whose children are trials
tagged ``kind=trial, trial=<number>`` with params ``trial.<name>`` and the metric ``objective``.

Every MLflow call goes through an MlflowClient bound to the resolved URI: the process-wide tracking URI is neither
read nor changed. The report is built in a temporary folder next to ``out_dir``, each file is then moved in with an
atomic rename (index.html last, so it never links to a missing file) and logged under ``report/`` on the parent run.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to manage
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from mlflow import MlflowClient
from mlflow.entities import ViewType

from . import analysis
from .tracking import resolve_tracking_uri

KINDS = ("sweep", "study")
PHASES = ("pretrain", "finetune")
PHASE_COLOURS = {"pretrain": "#4c72b0", "finetune": "#dd8452"}
MEASURES = {"final": "final epoch", "best": "best epoch (max over epochs)"}
MIN_IMPORTANCE_TRIALS = 2
_OOD_DICE = re.compile(r"^ood/(.+)/dice$")
RUN_COLUMNS = ["run_id", "subset", "seed", "phase", "status", "parent_run", "epochs"]
HISTORY_COLUMNS = ["run_id", "subset", "seed", "phase", "benchmark", "epoch", "dice", "t"]


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
        raise ValueError(f"name {value!r}: quotes and backslashes are not supported in sweep/study names")
    return f"'{value}'"


def _parent(client: MlflowClient, uri: str, kind: str, name: str):
    parents = _search(client, f"tags.{kind} = {_literal(name)} AND tags.kind = '{kind}'")
    if not parents:
        known = sorted({r.data.tags.get(kind, "?") for r in _search(client, f"tags.kind = '{kind}'")})
        raise ValueError(f"no {kind} named {name!r} in {uri}: no run is tagged {kind}={name}, kind={kind}; "
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
        raise ValueError(f"{kind} {name!r} (parent run {pid}) has no FINISHED {child_kind} runs: found {found}")
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
        raise ValueError(f"sweep {name!r} has more than one FINISHED run for a (subset, seed, phase): " + "; ".join(
            f"{subset}/s{seed}:{phase}: {', '.join(ids)}" for (subset, seed, phase), ids in duplicates.items())
            + f". `python -m experiments doctor --sweep {name}` lists them; end the runs that must not count "
            "(e.g. MlflowClient().set_terminated(run_id, 'KILLED')) and report again")
    by_id = {r.info.run_id: r for r in cells}
    rows, hist, epochs = [], [], {}
    for r in cells:
        tags = r.data.tags
        row = dict(run_id=r.info.run_id, subset=tags.get("sweep.subset", tags.get("subset")),
                   seed=_int_or_none(tags.get("seed")), phase=tags.get("phase"), status=r.info.status,
                   parent_run=tags.get("parent_run") if tags.get("phase") == "finetune" else None)
        steps = []
        for b in sorted(m.group(1) for k in r.data.metrics if (m := _OOD_DICE.match(k))):
            points = _history(client, r.info.run_id, f"ood/{b}/dice")
            if not points:
                continue
            steps += points
            last, best = max(points), max(points, key=lambda s: (points[s], -s))  # earliest epoch among ties
            row.update({f"final/{b}": points[last], f"best/{b}": points[best], f"best_epoch/{b}": best})
            hist += [dict(run_id=r.info.run_id, subset=row["subset"], seed=row["seed"], phase=row["phase"],
                          benchmark=b, epoch=s, dice=v) for s, v in points.items()]
        row["epochs"] = epochs[r.info.run_id] = _epochs(client, r, steps)
        rows.append(row)

    def offset(run_id: str) -> float:
        """Where a fine-tune's epoch 0 lies on the t axis: after all of its parent's epochs."""
        parent_id = by_id[run_id].data.tags.get("parent_run")
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
    runs = _order(runs[RUN_COLUMNS + metric_cols])
    history = pd.DataFrame(hist, columns=HISTORY_COLUMNS[:-1])
    offsets = {rid: 0.0 if by_id[rid].data.tags.get("phase") != "finetune" else offset(rid) for rid in by_id}
    history["t"] = history["epoch"] + history["run_id"].map(offsets).astype(float)
    lost = sorted(history.loc[history["t"].isna(), "run_id"].unique())
    if lost:
        warnings.warn(f"fine-tune runs without a readable parent pretrain, left off the time axis: {', '.join(lost)}")
    history = _order(history)  # stable: each run's rows stay by benchmark, then epoch
    runs.attrs = dict(parent_run_id=parent.info.run_id, tracking_uri=uri, cell_statuses=dict(statuses))
    return runs, history


def _duplicated_cells(runs: list) -> dict[tuple, list[str]]:
    """(subset, seed, phase) -> run ids, for every cell with more than one of the given runs."""
    by_cell: dict[tuple, list[str]] = {}
    for r in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        t = r.data.tags
        by_cell.setdefault((t.get("sweep.subset", t.get("subset")), t.get("seed"), t.get("phase")), []).append(
            r.info.run_id)
    return {k: ids for k, ids in by_cell.items() if len(ids) > 1}


def _label(benchmark: str) -> str:
    return "the mean over benchmarks" if benchmark == "mean" else benchmark


def _order(df: pd.DataFrame) -> pd.DataFrame:
    """subset, then pretrain before finetune, then seed."""
    if df.empty:
        return df.reset_index(drop=True)
    rank = df["phase"].map({p: i for i, p in enumerate(PHASES)}).fillna(len(PHASES))
    return (df.assign(_rank=rank).sort_values(["subset", "_rank", "seed"], kind="stable", na_position="last")
            .drop(columns="_rank").reset_index(drop=True))


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
        raise ValueError(f"study {name!r} (parent run {parent.info.run_id}) has FINISHED trial runs but none "
                         f"logged the metric 'objective'")
    notes, study, direction = [], None, None
    storage, study_name = parent.data.tags.get("optuna.storage"), parent.data.tags.get("optuna.study_name")
    if storage and study_name:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
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
    return trials, study


# ---------------------------------------------------------------------------------------------------- figures
def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "x"


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _subset_colours(subsets) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(subsets)}


def distribution_figure(runs: pd.DataFrame, benchmark: str, title: str) -> Figure:
    """Final and best OOD Dice per subset: pretrain and fine-tune boxes side by side, seeds as jittered points."""
    subsets = sorted(runs["subset"].dropna().unique())
    phases = [p for p in PHASES if (runs["phase"] == p).any()] or list(PHASES)
    rng = np.random.default_rng(0)  # the same jitter every time the report is made
    width = 0.8 / len(phases)
    fig = Figure(figsize=(max(7.0, 2.2 + 2.4 * len(subsets)), 4.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (measure, label) in zip(axes, MEASURES.items()):
        col = f"{measure}/{benchmark}"
        for i, subset in enumerate(subsets):
            for j, phase in enumerate(phases):
                values = runs.loc[(runs["subset"] == subset) & (runs["phase"] == phase), col].dropna().to_numpy()
                if not values.size:
                    continue
                x = i + (j - (len(phases) - 1) / 2) * width
                box = ax.boxplot([values], positions=[x], widths=width * 0.8, patch_artist=True, showfliers=False,
                                 medianprops=dict(color="black", linewidth=1.5))
                for patch in box["boxes"]:
                    patch.set(facecolor=PHASE_COLOURS.get(phase, "grey"), alpha=0.35)
                ax.scatter(x + rng.uniform(-width * 0.25, width * 0.25, values.size), values, s=22, zorder=3,
                           color=PHASE_COLOURS.get(phase, "grey"), edgecolor="black", linewidth=0.5)
        counts = runs.groupby(["subset", "phase"])[col].count()
        ax.set_xticks(range(len(subsets)), [f"{s}\n(n = {' / '.join(str(counts.get((s, p), 0)) for p in phases)})"
                                            for s in subsets])
        ax.set_xlim(-0.6, len(subsets) - 0.4)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    fig.supxlabel(f"training subset (n = seeds: {' / '.join(phases)})", fontsize="medium")
    axes[0].set_ylabel(f"OOD Dice on {_label(benchmark)} (dataset-level, 0–1)")
    axes[1].legend(handles=[Patch(facecolor=PHASE_COLOURS.get(p, "grey"), alpha=0.6, label=p) for p in phases],
                   title="phase", loc="best")
    fig.suptitle(title)
    return fig


def dynamics_figure(history: pd.DataFrame, benchmark: str, title: str) -> Figure:
    """Per subset: median OOD Dice over seeds per epoch on the combined axis t, inter-quartile band around it."""
    h = history[(history["benchmark"] == benchmark) & history["t"].notna()]
    subsets = sorted(h["subset"].dropna().unique())
    colours = _subset_colours(subsets)
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    ax = fig.subplots()
    for subset in subsets:
        n = h.loc[h["subset"] == subset].groupby("phase")["run_id"].nunique()
        label = f"{subset} (seeds: {', '.join(f'{n[p]} {p}' for p in PHASES if p in n)})"
        for phase in PHASES:  # one segment per phase: no line drawn across the switch
            g = h[(h["subset"] == subset) & (h["phase"] == phase)].groupby("t")["dice"]
            if not g.ngroups:
                continue
            q = g.quantile([0.25, 0.5, 0.75]).unstack()
            ax.fill_between(q.index, q[0.25], q[0.75], color=colours[subset], alpha=0.2, linewidth=0)
            ax.plot(q.index, q[0.5], color=colours[subset], marker="o", markersize=3, label=label)
            label = None
    ft = h[h["phase"] == "finetune"]
    for k, start in enumerate(sorted((ft["t"] - ft["epoch"]).unique())):
        ax.axvline(start - 0.5, color="0.3", linestyle="--", linewidth=1,
                   label="fine-tuning starts" if k == 0 else None)
        if k == 0:  # name the two sides of the (first) switch
            for dx, text, align in ((-0.1, "pretrain", "right"), (0.1, "fine-tune", "left")):
                ax.text(start - 0.5 + dx, 0.02, text, transform=ax.get_xaxis_transform(), ha=align,
                        color="0.3", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch t (pretrain epochs, then fine-tune epochs continue the count)")
    ax.set_ylabel(f"OOD Dice on {_label(benchmark)} (dataset-level, 0–1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def _completed(trials: pd.DataFrame) -> pd.Series:
    """Finished runs with an objective, and COMPLETE in Optuna where that is known (a pruned trial's run FINISHES)."""
    return (trials["status"].eq("FINISHED") & trials["objective"].notna()
            & (trials["state"].isna() | trials["state"].eq("COMPLETE")))


def history_figure(trials: pd.DataFrame, direction: str | None, title: str) -> Figure:
    """Objective of each finished trial, with the best-so-far line when the direction is known."""
    done = trials[_completed(trials) & trials["trial"].notna()]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(done["trial"], done["objective"], s=28, color="#4c72b0", edgecolor="black", linewidth=0.5,
               zorder=3, label="completed trial")
    if direction in ("maximize", "minimize") and len(done):
        best = (done["objective"].cummax() if direction == "maximize" else done["objective"].cummin())
        last = max(trials["trial"].max(), done["trial"].max())  # the line runs on to the last trial of any kind
        ax.step([*done["trial"], last], [*best, best.iloc[-1]], where="post", color="#c44e52", linewidth=1.8,
                label=f"best so far ({direction})")
        i = done["objective"].idxmax() if direction == "maximize" else done["objective"].idxmin()
        ax.scatter([done.at[i, "trial"]], [done.at[i, "objective"]], s=140, marker="*", color="#c44e52",
                   edgecolor="black", zorder=4, label=f"best: trial {int(done.at[i, 'trial'])}")
    other = trials[~_completed(trials) & trials["trial"].notna()]
    if len(other):  # pruned, failed or still running: no objective, but their place in the sequence shows
        ax.scatter(other["trial"], np.full(len(other), 0.03), transform=ax.get_xaxis_transform(), marker="x",
                   color="0.45", label="no objective (pruned, failed or running)")
    numbers = trials["trial"].dropna()
    if len(numbers):  # markers in axes coordinates do not widen the autoscaled x range
        ax.set_xlim(numbers.min() - 0.5, numbers.max() + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel("objective" + (f" ({direction})" if direction else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def importance_figure(importances: dict[str, float], title: str) -> Figure:
    names = list(importances)[::-1]  # largest on top
    fig = Figure(figsize=(7.5, 1.2 + 0.45 * len(names)), layout="constrained")
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="#55a868", edgecolor="black", linewidth=0.5)
    for y, n in enumerate(names):
        ax.text(importances[n], y, f" {importances[n]:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, max(max(importances.values(), default=0) * 1.2, 0.1))
    ax.set_xlabel("importance (normalised: sums to 1)")
    ax.set_ylabel("parameter")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return fig


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
            importances = optuna.importance.get_param_importances(study)
        except Exception as exc:  # noqa: BLE001  e.g. no parameters shared by the completed trials
            return {}, f"{type(exc).__name__}: {exc}"
    equal = [str(w.message) for w in caught if "importances will be equal" in str(w.message).lower()]
    if equal:  # Optuna's fallback is a uniform answer, which would look like a result
        return {}, equal[0]
    if not importances:
        return {}, "the completed trials have no parameters"
    return importances, None


# ---------------------------------------------------------------------------------------------------- report
_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}.note{color:#7a4b00}
code{background:#f4f4f4;padding:0 3px}"""


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, na_rep="–", float_format=lambda v: f"{v:.4g}", escape=True)


def _page(title: str, body: list[str]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) +
            f"\n<p><small>Generated {stamp} by mlplatform.report.</small></p></body></html>\n")


def _sweep_report(runs: pd.DataFrame, history: pd.DataFrame, name: str, out: Path, method: str,
                  correction: str) -> str:
    e = html.escape
    # ood/mean/dice (the mean over benchmarks, the sweep's default objective) first, then each benchmark
    benchmarks = sorted((c.split("/", 1)[1] for c in runs.columns if c.startswith("final/")),
                        key=lambda b: (b != "mean", b))
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(runs.attrs.get("cell_statuses", {}).items()))
    runs.to_csv(out / "runs.csv", index=False)
    history.to_csv(out / "history.csv", index=False)
    body = [f"<p>Sweep <b>{e(name)}</b>, parent run <code>{e(runs.attrs['parent_run_id'])}</code> in "
            f"<code>{e(runs.attrs['tracking_uri'])}</code>. Cell runs: {e(statuses)}; only FINISHED ones are used. "
            f"Data: <a href='runs.csv'>runs.csv</a> (one row per run), <a href='history.csv'>history.csv</a> "
            "(OOD Dice per epoch).</p>",
            "<p>OOD Dice is the dataset-level Dice on each out-of-distribution benchmark (from true/false positive "
            "and false negative pixel counts summed over the benchmark). <i>final</i> is its value after the last "
            "epoch; <i>best</i> is its maximum over epochs — optimistic, since it picks the epoch on the benchmark "
            "itself. Each point is one seed. The CI is a 95 % percentile bootstrap interval of the mean over seeds "
            "(10 000 resamples); with few seeds it is too narrow (it never reaches beyond the values seen).</p>"]
    if not benchmarks:
        body.append("<p class='note'>No run logged any <code>ood/&lt;benchmark&gt;/dice</code> metric.</p>")
    for b in benchmarks:
        slug = _slug(b)
        summary, tests = [], []
        for measure in MEASURES:
            col = f"{measure}/{b}"
            for (subset, phase), g in runs.groupby(["subset", "phase"], sort=False):
                summary.append(dict(benchmark=b, measure=measure, subset=subset, phase=phase,
                                    **analysis.summarize(g[col])))
            for phase in [p for p in PHASES if (runs["phase"] == p).any()]:
                sel = runs[runs["phase"] == phase]
                groups = {s: sel.loc[sel["subset"] == s, col] for s in sorted(sel["subset"].dropna().unique())}
                t = analysis.pairwise_tests(groups, method=method, correction=correction)
                t.insert(0, "measure", measure)
                t.insert(0, "phase", phase)
                t.insert(0, "benchmark", b)
                t.insert(t.columns.get_loc("n_b") + 1, "median_a", [np.nanmedian(groups[a]) for a in t["a"]])
                t.insert(t.columns.get_loc("median_a") + 1, "median_b", [np.nanmedian(groups[x]) for x in t["b"]])
                tests.append(t)
        summary = pd.DataFrame(summary)
        tests = pd.concat(tests, ignore_index=True) if tests else pd.DataFrame()
        summary.to_csv(out / f"summary_{slug}.csv", index=False)
        tests.to_csv(out / f"pairwise_{slug}.csv", index=False)
        _save(distribution_figure(runs, b, f"Sweep {name}: OOD Dice on {_label(b)} per training subset"),
              out / f"distribution_{slug}.png")
        _save(dynamics_figure(history, b, f"Sweep {name}: OOD Dice on {_label(b)} during training\n(median over seeds, "
                                          "band: inter-quartile range)"), out / f"dynamics_{slug}.png")
        small = sorted({(int(r.n_a), int(r.n_b)) for r in tests.itertuples()
                        if r.n_a and r.n_b and analysis.min_attainable_p(r.n_a, r.n_b) >= analysis.ALPHA}) \
            if len(tests) else []
        test_text = ("Mann–Whitney U (two-sided; exact for small samples without ties); effect sizes: Cliff's delta "
                     "(= rank-biserial correlation), positive when subset a scores higher"
                     if method == "mannwhitney" else
                     "permutation test on the difference of means (two-sided); effect sizes: difference of means "
                     "(a − b) and Cohen's d")
        body += [f"<h2>{'Mean over benchmarks' if b == 'mean' else 'Benchmark ' + e(b)}</h2>",
                 f"<img src='distribution_{slug}.png' alt='distribution of OOD Dice on {e(b)}'>",
                 f"<h3>Summary per subset and phase</h3><p><a href='summary_{slug}.csv'>summary_{slug}.csv</a></p>",
                 _table(summary[["measure", "subset", "phase", "n", "median", "mean", "ci_lo", "ci_hi", "std", "q1",
                                 "q3", "min", "max"]]),
                 f"<h3>Dynamics</h3><img src='dynamics_{slug}.png' alt='OOD Dice per epoch on {e(b)}'>"
                 "<p>Fine-tune epochs continue the count of their pretrain's epochs, so each subset's pretrain and "
                 "fine-tune form one curve; the dashed line is where fine-tuning starts.</p>",
                 f"<h3>Pairwise comparisons between subsets</h3><p>{e(test_text)}. p-values are corrected "
                 f"({e(correction)}) within each phase and measure; significant means corrected p &lt; "
                 f"{analysis.ALPHA}. <a href='pairwise_{slug}.csv'>pairwise_{slug}.csv</a></p>"]
        body.append(_table(tests) if len(tests) else "<p class='note'>Only one subset: nothing to compare.</p>")
        if small:
            body.append("<p class='note'>With " + "; ".join(f"{a} vs {c} seeds" for a, c in small) +
                        " the smallest two-sided p an exact test can reach is " +
                        ", ".join(f"{analysis.min_attainable_p(a, c):.3g}" for a, c in small) +
                        f": no difference can be significant at {analysis.ALPHA}, however large. Run more seeds.</p>")
    return _page(f"Sweep report: {name}", body)


def _study_report(trials: pd.DataFrame, study, name: str, out: Path) -> str:
    e = html.escape
    a = trials.attrs
    notes = list(a.get("notes", []))
    trials.to_csv(out / "trials.csv", index=False)
    _save(history_figure(trials, a.get("direction"), f"Study {name}: optimisation history"),
          out / "optimization_history.png")
    importances, why = param_importances(study)
    if importances:
        pd.DataFrame({"param": list(importances), "importance": list(importances.values())}).to_csv(
            out / "param_importances.csv", index=False)
        _save(importance_figure(importances, f"Study {name}: parameter importances"), out / "param_importances.png")
    done = trials[_completed(trials)]
    best = None
    if a.get("direction") in ("maximize", "minimize") and len(done):
        best = done.loc[done["objective"].idxmax() if a["direction"] == "maximize" else done["objective"].idxmin()]
    counts = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().sort_index().items())
    body = [f"<p>Study <b>{e(name)}</b>, parent run <code>{e(a['parent_run_id'])}</code> in "
            f"<code>{e(a['tracking_uri'])}</code>; Optuna study <code>{e(str(a.get('study_name')))}</code> in "
            f"<code>{e(str(a.get('storage')))}</code>. Trial runs: {e(counts)}. "
            "<a href='trials.csv'>trials.csv</a></p>"]
    if best is not None:
        params = ", ".join(f"{k[len('trial.'):]} = {best[k]:.4g}" if isinstance(best[k], float) else
                           f"{k[len('trial.'):]} = {best[k]}" for k in trials.columns if k.startswith("trial."))
        body.append(f"<p>Best: trial {int(best['trial'])}, objective {best['objective']:.4g} ({e(params)}).</p>")
    body += [f"<p class='note'>{e(n)}</p>" for n in notes]
    body += ["<h2>Optimisation history</h2><img src='optimization_history.png' alt='optimisation history'>"
             "<p>Objective of every completed trial by trial number (pruned and failed trials have none); the line is "
             "the best value so far.</p>",
             "<h2>Parameter importances</h2>"]
    if importances:
        body.append("<img src='param_importances.png' alt='parameter importances'><p>From "
                    "<code>optuna.importance.get_param_importances</code> (Optuna's default evaluator) on the "
                    "completed trials: how much each parameter accounts for good objective values. With few trials "
                    "this is indicative only. <a href='param_importances.csv'>param_importances.csv</a></p>")
    else:
        body.append(f"<p class='note'>Not computed: {e(why)}.</p>")
    body += ["<h2>Trials</h2>", _table(trials)]
    return _page(f"Study report: {name}", body)


def write_report(kind: str, name: str, tracking_uri: str | None, out_dir, method: str = "mannwhitney",
                 correction: str = "holm") -> Path:
    """Write the report of sweep or study ``name`` into ``out_dir`` and log it under ``report/`` on its parent run.

    Sweep: runs.csv, history.csv, and per benchmark distribution_<b>.png, dynamics_<b>.png, summary_<b>.csv,
    pairwise_<b>.csv (``method``/``correction`` as in analysis.pairwise_tests). Study: trials.csv,
    optimization_history.png, param_importances.png/.csv (when computable). Both: index.html. Files of the same name
    in out_dir are replaced (one atomic rename each); other files there are left alone and not logged.
    Returns the path of index.html. ValueError when the sweep/study or its finished runs are missing.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}; allowed: {', '.join(KINDS)}")
    if method not in analysis.METHODS or correction not in analysis.CORRECTIONS:
        raise ValueError(f"method {method!r}, correction {correction!r}; allowed: {', '.join(analysis.METHODS)} "
                         f"and {', '.join(analysis.CORRECTIONS)}")
    if kind == "sweep":
        runs, history = collect_sweep(tracking_uri, name)
        parent_id, uri = runs.attrs["parent_run_id"], runs.attrs["tracking_uri"]
    else:
        trials, study = collect_study(tracking_uri, name)
        parent_id, uri = trials.attrs["parent_run_id"], trials.attrs["tracking_uri"]
    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # same filesystem: renames are atomic
    try:
        page = (_sweep_report(runs, history, name, tmp, method, correction) if kind == "sweep"
                else _study_report(trials, study, name, tmp))
        (tmp / "index.html").write_text(page, encoding="utf-8")
        out.mkdir(exist_ok=True)
        files = sorted(p.name for p in tmp.iterdir() if p.name != "index.html") + ["index.html"]
        for f in files:
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    client = MlflowClient(uri)
    for f in files:  # file by file: only this report's files, not whatever else out_dir holds
        client.log_artifact(parent_id, str(out / f), "report")
    return out / "index.html"


__all__ = ["collect_sweep", "collect_study", "write_report", "param_importances", "distribution_figure",
           "dynamics_figure", "history_figure", "importance_figure"]
