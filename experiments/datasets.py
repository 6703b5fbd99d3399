"""A study's own datasets (``datasets:`` in a sweep or study file): generated on demand, once, wherever it runs.

Each dataset is a unit of its own queue in the claims database (queue ``dataset:<path digest>``, phase ``data``),
claimed, fenced and committed like a sweep's cells: the committed result is the dataset's content hash. So
whatever starts together — two ``sweep`` commands, a sweep and a study that declare the same dataset, workers on
other machines — one process generates it and the others wait for it, then use it. A generation that was killed is
resumed by the next process that claims the unit (a dead holder on this host is seen at once, one elsewhere when its
lease runs out), and gives the content hash of an uninterrupted run (:func:`datagen.pipeline.generate` resumes shard
by shard). A dataset whose unit is done but whose folder is gone is made again.

The generation itself is also held under an exclusive lock on the folder (:func:`claims.exclusive`), released by the
operating system or the database server if its holder dies: two queues that name the same folder (a sweep and a
study on different claims databases cannot, but two names of one database can) still never write it at once.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from pathlib import Path

from hrtem_core.dataset import check_output
from hrtem_core.errors import DatasetError, InputError

from . import claims
from .claims import DONE, FAILED

POLL_S = 1.0
PHASE = "data"


def recipe_source(exp, name: str) -> str:
    """What the study's dataset ``name`` names as its recipe: a preset, or a YAML file relative to the study file."""
    from datagen.recipe import available_recipes

    source = exp.spec.datasets[name].recipe
    if source not in available_recipes():
        candidate = (Path(exp.source).parent / source)
        source = str(candidate) if candidate.is_file() else source
    return source


def recipe_of(exp, name: str, extra: list[str] | tuple[str, ...] = ()):
    """The validated recipe of the study's dataset ``name`` (a preset, or a YAML file relative to the study file),
    with ``extra`` overrides after its own (a design study's trial values)."""
    from datagen.recipe import load_recipe

    ds = exp.spec.datasets[name]
    try:
        return load_recipe(recipe_source(exp, name), [*ds.overrides(), *extra])
    except InputError as exc:
        raise type(exc)(f"{exp.source}: datasets {name}: {exc}") from None


def _queue(path: Path) -> str:
    return f"dataset:{hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:24]}"


def _identity(exp, name: str, recipe) -> dict:
    from datagen.pipeline import _run_identity

    ds = exp.spec.datasets[name]
    return _run_identity(recipe, ds.seed, ds.n, False, name)


def datasets_read(exp, configs) -> list[str]:
    """The study's datasets that any of ``configs`` reads, in declaration order."""
    read = {n for config in configs for n in exp.dataset_names(config)}
    return [n for n in exp.spec.datasets if n in read]


def ensure_datasets(exp, names: list[str] | None, storage_url: str | None, workers: int = 1, scheduler=None,
                    progress: bool = False, log=print) -> dict[str, str]:
    """Every named dataset of the study (default: all) finished on disk; returns name -> content hash. Generates
    what is missing with ``workers`` local processes or on the Dask cluster ``scheduler``, waits for what another
    process is generating."""
    names = list(exp.spec.datasets) if names is None else names
    if not names:
        return {}
    engine = claims.open_engine(storage_url)
    me = claims.worker_identity()
    return {name: _ensure(exp, name, engine, me, workers, scheduler, progress, log) for name in names}


def _ensure(exp, name: str, engine, me: str, workers: int, scheduler, progress: bool, log) -> str:
    from datagen.pipeline import PROGRESS_DIR, generate

    recipe = recipe_of(exp, name)
    ds = exp.spec.datasets[name]
    path = exp.spec.dataset_path(name)
    queue = _queue(path)
    claims.register_units(engine, queue, [(0, str(path.absolute())[:300], PHASE)])
    ident = _identity(exp, name, recipe)
    said_waiting = False
    while True:
        row = next(r for r in claims.unit_rows(engine, queue) if r["phase"] == PHASE)
        if row["state"] == DONE:
            state, manifest = check_output(path, ident, progress_file=path / PROGRESS_DIR / "run.json")
            if state == "done" and manifest["content_hash"] == row["run_id"]:  # (another dataset: DatasetError)
                return row["run_id"]
            # gone, half deleted, or remade by hand since: made again (resumed where shards are left)
            claims.reopen(engine, row)
            continue
        if row["state"] == FAILED:  # a failed generation is tried again by whoever asks next
            claims.reopen_failed(engine, row)
            continue
        if not claims.claimable(row, time.time()):
            if not said_waiting:
                log(f"dataset {name}: being generated by {row['holder']}; waiting for it")
                said_waiting = True
            time.sleep(POLL_S * random.uniform(0.5, 1.5))
            continue
        claim = claims.try_claim(engine, row, me)
        if claim is None:
            continue
        with claim:
            try:
                with claims.exclusive(engine, f"dataset-folder:{path.absolute()}"):
                    t = time.perf_counter()
                    state, _ = check_output(path, ident, progress_file=path / PROGRESS_DIR / "run.json")
                    manifest = generate(recipe, n=ds.n, seed=ds.seed, out=path, workers=workers, dataset=name,
                                        progress=progress, scheduler=scheduler)
                    if state != "done":
                        log(f"dataset {name}: {manifest['n_samples']} samples in {time.perf_counter() - t:.0f} s"
                            f"{' (resumed)' if state == 'resume' else ''}, content {manifest['content_hash'][:12]}")
            except DatasetError:
                claim.release("the folder holds another dataset", "interrupted", 0)
                raise
            except Exception as exc:
                claim.release(f"{type(exc).__name__}: {exc}", "unit", 0)
                raise
            except BaseException:
                try:
                    claim.release("interrupted", "interrupted", 0)
                except Exception:  # noqa: BLE001  the lease runs out instead
                    pass
                raise
            if not claim.commit(manifest["content_hash"]):
                # taken over while we generated (a lease that ran out on a stalled machine): the other holder's
                # result is the same dataset; look again
                print(f"dataset {name}: generation was taken over by another process; using its result",
                      file=sys.stderr)
                continue
        return manifest["content_hash"]
