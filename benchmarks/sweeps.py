"""Sweeps: (f) throughput of the demo sweep with 2 workers against 1 worker, measured in the same run.

Both runs are the real ``python -m experiments sweep`` command on the demo's sweep definition and data (generated
here with the demo's recipes, or reused from ``--workdir``), each on a fresh claims database and tracking store, so
the second pays the same set-up as the first. Throughput is recorded units (cell x phase) per minute; the claims
cost (queueing, leases, commits, aligning MLflow) is inside both. ``--quick`` runs the first seed only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from hrtem_core.config import read_yaml_mapping

from .table import Row, at_least


def _demo_data(work: Path) -> None:
    """The demo's datasets under work/demo/data (the demo configs read them relative to the working directory)."""
    from datagen.pipeline import generate
    from datagen.recipe import load_recipe
    from experiments.demo import DATASETS

    for name, recipe, n, seed, overrides in DATASETS:
        generate(load_recipe(recipe, overrides), n=n, seed=seed, out=work / "demo" / "data" / name,
                 workers=os.cpu_count() or 1, progress=False, dataset=name)


def _sweep_file(work: Path, quick: bool) -> Path:
    from experiments.demo import CONFIGS, SWEEP

    spec = read_yaml_mapping(SWEEP, "sweep")
    if quick:
        spec["seeds"] = spec["seeds"][:1]
    shutil.copy(CONFIGS / spec["base"], work / spec["base"])
    path = work / "bench-sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def timed_sweep(work: Path, path: Path, workers: int, claims_url: str | None = None) -> tuple[float, int]:
    """Wall seconds of one sweep command on fresh stores (claims in SQLite, or in ``claims_url``, a fresh database),
    and the units it recorded."""
    store = work / f"stores-{workers}"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    claims_url = claims_url or f"sqlite:///{store / 'sweeps.db'}"
    cmd = [sys.executable, "-m", "experiments", "sweep", "--config", str(path), "--workers", str(workers), "--quiet",
           "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", "--storage", claims_url]
    started = time.perf_counter()
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - started
    if res.returncode != 0:
        raise RuntimeError(f"sweep with {workers} worker(s) failed:\n{res.stderr[-3000:]}")
    from experiments import claims

    name = read_yaml_mapping(path, "sweep")["name"]  # (the demo's sweep is not named "demo": it counted nothing)
    rows = claims.unit_rows(claims.open_engine(claims_url), name)
    done = sum(r["state"] == "done" for r in rows)
    if done == 0:
        raise RuntimeError(f"sweep {name!r} with {workers} worker(s) exited 0 but recorded no unit in {claims_url} "
                           f"(states: {sorted({r['state'] for r in rows})})")
    return seconds, done


def demo_sweep(work: Path, quick: bool) -> Path:
    """The demo's sweep definition (first seed only when ``quick``) and data, under ``work``."""
    if not (work / "demo" / "data" / "target-lowdose" / "manifest.json").is_file():
        _demo_data(work)
    return _sweep_file(work, quick)


def throughput_row(section: str, metric: str, settings: str, one: tuple[float, int], two: tuple[float, int]) -> Row:
    """Recorded units per minute of a sweep with 2 workers against 1, from (seconds, units) of each."""
    (one_s, one_n), (two_s, two_n) = one, two
    one_rate, two_rate = one_n / one_s * 60, two_n / two_s * 60
    ratio = two_rate / one_rate
    return Row(section, metric, settings, ours=two_rate, baseline=one_rate, ratio=ratio, goal=">= 1.0x",
               met=at_least(ratio, 1.0), unit="units/min",
               notes={"seconds_1_worker": one_s, "seconds_2_workers": two_s, "units": [one_n, two_n]})


def sweep_rows(work: Path, quick: bool) -> list[Row]:
    path = demo_sweep(work, quick)
    one, two = timed_sweep(work, path, 1), timed_sweep(work, path, 2)
    settings = f"demo sweep, {one[1]} units ({'1 seed' if quick else 'all seeds'}), {os.cpu_count()} cores"
    return [throughput_row("f", "sweep throughput, 2 workers vs 1", settings, one, two)]


def run(sections: set[str], quick: bool, workdir: Path | None = None) -> list[Row]:
    if "f" not in sections:
        return []
    with tempfile.TemporaryDirectory(prefix="hrtem-bench-sweep-") as tmp:
        work = Path(workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        return sweep_rows(work, quick)
