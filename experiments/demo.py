"""The main job: a miniature curation study, end to end, on embedded defaults.

Generates a simulated training pool, three OOD benchmarks in the spirit of the reference study (large Au, small Au,
CdSe) and a small low-dose target set; runs the demo sweep (three curated subsets x 3 seeds, each model pretrained and
fine-tuned) and writes its statistical report. Everything goes under one folder (default ``demo/``) and ``mlruns/``.
A second run reuses every dataset whose recipe and seed are unchanged and every finished cell.
"""

from __future__ import annotations

import time
from pathlib import Path

from datagen.pipeline import generate
from datagen.recipe import load_recipe

CONFIGS = Path(__file__).parent / "configs"
SWEEP = CONFIGS / "demo-sweep.yaml"
# datasets the demo configs read (demo/data/<name>); four phonon configurations instead of eight keep it in budget
FAST = ["simulation.n_phonons=4"]
DATASETS = (
    ("au-small-pool", "au-small", 88, 1, FAST),
    ("bench-au-large", "au-small", 22, 2,
     FAST + ["structure.particle.radius_A={dist: truncnormal, mean: 21, std: 2, low: 18, high: 24}",
             "structure.particle.margin_A=0.5"]),
    ("bench-au-small", "au-small", 22, 3, FAST),
    ("bench-cdse", "cdse", 22, 4, FAST),
    ("target-lowdose", "au-small", 22, 5, FAST + ["imaging.dose_e_per_A2=150"]),
)


def run_demo(out: str | Path = "demo", workers: int = 2, tracking_uri: str | None = None) -> dict:
    from mlplatform.report import write_report
    from mlplatform.store import resolve_tracking_uri

    from .sweep import run_sweep

    out = Path(out)
    if out.resolve() != Path("demo").resolve():
        raise ValueError(f"--out {out}: the demo configs read demo/data/...; run it from the repository root "
                         "with the default --out demo")
    started = time.perf_counter()
    timings = {}
    for name, recipe, n, seed, overrides in DATASETS:
        t = time.perf_counter()
        manifest = generate(load_recipe(recipe, overrides), n=n, seed=seed, out=out / "data" / name, workers=workers,
                            dataset=name)
        timings[f"data/{name}"] = time.perf_counter() - t
        print(f"dataset {name}: {manifest['n_samples']} samples, content {manifest['content_hash'][:12]}", flush=True)
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
