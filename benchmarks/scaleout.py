"""Scale-out: (g) the same work on the engines a cluster uses, measured against each other in the same run.

* generation on a Dask cluster (a real ``dask scheduler`` and ``dask worker`` processes on loopback) with 2 workers
  against 1, and the content hash of the Dask runs against a local run's (they must be equal);
* the demo sweep with its claims in one PostgreSQL server (a throwaway cluster from Debian's binaries), 2 workers
  against 1.

On one machine the workers share its cores, so a ratio above 1 shows that the engine adds work in parallel without
losing it; on a cluster each worker brings its own cores.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from .table import Row, at_least


def _dask_generation(work: Path, recipe, n: int, seed: int, workers: int) -> tuple[float, str]:
    from datagen.pipeline import generate

    from .services import DaskCluster

    base = work / f"dask-{workers}"
    base.mkdir(parents=True, exist_ok=True)
    cluster = DaskCluster(base, n_workers=workers).start()
    try:
        started = time.perf_counter()
        manifest = generate(recipe, n=n, seed=seed, out=base / "ds", progress=False, scheduler=cluster.address)
        return time.perf_counter() - started, manifest["content_hash"]
    finally:
        cluster.stop()


def generation_rows(work: Path, quick: bool) -> list[Row]:
    from datagen.pipeline import generate, prepare_substrate
    from datagen.recipe import load_recipe

    name, n = ("tiny", 16) if quick else ("au-small", 32)
    recipe = load_recipe(name, ["output.structures_per_shard=1"])  # one structure a task: enough tasks for 2 workers
    started = time.perf_counter()
    local = generate(recipe, n=n, seed=3, out=work / "local", workers=1, progress=False)
    local_s = time.perf_counter() - started
    one_s, one_hash = _dask_generation(work, recipe, n, 3, 1)
    two_s, two_hash = _dask_generation(work, recipe, n, 3, 2)
    # every run first builds the dataset's substrate bank in the submitting process (serial, once per dataset):
    # timed alone here, it is taken out of the shard throughput the workers are compared on
    started = time.perf_counter()
    prepare_substrate(recipe, 3, work / "bank-timing")
    bank_s = time.perf_counter() - started
    same = one_hash == two_hash == local["content_hash"]
    settings = f"{name}, {n} samples, 1 structure/shard, {os.cpu_count()} cores, without the serial substrate bank"
    one_rate, two_rate = n / max(one_s - bank_s, 1e-9), n / max(two_s - bank_s, 1e-9)
    return [
        Row("g", "generation on Dask, 2 workers vs 1", settings, ours=two_rate, baseline=one_rate,
            ratio=two_rate / one_rate, goal=">= 1.0x", met=at_least(two_rate / one_rate, 1.0), unit="samples/s",
            notes={"seconds_1_worker": one_s, "seconds_2_workers": two_s, "seconds_local_1_process": local_s,
                   "seconds_substrate_bank": bank_s, "wall_ratio": one_s / two_s}),
        Row("g", "content hash, Dask runs vs local run", settings, ours=two_hash[:12], baseline=local["content_hash"][:12],
            goal="equal", met=same, notes={"dask_1_worker": one_hash, "dask_2_workers": two_hash,
                                           "local": local["content_hash"]}),
    ]


def postgres_sweep_rows(work: Path, quick: bool) -> list[Row]:
    from .services import throwaway_postgres
    from .sweeps import demo_sweep, throughput_row, timed_sweep

    path = demo_sweep(work, quick)
    scratch = work / "postgres"
    scratch.mkdir(exist_ok=True)
    with throwaway_postgres(scratch) as server:
        one = timed_sweep(work, path, 1, server.new_database("claims_1"))
        two = timed_sweep(work, path, 2, server.new_database("claims_2"))
    settings = f"demo sweep, {one[1]} units ({'1 seed' if quick else 'all seeds'}), claims in PostgreSQL"
    return [throughput_row("g", "sweep throughput on PostgreSQL, 2 workers vs 1", settings, one, two)]


def run(sections: set[str], quick: bool, workdir: Path | None = None) -> list[Row]:
    if "g" not in sections:
        return []
    with tempfile.TemporaryDirectory(prefix="hrtem-bench-scaleout-") as tmp:
        work = Path(workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        return generation_rows(work / "generation", quick) + postgres_sweep_rows(work, quick)
