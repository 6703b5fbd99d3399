"""The main job: a miniature curation study, end to end, on embedded defaults.

Generates a simulated training pool of varied structure (sphere, Wulff, decahedral, icosahedral and octahedral Au,
Pt, Pd and Ag particles) and imaging (the full defocus range, four doses); three out-of-distribution benchmarks in
the spirit of the reference study (large Au, small Au, CdSe); and a low-dose target set in two halves, one to
fine-tune on and one held out as the target benchmark. Then runs the demo sweep (``configs/demo-sweep.yaml``: four
curated subsets of the pool, equal in size, x 6 seeds, each model pretrained and fine-tuned) whose comparisons are
declared in the sweep file, and writes the statistical report. Everything goes under one folder (default
``demo/``) and ``mlruns/``. A second run reuses every dataset whose recipe and seed are unchanged and every finished
cell.
"""

from __future__ import annotations

import time
from pathlib import Path

from datagen.pipeline import generate
from datagen.recipe import load_recipe
from hrtem_core.errors import InputError

CONFIGS = Path(__file__).parent / "configs"
SWEEP = CONFIGS / "demo-sweep.yaml"
# every demo dataset: four phonon configurations instead of eight, and 0.4 A detector pixels on the same 51 A field
# (128 px): lattice fringes of 2.0-2.4 A still span five or more pixels, at a quarter of the pixels to train on
COMMON = ["simulation.n_phonons=4", "imaging.pixel_size_A=0.4", "imaging.crop_px=128"]
BENCH = COMMON + ["imaging.n_conditions=2", "structure.substrate.bank_size=2"]
LOW_DOSE = ["imaging.dose_e_per_A2={dist: uniform, low: 100, high: 200}"]
# datasets the demo configs read (demo/data/<name>): (name, recipe, n, seed, overrides)
DATASETS = (
    ("pool", "fcc-mixed", 300, 1,
     COMMON + ["imaging.n_conditions=3", "imaging.dose_e_per_A2={dist: choice, values: [100, 200, 400, 800]}",
               # sizes from small to nearly large-benchmark size, on a wider field (64 A, 160 px) so that they fit
               "structure.particle.radius_A={dist: truncnormal, mean: 12, std: 4.5, low: 6, high: 20}",
               "structure.particle.margin_A=1.0", "structure.cell.extent_A=80", "imaging.crop_px=160"]),
    ("bench-au-large", "au-small", 24, 2,
     BENCH + ["structure.particle.radius_A={dist: truncnormal, mean: 21, std: 2, low: 18, high: 24}",
              "structure.particle.margin_A=0.5"]),
    ("bench-au-small", "au-small", 24, 3, BENCH),
    ("bench-cdse", "cdse", 24, 4, BENCH),
    ("bench-mixed", "fcc-mixed", 24, 7, BENCH),
    ("target-train", "au-small", 24, 5, BENCH + LOW_DOSE),
    ("target-test", "au-small", 24, 6, BENCH + LOW_DOSE),
)


def run_demo(out: str | Path = "demo", workers: int = 2, tracking_uri: str | None = None) -> dict:
    from mlplatform.report import write_report
    from mlplatform.store import resolve_tracking_uri

    from .sweep import run_sweep

    out = Path(out)
    if out.resolve() != Path("demo").resolve():
        raise InputError(f"--out {out}: the demo configs read demo/data/...; run it from the repository root "
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
