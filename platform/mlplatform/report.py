"""Reports on sweeps and studies: one folder of CSV tables, PNG figures and an index.html, logged on the parent run.

The layers, each its own module: ``report_data`` reads MLflow (and Optuna) into DataFrames and derives the tables
shown; ``report_figures`` turns tables into matplotlib Figures; ``report_html`` renders the page. This module is the
edge: the only one that writes files. The report is built in a temporary folder next to ``out_dir``, each file is
then moved in with an atomic rename (index.html last, so it never links to a missing file) and logged under
``report/`` on the parent run. index.html embeds its figures (MLflow's UI previews it in a sandbox where relative
paths resolve to nothing) and links each run id to the run's page in the MLflow UI.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
from matplotlib.figure import Figure
from mlflow import MlflowClient

from hrtem_core.errors import InputError
from hrtem_core.files import check_output_folder

from . import analysis, report_html
from .mlflow_ui import DEFAULT_UI
from .store import quiet_mlflow
from .baseline import score_benchmarks
from .report_data import (NON_TARGET, baseline_table, benchmark_tables, benchmarks, best_trial, collect_study, collect_sweep,
                          decay_table, declared_findings, param_importances, underpowered)
from .report_figures import (benchmark_label, distribution_figure, dynamics_figure, dynamics_overview_figure,
                             history_figure, importance_figure, overview_figure, transfer_figure)

KINDS = ("sweep", "study")
LOCAL_UI_URL = DEFAULT_UI  # what `python -m experiments ui` serves


def _http_url(url: str) -> str | None:
    """``url`` without credentials, query or fragment (and a trailing slash) if it is http(s)://HOST..., else None."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


def default_ui_url(tracking_uri: str) -> str:
    """Where the MLflow UI of ``tracking_uri`` is: the tracking server itself when it is one (http(s)://), else the
    local UI of ``python -m experiments ui``."""
    return _http_url(tracking_uri) or LOCAL_UI_URL


def _save(fig: Figure, path: Path, images: dict[str, bytes]) -> None:
    """Write the figure as PNG to ``path`` and keep its bytes in ``images`` (under the file name) for the page."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    path.write_bytes(buf.getvalue())
    images[path.name] = buf.getvalue()


def _write_sweep(out: Path, runs: pd.DataFrame, history: pd.DataFrame, name: str, method: str, correction: str,
                 generated: datetime, ui_url: str) -> str:
    """Write the sweep's tables and figures into ``out``; the page's text."""
    runs.to_csv(out / report_html.RUNS_CSV, index=False)
    history.to_csv(out / report_html.HISTORY_CSV, index=False)
    tables, images = {}, {}
    declared = runs.attrs.get("declared") or {}
    found = declared_findings(runs, correction)
    if len(found):
        found.to_csv(out / report_html.FINDINGS_CSV, index=False)
    baseline, notes = score_benchmarks(runs.attrs.get("benchmark_refs") or [])
    floor = baseline_table(runs, baseline)
    if len(floor):
        floor.to_csv(out / report_html.BASELINE_CSV, index=False)
    decay = decay_table(runs)
    if len(decay):
        decay.to_csv(out / report_html.DECAY_CSV, index=False)
    order = [b for b in benchmarks(runs) if b not in ("mean", NON_TARGET)]
    # the figures of cells: one box, curve or panel per subset, or per cell group (subset x axis levels) when the
    # sweep declares axes
    cells, cell_history = runs, history
    if "group" in runs.columns:
        cells, cell_history = runs.assign(subset=runs["group"]), history.assign(subset=history["group"])
    what = "cell (subset and axis levels)" if "group" in runs.columns else "training subset"
    _save(overview_figure(cells, order, baseline, f"Sweep {name}: final OOD Dice per {what}",
                          declared.get("target")), out / report_html.OVERVIEW_PNG, images)
    _save(dynamics_overview_figure(cell_history, order, baseline, f"Sweep {name}: validation and OOD Dice during "
                                   "training"), out / report_html.DYNAMICS_PNG, images)
    variants = [p.removeprefix("finetune:") for p in declared.get("phases") or [] if p.startswith("finetune:")]
    if variants:
        tuned = set(runs.loc[runs["phase"].fillna("").str.startswith("finetune"), "parent_run"].dropna())
        _save(transfer_figure(history, order, variants, declared.get("target"),
                              f"Sweep {name}: OOD Dice during transfer learning, per fine-tune variant", tuned),
              out / report_html.TRANSFER_PNG, images)
    runs = cells if "group" in runs.columns else runs
    for b in [b for b in benchmarks(runs) if b != NON_TARGET]:  # a mean of others: in the findings and decay only
        files = report_html.benchmark_files(b)
        summary, tests = benchmark_tables(runs, b, method, correction)
        summary.to_csv(out / files["summary"], index=False)
        tests.to_csv(out / files["pairwise"], index=False)
        label = benchmark_label(b)
        _save(distribution_figure(runs, b, f"Sweep {name}: OOD Dice on {label} per training subset"),
              out / files["distribution"], images)
        _save(dynamics_figure(history, b, f"Sweep {name}: OOD Dice on {label} during training\n(median over seeds, "
                                          "band: inter-quartile range)"), out / files["dynamics"], images)
        tables[b] = (summary, tests, underpowered(tests))
    return report_html.sweep_page(name, runs, tables, method, correction, generated, images, ui_url,
                                  findings=found, baseline=floor, notes=notes, target=declared.get("target"),
                                  decay=decay)


def _write_study(out: Path, trials: pd.DataFrame, study, name: str, generated: datetime, ui_url: str) -> str:
    """Write the study's tables and figures into ``out``; the page's text."""
    trials.to_csv(out / report_html.TRIALS_CSV, index=False)
    images = {}
    _save(history_figure(trials, trials.attrs.get("direction"), f"Study {name}: optimisation history"),
          out / report_html.HISTORY_PNG, images)
    importances, why = param_importances(study)
    if importances:
        pd.DataFrame({"param": list(importances), "importance": list(importances.values())}).to_csv(
            out / report_html.IMPORTANCES_CSV, index=False)
        _save(importance_figure(importances, f"Study {name}: parameter importances"),
              out / report_html.IMPORTANCES_PNG, images)
    return report_html.study_page(name, trials, best_trial(trials), importances, why, generated, images, ui_url,
                                  design=_design_outcome(out, trials))


def _design_outcome(out: Path, trials: pd.DataFrame) -> dict | None:
    """A design study's outcome, for its report: the best recipe files and the declared test's sweep (copied from
    the parent run's ``design/`` artifacts into ``out``), and that sweep's findings (``confirm_findings.csv``).
    None for a study that designs no data."""
    if not any(c.startswith("trial.datasets.") for c in trials.columns):
        return None
    client = MlflowClient(trials.attrs["tracking_uri"])
    parent = client.get_run(trials.attrs["parent_run_id"])
    outcome = {"best_trial": parent.data.tags.get("design.best_trial"), "files": [], "findings": None,
               "confirm": parent.data.tags.get("design.confirm_sweep"), "note": None}
    if outcome["best_trial"] is None:
        outcome["note"] = "the study has not finished: no best recipe was written yet"
        return outcome
    with tempfile.TemporaryDirectory() as tmp, quiet_mlflow():
        local = Path(client.download_artifacts(parent.info.run_id, "design", tmp))
        for f in sorted(local.iterdir()):
            shutil.copyfile(f, out / f.name)
            outcome["files"].append(f.name)
    if outcome["confirm"] is None:
        outcome["note"] = "the declared test of the best recipe has not run (no confirm: section, or not finished)"
        return outcome
    try:
        runs, _ = collect_sweep(trials.attrs["tracking_uri"], outcome["confirm"])
    except InputError as exc:
        outcome["note"] = f"the declared test's sweep {outcome['confirm']} has no results: {exc}"
        return outcome
    found = declared_findings(runs)
    found.to_csv(out / report_html.CONFIRM_CSV, index=False)
    outcome["findings"] = found
    return outcome


def write_report(kind: str, name: str, tracking_uri: str | None, out_dir, method: str = "mannwhitney",
                 correction: str = "holm", ui_url: str | None = None) -> Path:
    """Write the report of sweep or study ``name`` into ``out_dir`` and log it under ``report/`` on its parent run.

    Sweep: runs.csv, history.csv, and per benchmark distribution_<b>.png, dynamics_<b>.png, summary_<b>.csv,
    pairwise_<b>.csv (``method``/``correction`` as in analysis.pairwise_tests). Study: trials.csv,
    optimization_history.png, param_importances.png/.csv (when computable). Both: index.html, with the figures
    embedded (data: URIs, so that it renders in MLflow's artifact preview) and every run id linked to
    ``{ui_url}/#/experiments/{experiment_id}/runs/{run_id}`` (default: ``default_ui_url`` of the tracking URI). Files
    of the same name in out_dir are replaced (one atomic rename each); other files there are left alone and not
    logged. Returns the path of index.html. ValueError when the sweep/study or its finished runs are missing, or
    ``ui_url`` is not http(s)://.
    """
    if kind not in KINDS:
        raise InputError(f"kind {kind!r}; allowed: {', '.join(KINDS)}")
    if method not in analysis.METHODS or correction not in analysis.CORRECTIONS:
        raise InputError(f"method {method!r}, correction {correction!r}; allowed: {', '.join(analysis.METHODS)} "
                         f"and {', '.join(analysis.CORRECTIONS)}")
    if ui_url is not None and _http_url(ui_url) is None:
        raise InputError(f"ui_url {ui_url!r}: expected the MLflow UI's address, http(s)://HOST[:PORT][/PATH]")
    check_output_folder(out_dir, "report --out")  # before the queries: a file there is known at once
    if kind == "sweep":
        runs, history = collect_sweep(tracking_uri, name)
        parent_id, uri = runs.attrs["parent_run_id"], runs.attrs["tracking_uri"]
    else:
        trials, study = collect_study(tracking_uri, name)
        parent_id, uri = trials.attrs["parent_run_id"], trials.attrs["tracking_uri"]
    ui_url = _http_url(ui_url) if ui_url is not None else default_ui_url(uri)
    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # same filesystem: renames are atomic
    generated = datetime.now(timezone.utc)
    try:
        page = (_write_sweep(tmp, runs, history, name, method, correction, generated, ui_url) if kind == "sweep"
                else _write_study(tmp, trials, study, name, generated, ui_url))
        (tmp / report_html.INDEX).write_text(page, encoding="utf-8")
        out.mkdir(exist_ok=True)
        files = sorted(p.name for p in tmp.iterdir() if p.name != report_html.INDEX) + [report_html.INDEX]
        for f in files:
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    client = MlflowClient(uri)
    for f in files:  # file by file: only this report's files, not whatever else out_dir holds
        client.log_artifact(parent_id, str(out / f), "report")
    return out / report_html.INDEX


__all__ = ["collect_sweep", "collect_study", "write_report", "default_ui_url", "param_importances",
           "distribution_figure", "dynamics_figure", "history_figure", "importance_figure"]
