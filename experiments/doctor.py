"""``python -m experiments doctor``: find (and with ``--fix`` repair) what killed or stalled workers left behind.

For sweeps, from the claims database and the tracking store: claims held by dead workers or with expired leases
(``--fix`` gives them back: a live holder that was only slow is fenced off by the next claim's epoch), runs that are
out of line with their unit's claim (``--fix`` ends them as the sweep itself would on its next start), units recorded
more than once and fine-tunes not descended from their cell's recorded pretrain (never changed automatically: which
run must not count is a person's decision, made visible here). For studies, :func:`experiments.study.doctor_study`
does the same with trials and their runs. Exit status 1 while anything is left to look at.
"""

from __future__ import annotations

import time

from . import claims
from .claims import CLAIMED
from .study import doctor_study
from .sweep import load_sweep, record_problems, summarize


def doctor_sweep(name: str, storage_url: str | None, tracking_uri: str, fix: bool) -> tuple[list[str], bool]:
    """(lines to print, whether problems remain)."""
    ctx = load_sweep(name, storage_url, tracking_uri)
    lines, now = [], time.time()
    held = [r for r in claims.unit_rows(ctx.engine, name) if r["state"] == CLAIMED]
    stale = [r for r in held if claims.claimable(r, now)]
    for r in stale:
        why = "its holder is dead" if claims.holder_is_dead(r["holder"]) else \
            f"its lease ran out {now - r['lease_until']:.0f} s ago"
        released = fix and claims.release_dead(ctx.engine, r)
        lines.append(f"claim of {r['cell_key']}:{r['phase']} by {r['holder']} (epoch {r['epoch']}): {why}"
                     + (" -> given back" if released else ""))
    summary = summarize(ctx, fix=fix)
    lines += [f"run {line}" for line in summary["aligned"]]
    problems = record_problems(summary)
    lines += problems
    live = len(held) - len(stale)
    lines.append(f"sweep {name}: units {summary['units_by_state']} ({live} held by live workers), runs by status "
                 f"{summary['runs_by_status']}")
    left = bool(problems or (not fix and (stale or summary["aligned"])))
    return lines, left


def doctor(sweep: str | None, study: str | None, storage_url: str | None, tracking_uri: str,
           fix: bool) -> tuple[list[str], bool]:
    """The study named, or the sweep named, or every sweep in the claims database."""
    if study:
        return doctor_study(study, storage_url, tracking_uri, fix)
    names = [sweep] if sweep else claims.sweep_names(claims.open_engine(storage_url))
    if not names:
        return [f"no sweeps in {claims.redact(str(claims.open_engine(storage_url).url))}"], False
    lines, left = [], False
    for name in names:
        more, problems = doctor_sweep(name, storage_url, tracking_uri, fix)
        lines += more
        left |= problems
    return lines, left
