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
