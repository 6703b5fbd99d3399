"""Report pages: tables and values (from ``report_data``) -> the text of index.html, and the names of the files it
links to. Pure: nothing is read or written here (the caller passes the generation time and the figures' PNG bytes).

The page is self-contained where it has to be: MLflow's UI previews an HTML artifact in a sandboxed frame (no
same-origin) where relative paths resolve to nothing, so every figure is embedded as a ``data:image/png;base64`` URI.
Links to the PNG and CSV files stay relative (they work when the folder is opened from disk); run ids link to the
run's page in the MLflow UI (``{ui_url}/#/experiments/{experiment_id}/runs/{run_id}``, in a new tab).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import quote

import pandas as pd

from . import analysis

INDEX = "index.html"
RUNS_CSV, HISTORY_CSV = "runs.csv", "history.csv"
TRIALS_CSV, HISTORY_PNG = "trials.csv", "optimization_history.png"
IMPORTANCES_PNG, IMPORTANCES_CSV = "param_importances.png", "param_importances.csv"
FINDINGS_CSV, BASELINE_CSV, DECAY_CSV = "findings.csv", "baseline.csv", "decay.csv"
CONFIRM_CSV = "confirm_findings.csv"
TRANSFER_PNG = "transfer.png"
OVERVIEW_PNG, DYNAMICS_PNG = "overview.png", "dynamics_overview.png"
FINDINGS_COLUMNS = ["name", "finding", "effect", "ci_lo", "ci_hi", "p_value", "p_adjusted", "min_p", "significant"]

_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}.note{color:#7a4b00}
code{background:#f4f4f4;padding:0 3px}figure{margin:0 0 1em}figcaption{font-size:12px;color:#555}"""
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


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of a PNG's bytes."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not PNG data")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(name: str, images: Mapping[str, bytes], alt: str) -> str:
    """Figure ``name`` (a key of ``images``: file name -> PNG bytes) embedded in the page, captioned with a link to
    its file."""
    return (f"<figure><img src='{png_data_uri(images[name])}' alt='{html.escape(alt)}'>"
            f"<figcaption><a href='{html.escape(name)}'>{html.escape(name)}</a></figcaption></figure>")


def experiment_url(ui_url: str, experiment_id) -> str:
    """The MLflow UI's page of an experiment."""
    return f"{ui_url.rstrip('/')}/#/experiments/{quote(str(experiment_id), safe='')}"


def run_url(ui_url: str, experiment_id, run_id: str) -> str:
    """The MLflow UI's page of a run."""
    return f"{experiment_url(ui_url, experiment_id)}/runs/{quote(str(run_id), safe='')}"


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and value != value) and str(value) != ""


def link(url: str, text: str, code: bool = False) -> str:
    """An HTML link opened in a new tab (MLflow's sandboxed preview may refuse to open it; from disk it works)."""
    inner = f"<code>{html.escape(text)}</code>" if code else html.escape(text)
    return f"<a href='{html.escape(url)}' target='_blank' rel='noopener'>{inner}</a>"


def run_urls(runs: pd.DataFrame, ui_url: str) -> dict[str, str]:
    """run id -> its page in the MLflow UI, for the rows of a runs/trials table with a known ``experiment_id``."""
    if "experiment_id" not in runs.columns:
        return {}
    return {str(r): run_url(ui_url, e, r) for r, e in zip(runs["run_id"], runs["experiment_id"])
            if _known(r) and _known(e)}


_CELL = re.compile(r"<td>([^<]*)</td>")


def table(df: pd.DataFrame, run_links: Mapping[str, str] | None = None) -> str:
    """``df`` as an HTML table; with ``run_links`` (run id -> URL) every cell holding one of those run ids (a run's
    own id, or a fine-tune's pretrain when that is a run of the table) links to it."""
    text = df.to_html(index=False, border=0, na_rep="–", float_format=lambda v: f"{v:.4g}", escape=True)
    if not run_links:
        return text

    def linked(cell: re.Match) -> str:
        key = html.unescape(cell.group(1))
        return f"<td>{link(run_links[key], key)}</td>" if key in run_links else cell.group(0)

    return _CELL.sub(linked, text)


def page(title: str, body: list[str], generated: datetime) -> str:
    """A whole HTML page: the title, the body's parts, and when (UTC) it was generated."""
    stamp = generated.strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) +
            f"\n<p><small>Generated {stamp} by mlplatform.report.</small></p></body></html>\n")


def _parent(attrs: dict, ui_url: str) -> str:
    """The parent run (linked to its page) and its experiment (linked to the experiment's page), as HTML."""
    pid, eid = attrs["parent_run_id"], attrs.get("experiment_id")
    if not _known(eid):
        return f"parent run <code>{html.escape(pid)}</code>"
    return (f"parent run {link(run_url(ui_url, eid, pid), pid, code=True)} (experiment "
            f"{link(experiment_url(ui_url, eid), str(eid), code=True)})")


def _run_columns(runs: pd.DataFrame) -> list[str]:
    """The runs table as shown: who each run is, and its final OOD Dice per benchmark (runs.csv has everything)."""
    return [c for c in runs.columns if c not in ("status", "experiment_id") and "/" not in c] + [
        c for c in runs.columns if c.startswith("final/")]


def _findings_section(found: pd.DataFrame, correction: str) -> list[str]:
    e = html.escape
    if not len(found):
        return ["<h2>Findings</h2><p class='note'>The sweep declared no comparisons (<code>comparisons:</code> in "
                "its file), so the report draws no conclusions; the per-benchmark tables below compare every pair "
                "of subsets.</p>"]
    rows = "".join(
        f"<tr><td style='text-align:left'><b>{e(str(r.name))}</b><br><i>{e(str(r.hypothesis))}</i></td>"
        f"<td style='text-align:left'>{e(str(r.finding))}</td><td>{r.effect:+.3f}</td>"
        f"<td>[{r.ci_lo:+.3f}, {r.ci_hi:+.3f}]</td><td>{r.p_value:.3g}</td><td><b>{r.p_adjusted:.3g}</b></td>"
        f"<td>{'yes' if r.significant else 'no'}</td></tr>" for r in found.itertuples())
    return ["<h2>Findings</h2>",
            f"<p>The comparisons this sweep declared in its file before it ran (logged on the parent run as "
            f"<code>sweep/definition.yaml</code> at registration), each on its declared statistic of every run "
            f"(final-epoch Dice unless it says otherwise), judged by its declared test; p-values adjusted together "
            f"({e(correction)}) over all {len(found)} declared comparisons. Effect of two groups: mean of a minus "
            "mean of b (paired: mean of the differences of runs of otherwise equal cells), 95 % percentile "
            "bootstrap CI; of a trend: the Theil-Sen slope per level step with its 95 % CI. Nothing was added or "
            "dropped after the results. "
            f"<a href='{FINDINGS_CSV}'>{FINDINGS_CSV}</a></p>",
            "<table><tr><th>comparison</th><th>finding</th><th>effect</th><th>95 % CI</th><th>p</th>"
            f"<th>p ({e(correction)})</th><th>significant</th></tr>{rows}</table>"]


def _baseline_section(floor: pd.DataFrame, notes: list[str]) -> list[str]:
    e = html.escape
    out = ["<h2>Classical baseline</h2><p>Gaussian filter, Otsu threshold, holes filled, largest connected component "
           "(<code>mlplatform.baseline</code>), scored like the networks (dataset Dice), with its filter width and "
           "polarity <i>tuned on each benchmark itself</i>: an optimistic floor that a useful model must beat. "
           f"<a href='{BASELINE_CSV}'>{BASELINE_CSV}</a></p>"]
    if len(floor):
        pre = floor[floor["phase"] == "pretrain"]
        lost = [(b, g["model_mean"].max(), g["baseline"].iloc[0]) for b, g in pre.groupby("benchmark", sort=False)
                if not g["all_beat_baseline"].any()]
        if lost:  # the benchmarks no pretrained group wins outright, and by how much it falls short
            out.append("<p><b>Not won before fine-tuning</b> (no subset whose every seed beats the baseline): " +
                       "; ".join(f"{e(b)}: best subset mean {m:.3f} against {base:.3f} "
                                 f"({'short by ' + format(base - m, '.3f') if m < base else 'some seeds below it'})"
                                 for b, m, base in lost) + ".</p>")
        else:
            out.append("<p>Before fine-tuning, on every benchmark some subset's models all beat the baseline.</p>")
        cols = ["benchmark", "subset", "phase", "n", "model_mean", "model_min", "baseline", "baseline_sigma_px",
                "baseline_polarity", "all_beat_baseline"]
        out.append(table(floor[cols]))
    out += [f"<p class='note'>{e(n)}</p>" for n in notes]
    return out


def _decay_section(decay: pd.DataFrame, images: Mapping[str, bytes], target: str | None) -> list[str]:
    e = html.escape
    out = ["<h2>Transfer learning and decay</h2>"]
    if TRANSFER_PNG in images:
        out += [figure(TRANSFER_PNG, images, "OOD Dice during transfer learning per fine-tune variant"),
                "<p>Per benchmark, the median over every fine-tuned cell and seed of the pretrained models' OOD Dice "
                "(grey) and of each fine-tune variant's (one hue per variant, lighter for each later one), per epoch on "
                "one axis; bands: inter-quartile range." + (f" <b>{e(target)}</b> is the target." if target else "")
                + "</p>"]
    out += ["<p>For every fine-tune run and benchmark (<code>ft_peak/</code>, <code>ft_peak_epoch/</code>, "
            f"<code>ft_drop/</code> in {RUNS_CSV}): the peak Dice from the start of fine-tuning (epoch 0: the "
            "pretrained model) through its epochs, the epoch of the peak, and the drop from the peak to the final "
            f"epoch: the decay. Means over seeds per cell and phase: <a href='{DECAY_CSV}'>{DECAY_CSV}</a></p>",
            table(decay.round(4))]
    return out


def sweep_page(name: str, runs: pd.DataFrame,
               tables: dict[str, tuple[pd.DataFrame, pd.DataFrame, list[tuple[int, int]]]], method: str,
               correction: str, generated: datetime, images: Mapping[str, bytes], ui_url: str,
               findings: pd.DataFrame | None = None, baseline: pd.DataFrame | None = None,
               notes: list[str] = (), target: str | None = None, decay: pd.DataFrame | None = None) -> str:
    """The sweep report. ``runs``: the runs table with its attrs (parent_run_id, experiment_id, tracking_uri,
    cell_statuses); ``tables``: benchmark -> (summary, tests, underpowered seed counts), in page order; ``images``:
    PNG file name -> bytes, for every figure of ``benchmark_files`` (and the overview figures when present);
    ``ui_url``: the MLflow UI the run ids link to; ``findings``: the declared comparisons judged
    (``report_data.findings``); ``baseline``: ``report_data.baseline_table``; ``target``: the fine-tune's
    held-out target benchmark."""
    e = html.escape
    attrs = runs.attrs
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(attrs.get("cell_statuses", {}).items()))
    body = [f"<p>Sweep <b>{e(name)}</b>, {_parent(attrs, ui_url)} in "
            f"<code>{e(attrs['tracking_uri'])}</code>. Cell runs: {e(statuses)}; only FINISHED ones are used. "
            f"Data: <a href='{RUNS_CSV}'>{RUNS_CSV}</a> (one row per run), <a href='{HISTORY_CSV}'>{HISTORY_CSV}</a> "
            "(OOD Dice per epoch).</p>"]
    body += _findings_section(findings if findings is not None else pd.DataFrame(), correction)
    if decay is not None and len(decay):  # the reference study's Fig. 2 and its decay, as numbers
        body += _decay_section(decay, images, target)
    body += _baseline_section(baseline if baseline is not None else pd.DataFrame(), list(notes))
    if OVERVIEW_PNG in images:
        body += ["<h2>Overview</h2>", figure(OVERVIEW_PNG, images, "final OOD Dice per subset, before and after "
                                             "fine-tuning"),
                 "<p>One row per benchmark" + (f" (<b>{e(target)}</b> holds out images of the fine-tuning data's "
                                               "distribution: the target)" if target else "") +
                 ". Left: the pretrained models of each subset, one point per seed; dashed: the classical baseline. "
                 "Right: each seed's model before and after fine-tuning.</p>"]
    if DYNAMICS_PNG in images:
        body += [figure(DYNAMICS_PNG, images, "validation and OOD Dice per epoch"),
                 "<p>Per subset, the median over seeds of the validation Dice (the held-out structures of the "
                 "run's own training data: simulated in pretraining, the fine-tuning data's after the dashed line) "
                 "and of every benchmark's OOD Dice, per epoch on one axis; dotted: each benchmark's classical "
                 "baseline.</p>"]
    body += [
            "<h2>Per benchmark</h2>"
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
                 figure(files["distribution"], images, f"distribution of OOD Dice on {b}"),
                 f"<h3>Summary per subset and phase</h3><p><a href='{files['summary']}'>{files['summary']}</a></p>",
                 table(summary[SUMMARY_COLUMNS]),
                 "<h3>Dynamics</h3>" + figure(files["dynamics"], images, f"OOD Dice per epoch on {b}") +
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
    body += ["<h2>Runs</h2><p>The FINISHED cell runs, with their final OOD Dice per benchmark; each run id opens "
             f"the run in the MLflow UI at <code>{e(ui_url)}</code>. All values: <a href='{RUNS_CSV}'>{RUNS_CSV}</a>"
             "</p>", table(runs[_run_columns(runs)], run_urls(runs, ui_url))]
    return page(f"Sweep report: {name}", body, generated)


def _design_section(design: dict, best: pd.Series | None) -> list[str]:
    e = html.escape
    out = ["<h2>Designed data</h2>"]
    if best is not None:
        keys = [k for k in best.index if k.startswith("trial.datasets.")]
        rows = "".join(f"<tr><td style='text-align:left'><code>{e(k[len('trial.datasets.'):])}</code></td>"
                       f"<td>{best[k]:.4g}</td></tr>" if isinstance(best[k], float) else
                       f"<tr><td style='text-align:left'><code>{e(k[len('trial.datasets.'):])}</code></td>"
                       f"<td>{e(str(best[k]))}</td></tr>" for k in keys)
        out.append(f"<p>The recipe values of the best trial (dataset.recipe key):</p><table><tr><th>recipe value"
                   f"</th><th>best trial</th></tr>{rows}</table>")
    files = [f for f in design["files"] if f.startswith("best-")]
    if files:
        out.append("<p>The best recipe as a recipe file, exactly as the trial generated with it (its header gives "
                   "the <code>python -m datagen generate</code> command that remakes the trial's data): "
                   + ", ".join(f"<a href='{e(f)}'>{e(f)}</a>" for f in files) + ".</p>")
    if design.get("note"):
        out.append(f"<p class='note'>{e(design['note'])}</p>")
    found = design.get("findings")
    if found is not None and len(found):
        sweep_file = [f for f in design["files"] if f.startswith("confirm-")]
        rows = "".join(
            f"<tr><td style='text-align:left'>{e(str(r.benchmark))}</td><td>{r.mean_a:.3f}</td><td>{r.mean_b:.3f}"
            f"</td><td>{r.effect:+.3f}</td><td>[{r.ci_lo:+.3f}, {r.ci_hi:+.3f}]</td><td>{r.p_value:.3g}</td>"
            f"<td><b>{r.p_adjusted:.3g}</b></td><td>{'yes' if r.significant else 'no'}</td></tr>"
            for r in found.itertuples())
        out += [f"<h2>Best recipe against the default</h2><p>The test this study declared before it ran "
                f"(<code>confirm:</code>): the best trial's recipe and the declared default recipe, each generated "
                f"afresh at the trials' size, each trained with every declared seed under the same settings, "
                f"final Dice on every benchmark; {e(str(found['test'].iloc[0]))} test, two-sided, Holm-adjusted over "
                f"the {len(found)} benchmarks. Effect: mean of best minus mean of default, 95 % bootstrap CI. Sweep "
                f"<code>{e(str(design['confirm']))}</code>"
                + (f" (<a href='{e(sweep_file[0])}'>{e(sweep_file[0])}</a>)" if sweep_file else "")
                + f"; its full report: <code>python -m experiments report --sweep {e(str(design['confirm']))} "
                f"--out DIR</code>. <a href='{CONFIRM_CSV}'>{CONFIRM_CSV}</a></p>",
                "<table><tr><th>benchmark</th><th>best</th><th>default</th><th>effect</th><th>95 % CI</th><th>p</th>"
                f"<th>p (Holm)</th><th>significant</th></tr>{rows}</table>"]
    return out


def study_page(name: str, trials: pd.DataFrame, best: pd.Series | None, importances: dict[str, float],
               why_no_importances: str | None, generated: datetime, images: Mapping[str, bytes], ui_url: str,
               design: dict | None = None) -> str:
    """The study report. ``trials`` with its attrs (parent_run_id, experiment_id, tracking_uri, study_name, storage,
    notes); ``best``: the best trial's row or None; ``importances`` empty when ``why_no_importances`` says why;
    ``images``: PNG file name -> bytes (HISTORY_PNG, and IMPORTANCES_PNG with importances); ``ui_url``: the MLflow
    UI the run ids link to; ``design``: a design study's outcome (``report._design_outcome``)."""
    e = html.escape
    a = trials.attrs
    links = run_urls(trials, ui_url)
    counts = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().sort_index().items())
    body = [f"<p>Study <b>{e(name)}</b>, {_parent(a, ui_url)} in "
            f"<code>{e(a['tracking_uri'])}</code>; Optuna study <code>{e(str(a.get('study_name')))}</code> in "
            f"<code>{e(str(a.get('storage')))}</code>. Trial runs: {e(counts)}. "
            f"<a href='{TRIALS_CSV}'>{TRIALS_CSV}</a></p>"]
    if best is not None:
        params = ", ".join(f"{k[len('trial.'):]} = {best[k]:.4g}" if isinstance(best[k], float) else
                           f"{k[len('trial.'):]} = {best[k]}" for k in trials.columns if k.startswith("trial."))
        run = str(best["run_id"])
        body.append(f"<p>Best: trial {int(best['trial'])}, objective {best['objective']:.4g} ({e(params)}); run "
                    f"{link(links[run], run, code=True) if run in links else f'<code>{e(run)}</code>'}.</p>")
    body += [f"<p class='note'>{e(n)}</p>" for n in a.get("notes", [])]
    if design is not None:
        body += _design_section(design, best)
    body += ["<h2>Optimisation history</h2>" + figure(HISTORY_PNG, images, "optimisation history") +
             "<p>Objective of every completed trial by trial number (pruned and failed trials have none); the line is "
             "the best value so far.</p>",
             "<h2>Parameter importances</h2>"]
    if importances:
        body.append(figure(IMPORTANCES_PNG, images, "parameter importances") + "<p>From "
                    "Optuna's PED-ANOVA evaluator (<code>PedAnovaImportanceEvaluator</code>, Watanabe et al. 2023) on the "
                    "completed trials: how much each parameter accounts for reaching the top 10 % of objective values. "
                    "With few trials this is indicative only. <a href='{IMPORTANCES_CSV}'>{IMPORTANCES_CSV}</a></p>")
    else:
        body.append(f"<p class='note'>Not computed: {e(why_no_importances)}.</p>")
    body += ["<h2>Trials</h2><p>Each run id opens the trial's run in the MLflow UI at "
             f"<code>{e(ui_url)}</code>.</p>", table(trials.drop(columns="experiment_id", errors="ignore"), links)]
    return page(f"Study report: {name}", body, generated)


__all__ = ["INDEX", "benchmark_files", "png_data_uri", "figure", "experiment_url", "run_url", "run_urls", "link",
           "table", "page", "sweep_page", "study_page"]
