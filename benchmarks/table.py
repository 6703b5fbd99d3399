"""Rows of the benchmark table and how they are printed."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from statistics import median


@dataclass
class Row:
    """One line of the table. ``ratio`` is what ``goal`` is checked against; ``met`` is None for information rows."""

    section: str
    metric: str
    settings: str
    ours: float | str | None = None
    baseline: float | str | None = None
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    unit: str = ""
    notes: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def at_least(value: float | None, target: float) -> bool | None:
    return None if value is None or math.isnan(value) else value >= target


def at_most(value: float | None, target: float) -> bool | None:
    return None if value is None or math.isnan(value) else value <= target


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value == 0:
        text = "0"
    elif abs(value) >= 1000 or abs(value) < 1e-3:
        text = f"{value:.2e}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def render(rows: list[Row]) -> str:
    """One plain-text table: section | metric | settings | ours | baseline | ratio | goal | met."""
    header = ["", "metric", "settings", "ours", "baseline", "ratio", "goal", "met"]
    body = [[r.section, r.metric, r.settings, _fmt(r.ours, r.unit), _fmt(r.baseline, r.unit), _fmt(r.ratio),
             r.goal or "-", {True: "yes", False: "NO", None: "-"}[r.met]] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(out)


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def best_of(fn, repeat: int) -> float:
    """Fastest of ``repeat`` calls, in seconds: for micro-benchmarks, whose noise only ever adds time."""
    return min(timed(fn)[0] for _ in range(repeat))


def median_of(fn, repeat: int) -> float:
    return median(timed(fn)[0] for _ in range(repeat))
