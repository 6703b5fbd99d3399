"""Report pages: tables and values (from ``report_data``) -> the text of index.html, and the names of the files it
links to. Pure: nothing is read or written here (the caller passes the generation time, too).
"""

from __future__ import annotations

import html
import re
from datetime import datetime

import pandas as pd

from . import analysis

INDEX = "index.html"
RUNS_CSV, HISTORY_CSV = "runs.csv", "history.csv"
TRIALS_CSV, HISTORY_PNG = "trials.csv", "optimization_history.png"
IMPORTANCES_PNG, IMPORTANCES_CSV = "param_importances.png", "param_importances.csv"

_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}.note{color:#7a4b00}
code{background:#f4f4f4;padding:0 3px}"""
SUMMARY_COLUMNS = ["measure", "subset", "phase", "n", "median", "mean", "ci_lo", "ci_hi", "std", "q1", "q3", "min",
                   "max"]


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "x"


def benchmark_files(benchmark: str) -> dict[str, str]:
    """The names of one benchmark's files in a sweep report: distribution and dynamics (PNG), summary and pairwise
    (CSV)."""
    slug = _slug(benchmark)
    return {"distribution": f"distribution_{slug}.png", "dynamics": f"dynamics_{slug}.png",
            "summary": f"summary_{slug}.csv", "pairwise": f"pairwise_{slug}.csv"}


def table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, na_rep="–", float_format=lambda v: f"{v:.4g}", escape=True)


def page(title: str, body: list[str], generated: datetime) -> str:
    """A whole HTML page: the title, the body's parts, and when (UTC) it was generated."""
    stamp = generated.strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) +
            f"\n<p><small>Generated {stamp} by mlplatform.report.</small></p></body></html>\n")


def sweep_page(name: str, attrs: dict, tables: dict[str, tuple[pd.DataFrame, pd.DataFrame, list[tuple[int, int]]]],
               method: str, correction: str, generated: datetime) -> str:
    """The sweep report. ``attrs``: the runs table's attrs (parent_run_id, tracking_uri, cell_statuses); ``tables``:
    benchmark -> (summary, tests, underpowered seed counts), in page order."""
    e = html.escape
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(attrs.get("cell_statuses", {}).items()))
    body = [f"<p>Sweep <b>{e(name)}</b>, parent run <code>{e(attrs['parent_run_id'])}</code> in "
            f"<code>{e(attrs['tracking_uri'])}</code>. Cell runs: {e(statuses)}; only FINISHED ones are used. "
            f"Data: <a href='{RUNS_CSV}'>{RUNS_CSV}</a> (one row per run), <a href='{HISTORY_CSV}'>{HISTORY_CSV}</a> "
            "(OOD Dice per epoch).</p>",
            "<p>OOD Dice is the dataset-level Dice on each out-of-distribution benchmark (from true/false positive "
            "and false negative pixel counts summed over the benchmark). <i>final</i> is its value after the last "
            "epoch; <i>best</i> is its maximum over epochs — optimistic, since it picks the epoch on the benchmark "
            "itself. Each point is one seed. The CI is a 95 % percentile bootstrap interval of the mean over seeds "
            "(10 000 resamples); with few seeds it is too narrow (it never reaches beyond the values seen).</p>"]
    if not tables:
        body.append("<p class='note'>No run logged any <code>ood/&lt;benchmark&gt;/dice</code> metric.</p>")
    test_text = ("Mann–Whitney U (two-sided; exact for small samples without ties); effect sizes: Cliff's delta "
                 "(= rank-biserial correlation), positive when subset a scores higher"
                 if method == "mannwhitney" else
                 "permutation test on the difference of means (two-sided); effect sizes: difference of means "
                 "(a − b) and Cohen's d")
    for b, (summary, tests, small) in tables.items():
        files = benchmark_files(b)
        body += [f"<h2>{'Mean over benchmarks' if b == 'mean' else 'Benchmark ' + e(b)}</h2>",
                 f"<img src='{files['distribution']}' alt='distribution of OOD Dice on {e(b)}'>",
                 f"<h3>Summary per subset and phase</h3><p><a href='{files['summary']}'>{files['summary']}</a></p>",
                 table(summary[SUMMARY_COLUMNS]),
                 f"<h3>Dynamics</h3><img src='{files['dynamics']}' alt='OOD Dice per epoch on {e(b)}'>"
                 "<p>Fine-tune epochs continue the count of their pretrain's epochs, so each subset's pretrain and "
                 "fine-tune form one curve; the dashed line is where fine-tuning starts.</p>",
                 f"<h3>Pairwise comparisons between subsets</h3><p>{e(test_text)}. p-values are corrected "
                 f"({e(correction)}) within each phase and measure; significant means corrected p &lt; "
                 f"{analysis.ALPHA}. <a href='{files['pairwise']}'>{files['pairwise']}</a></p>"]
        body.append(table(tests) if len(tests) else "<p class='note'>Only one subset: nothing to compare.</p>")
        if small:
            body.append("<p class='note'>With " + "; ".join(f"{a} vs {c} seeds" for a, c in small) +
                        " the smallest two-sided p an exact test can reach is " +
                        ", ".join(f"{analysis.min_attainable_p(a, c):.3g}" for a, c in small) +
                        f": no difference can be significant at {analysis.ALPHA}, however large. Run more seeds.</p>")
    return page(f"Sweep report: {name}", body, generated)


def study_page(name: str, trials: pd.DataFrame, best: pd.Series | None, importances: dict[str, float],
               why_no_importances: str | None, generated: datetime) -> str:
    """The study report. ``trials`` with its attrs (parent_run_id, tracking_uri, study_name, storage, notes);
    ``best``: the best trial's row or None; ``importances`` empty when ``why_no_importances`` says why."""
    e = html.escape
    a = trials.attrs
    counts = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().sort_index().items())
    body = [f"<p>Study <b>{e(name)}</b>, parent run <code>{e(a['parent_run_id'])}</code> in "
            f"<code>{e(a['tracking_uri'])}</code>; Optuna study <code>{e(str(a.get('study_name')))}</code> in "
            f"<code>{e(str(a.get('storage')))}</code>. Trial runs: {e(counts)}. "
            f"<a href='{TRIALS_CSV}'>{TRIALS_CSV}</a></p>"]
    if best is not None:
        params = ", ".join(f"{k[len('trial.'):]} = {best[k]:.4g}" if isinstance(best[k], float) else
                           f"{k[len('trial.'):]} = {best[k]}" for k in trials.columns if k.startswith("trial."))
        body.append(f"<p>Best: trial {int(best['trial'])}, objective {best['objective']:.4g} ({e(params)}).</p>")
    body += [f"<p class='note'>{e(n)}</p>" for n in a.get("notes", [])]
    body += [f"<h2>Optimisation history</h2><img src='{HISTORY_PNG}' alt='optimisation history'>"
             "<p>Objective of every completed trial by trial number (pruned and failed trials have none); the line is "
             "the best value so far.</p>",
             "<h2>Parameter importances</h2>"]
    if importances:
        body.append(f"<img src='{IMPORTANCES_PNG}' alt='parameter importances'><p>From "
                    "<code>optuna.importance.get_param_importances</code> (Optuna's default evaluator) on the "
                    "completed trials: how much each parameter accounts for good objective values. With few trials "
                    f"this is indicative only. <a href='{IMPORTANCES_CSV}'>{IMPORTANCES_CSV}</a></p>")
    else:
        body.append(f"<p class='note'>Not computed: {e(why_no_importances)}.</p>")
    body += ["<h2>Trials</h2>", table(trials)]
    return page(f"Study report: {name}", body, generated)


__all__ = ["INDEX", "benchmark_files", "table", "page", "sweep_page", "study_page"]
