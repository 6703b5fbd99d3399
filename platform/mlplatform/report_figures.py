"""Report figures: tables (from ``report_data``) -> matplotlib Figures. Pure: nothing is read, shown or saved here.

Figures are made with ``matplotlib.figure.Figure``, not pyplot: no global backend or figure registry to manage.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .report_data import MEASURES, PHASES, completed

PHASE_COLOURS = {"pretrain": "#4c72b0", "finetune": "#dd8452"}


def benchmark_label(benchmark: str) -> str:
    return "the mean over benchmarks" if benchmark == "mean" else benchmark



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
    axes[0].set_ylabel(f"OOD Dice on {benchmark_label(benchmark)} (dataset-level, 0–1)")
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
    ax.set_ylabel(f"OOD Dice on {benchmark_label(benchmark)} (dataset-level, 0–1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig



def overview_figure(runs: pd.DataFrame, benchmarks: list[str], baseline: dict[str, dict], title: str,
                    target: str | None = None) -> Figure:
    """The study at a glance (the reference study's Fig. 1): one row per benchmark. Left: each subset's pretrained
    models' final Dice (one point per seed, box over seeds), the classical baseline tuned on the benchmark as a
    dashed line. Right: the same models before and after fine-tuning, one line per seed, so what fine-tuning does on
    the target benchmark and off it is seen per seed."""
    subsets = list(dict.fromkeys(runs["subset"].dropna()))
    colours = _subset_colours(subsets)
    has_ft = (runs["phase"] == "finetune").any()
    fig = Figure(figsize=(11 if has_ft else 6.5, 2.6 * len(benchmarks) + 0.8), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(benchmarks), 2 if has_ft else 1, sharex="col", squeeze=False))
    rng = np.random.default_rng(0)
    for row, b in enumerate(benchmarks):
        col = f"final/{b}"
        left = axes[row, 0]
        for i, subset in enumerate(subsets):
            values = runs.loc[(runs["subset"] == subset) & (runs["phase"] == "pretrain"), col].dropna().to_numpy()
            if values.size:
                box = left.boxplot([values], positions=[i], widths=0.5, patch_artist=True, showfliers=False,
                                   medianprops=dict(color="black"))
                for patch in box["boxes"]:
                    patch.set(facecolor=colours[subset], alpha=0.3)
                left.scatter(i + rng.uniform(-0.12, 0.12, values.size), values, s=18, color=colours[subset],
                             edgecolor="black", linewidth=0.4, zorder=3)
        if b in baseline:
            left.axhline(baseline[b]["dice"], color="0.25", linestyle="--", linewidth=1,
                         label=f"classical baseline ({baseline[b]['dice']:.2f})")
            left.legend(loc="lower left", fontsize=7)
        name = benchmark_label(b) + (" (fine-tuning target)" if b == target and b != "target" else
                                     " (held out)" if b == target else "")
        left.set_ylabel(f"Dice: {name}", fontsize=9)
        left.grid(axis="y", alpha=0.3)
        left.set_xticks(range(len(subsets)), subsets, fontsize=8)
        if has_ft:
            right = axes[row, 1]
            for i, subset in enumerate(subsets):
                g = runs[runs["subset"] == subset].pivot_table(index="seed", columns="phase", values=col)
                if not {"pretrain", "finetune"} <= set(g.columns):
                    continue
                for _, pair in g[["pretrain", "finetune"]].dropna().iterrows():
                    right.plot([i - 0.2, i + 0.2], [pair["pretrain"], pair["finetune"]], color=colours[subset],
                               marker="o", markersize=3, linewidth=1, alpha=0.8)
            if b in baseline:
                right.axhline(baseline[b]["dice"], color="0.25", linestyle="--", linewidth=1)
            right.grid(axis="y", alpha=0.3)
            right.set_xticks(range(len(subsets)), [f"{s}\npre → fine" for s in subsets], fontsize=8)
    axes[0, 0].set_title("pretrained models, final epoch (one point per seed)", fontsize=10)
    if has_ft:
        axes[0, 1].set_title("before → after fine-tuning (one line per seed)", fontsize=10)
    fig.suptitle(title)
    return fig


def dynamics_overview_figure(history: pd.DataFrame, benchmarks: list[str], baseline: dict[str, dict],
                             title: str) -> Figure:
    """Learning dynamics (the reference study's Fig. 2): one panel per subset; the validation Dice on the simulated
    data and each benchmark's OOD Dice, median over seeds per epoch on one time axis (fine-tune epochs continue the
    count), the start of fine-tuning marked, each benchmark's classical baseline as a dotted line."""
    from .report_data import VALIDATION

    h = history[history["t"].notna()]
    subsets = list(dict.fromkeys(h["subset"].dropna()))
    names = [VALIDATION] + [b for b in benchmarks if b != "mean"]
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    colours = {b: ("black" if b == VALIDATION else cmap((i - 1) % 10)) for i, b in enumerate(names)}
    ncols = min(len(subsets), 2) or 1
    nrows = max(1, -(-len(subsets) // ncols))
    fig = Figure(figsize=(6.2 * ncols, 3.6 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, subset in zip(axes, subsets):
        for b in names:
            for phase in PHASES:
                g = h[(h["subset"] == subset) & (h["phase"] == phase) & (h["benchmark"] == b)].groupby("t")["dice"]
                if not g.ngroups:
                    continue
                med = g.median()
                label = (("validation (simulated)" if b == VALIDATION else b) if phase == "pretrain" else None)
                ax.plot(med.index, med.values, color=colours[b], linewidth=2 if b == VALIDATION else 1.3,
                        marker="o", markersize=2.5, label=label)
            if b in baseline:
                ax.axhline(baseline[b]["dice"], color=colours[b], linestyle=":", linewidth=1)
        ft = h[(h["subset"] == subset) & (h["phase"] == "finetune")]
        for start in sorted((ft["t"] - ft["epoch"]).unique())[:1]:
            ax.axvline(start - 0.5, color="0.3", linestyle="--", linewidth=1)
            ax.text(start - 0.4, 0.03, "fine-tuning starts", transform=ax.get_xaxis_transform(), fontsize=8,
                    color="0.3")
        ax.set_title(f"subset {subset}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish_panels(fig, axes, len(subsets), ncols, "epoch (pretrain, then fine-tune epochs continue the count)")
    fig.supylabel("Dice (median over seeds); dotted: classical baseline", fontsize="medium")
    fig.suptitle(title)
    return fig


def _finish_panels(fig: Figure, axes, n: int, ncols: int, xlabel: str, fontsize=None) -> None:
    """A grid of ``n`` panels finished alike: unused axes hidden, one legend below (the first panel's lines), the
    epoch label under the bottom row."""
    for ax in axes[n:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=8)
    for ax in axes[max(0, n - ncols):n]:
        ax.set_xlabel(xlabel, fontsize=fontsize)


def variant_colours(variants: list[str]) -> dict:
    """One hue per fine-tune variant, darkest for the first declared and lighter for each later one (more target
    data, when variants are declared by increasing amount), as in the reference study's Fig. 2."""
    from matplotlib import colormaps

    cmap = colormaps["Oranges"]
    n = max(len(variants), 1)
    return {v: cmap(0.95 - 0.6 * i / max(n - 1, 1)) for i, v in enumerate(variants)}


def transfer_figure(history: pd.DataFrame, benchmarks: list[str], variants: list[str], target: str | None,
                    title: str, pretrained: set[str] | None = None) -> Figure:
    """Transfer learning per amount of target data (the reference study's Fig. 2): one panel per benchmark; the
    pretrained models' OOD Dice (grey) and then each fine-tune variant's (one hue per variant, lighter for later
    variants), median over every cell and seed per epoch on one time axis, each variant's line starting from the
    pretrained models' last epoch; band: inter-quartile range. ``pretrained``: the run ids of the pretrains that
    were fine-tuned (default: every pretrain), so that the grey line is where the coloured ones start."""
    h = history[history["t"].notna()]
    if pretrained is not None:
        h = h[(h["phase"] != "pretrain") | h["run_id"].isin(pretrained)]
    names = [b for b in benchmarks if b != "mean"]
    colours = variant_colours(variants)
    ncols = min(len(names), 3) or 1
    nrows = max(1, -(-len(names) // ncols))
    fig = Figure(figsize=(4.8 * ncols, 3.4 * nrows + 0.7), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, b in zip(axes, names):
        pre = h[(h["phase"] == "pretrain") & (h["benchmark"] == b)].groupby("t")["dice"]
        if pre.ngroups:
            q = pre.quantile([0.25, 0.5, 0.75]).unstack()
            ax.fill_between(q.index, q[0.25], q[0.75], color="0.5", alpha=0.2, linewidth=0)
            ax.plot(q.index, q[0.5], color="0.35", marker="o", markersize=2.5, label="pretrain")
            start = (q.index[-1], q[0.5].iloc[-1])
        for v in variants:
            g = h[(h["phase"] == f"finetune:{v}") & (h["benchmark"] == b)].groupby("t")["dice"]
            if not g.ngroups:
                continue
            q = g.quantile([0.25, 0.5, 0.75]).unstack()
            ax.fill_between(q.index, q[0.25], q[0.75], color=colours[v], alpha=0.15, linewidth=0)
            x, y = list(q.index), list(q[0.5])
            if pre.ngroups:
                x, y = [start[0], *x], [start[1], *y]
            ax.plot(x, y, color=colours[v], marker="o", markersize=2.5, label=f"fine-tune {v}")
        ax.set_title(f"{b} (target)" if b == target else b, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish_panels(fig, axes, len(names), ncols, "epoch (fine-tune epochs continue the pretrain's count)", 9)
    fig.supylabel("OOD Dice (median over cells and seeds)", fontsize="medium")
    fig.suptitle(title)
    return fig


def history_figure(trials: pd.DataFrame, direction: str | None, title: str) -> Figure:
    """Objective of each finished trial, with the best-so-far line when the direction is known."""
    done = trials[completed(trials) & trials["trial"].notna()]
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
    other = trials[~completed(trials) & trials["trial"].notna()]
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


__all__ = ["benchmark_label", "distribution_figure", "dynamics_figure", "history_figure", "importance_figure"]
