"""The main job: the reference study's experiments in miniature, end to end, on embedded defaults.

Everything the demo does is declared in its sweep file (``configs/demo-sweep.yaml``): the datasets it generates (a
simulated training pool of varied structure and imaging, the same pool without its carbon substrate, OOD benchmarks
in the spirit of the reference study, a low-dose target set in two halves), the curated subsets it trains (x 6
seeds), the fine-tunes with three amounts of target data, and the comparisons the report judges. This module runs
it: the datasets (generated once, reused by identity: :mod:`.datasets`), the sweep, the report, each phase timed.
Everything goes under one folder (``demo/``) and ``mlruns/``. A second run reuses every dataset and finished unit.
"""

from __future__ import annotations

import time
from pathlib import Path

from hrtem_core.errors import InputError

CONFIGS = Path(__file__).parent / "configs"
SWEEP = CONFIGS / "demo-sweep.yaml"


def run_demo(out: str | Path = "demo", workers: int = 2, tracking_uri: str | None = None) -> dict:
    from mlplatform.report import write_report
    from mlplatform.store import resolve_tracking_uri

    from .datasets import ensure_datasets
    from .specs import load_experiment
    from .sweep import run_sweep

    out = Path(out)
    if out.resolve() != Path("demo").resolve():
        raise InputError(f"--out {out}: the demo's sweep file keeps its data in demo/data (data_root); run it from "
                         "the repository root with the default --out demo")
    started = time.perf_counter()
    timings = {}
    exp = load_experiment(SWEEP, "sweep")
    for name in exp.spec.datasets:  # each timed on its own; made once, reused by identity on later runs
        t = time.perf_counter()
        ensure_datasets(exp, [name], None, workers, log=lambda line: print(line, flush=True))
        timings[f"data/{name}"] = time.perf_counter() - t
    uri = resolve_tracking_uri(tracking_uri)
    t = time.perf_counter()
    summary = run_sweep(str(SWEEP), [], workers, None, uri, progress=False)
    timings["sweep"] = time.perf_counter() - t
    t = time.perf_counter()
    index = write_report("sweep", summary["sweep"], uri, out / "report")
    timings["report"] = time.perf_counter() - t
    total = time.perf_counter() - started
    n_runs = sum(summary["runs_by_status"].values())
    print()
    print(f"demo finished in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print(f"  runs:      {n_runs} tracked runs ({summary['runs_by_status']}) in {uri}")
    print(f"  report:    {index.resolve()}")
    print("  browse:    python -m experiments ui   (prints the URL of this sweep's comparison view)")
    print(f"  data:      {out.resolve() / 'data'} (delete {out} and mlruns/ to start over)")
    return {**summary, "report": str(index), "seconds": total, "timings": timings}
