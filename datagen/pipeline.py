"""The generation pipeline: structure -> simulate -> image -> mask -> shards, resumable and parallel on local cores.

Work is split into shards of whole structures (so the imaging variants of one structure are simulated once and stay
together). A shard is a pure function of (recipe, seed, shard index): any process can make any shard, a finished
shard is never redone, and a half-written one (``*.partial``) is discarded and redone on resume.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform as _platform
import shutil
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from . import image as image_stage
from . import mask as mask_stage
from .recipe import Recipe, canonical_json, recipe_from_dict
from .seeding import Streams
from .shards import (MANIFEST, SHARD_PATTERN, WAVE_SHARD_PATTERN, DatasetError, content_hash, encode_sample,
                     file_sha256, sample_hash, to_jsonable, write_atomic, write_shard)
from .simulate import get_backend, simulate
from .structures import SubstrateBank, build_scene

PROGRESS_DIR = ".progress"
FORMAT_VERSION = 1


def software_versions() -> dict:
    out = {"python": _platform.python_version()}
    for dist in ("hrtem-curation", "numpy", "scipy", "abTEM", "czone", "ase", "webdataset", "pymatgen"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class Plan:
    """How ``n`` samples are laid out: structures of ``k`` imaging variants, ``structures_per_shard`` a shard."""

    n_samples: int
    variants: int
    structures_per_shard: int

    @property
    def n_structures(self) -> int:
        return math.ceil(self.n_samples / self.variants)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_structures / self.structures_per_shard)

    def structures_of(self, shard: int) -> range:
        start = shard * self.structures_per_shard
        return range(start, min(start + self.structures_per_shard, self.n_structures))

    def variants_of(self, structure: int) -> int:
        return min(self.variants, self.n_samples - structure * self.variants)

    def samples_in(self, shard: int) -> int:
        return sum(self.variants_of(s) for s in self.structures_of(shard))


def sample_key(structure: int, variant: int) -> str:
    return f"{structure:07d}_{variant:02d}"


class SampleFactory:
    """Makes the samples of one structure. One per process; holds the backend and the substrate bank."""

    def __init__(self, recipe: Recipe, seed: int, dataset: str, cache_dir: Path | None):
        self.recipe = recipe
        self.seed = seed
        self.dataset = dataset
        self.recipe_hash = recipe.hash()
        self.bank = SubstrateBank(recipe, seed, cache_dir)
        self.backend = get_backend(recipe.simulation.backend)
        self.versions = software_versions()

    def structure_samples(self, s: int, n_variants: int, keep_waves: bool = False):
        """[(key, arrays, metadata)] for the imaging variants of structure ``s`` (and its waves if kept)."""
        r = self.recipe
        streams = Streams(self.seed, s)
        t0 = time.perf_counter()
        scene = build_scene(r, streams, self.bank)
        t1 = time.perf_counter()
        waves = simulate(scene, r.simulation, streams, self.backend)
        t2 = time.perf_counter()
        smooth_mask = mask_stage.particle_map(waves.particle, waves.sampling_A, r.mask)
        t3 = time.perf_counter()
        st_meta = to_jsonable(scene.metadata)
        pixel = r.structure.cell.extent_A / r.image_grid_px
        grid_px = r.image_grid_px
        centre = None
        radius_px = 0.0
        if "center_A" in st_meta:
            cx, cy = st_meta["center_A"][0], st_meta["center_A"][1]
            centre = (cy / pixel, cx / pixel)
            radius_px = (st_meta["radius_A"] + r.structure.particle.margin_A) / pixel
        out = []
        for v in range(n_variants):
            vs = streams.for_variant(v)
            tv0 = time.perf_counter()
            cond = image_stage.draw_condition(r.imaging, vs)
            intensity = image_stage.lens_intensity(waves.full, waves.sampling_A, cond, r.simulation.energy_eV)
            crop = image_stage.choose_crop(r, grid_px, centre, radius_px, vs.rng("imaging.crop"))
            img, img_meta = image_stage.make_image(intensity, r, cond, crop, vs)
            tv1 = time.perf_counter()
            mask, mask_meta = mask_stage.mask_on_image(smooth_mask, r, crop)
            tv2 = time.perf_counter()
            structure = dict(st_meta)
            structure["structure_index"] = s
            if centre is not None:
                structure["center_px"] = [centre[0] - crop[0], centre[1] - crop[1]]
            imaging = {**cond, "C10_A": -cond["defocus_A"], **img_meta,
                       "focal_spread_convention": "standard deviation"}
            key = sample_key(s, v)
            meta = {
                "id": f"{self.dataset}/{key}",
                "dataset": self.dataset,
                "seed": {"dataset": self.seed, "structure": s, "variant": v},
                "split": r.output.split,
                "structure": structure,
                "simulation": waves.metadata,
                "imaging": imaging,
                "mask": mask_meta,
                "provenance": {
                    "recipe": r.name,
                    "recipe_hash": self.recipe_hash,
                    "versions": self.versions,
                    "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "host": socket.gethostname(),
                    # structure and simulation are shared by the variants of a structure: their cost is split
                    "timing_s": {"structure": (t1 - t0) / n_variants, "simulate": (t2 - t1) / n_variants,
                                 "image": tv1 - tv0, "mask": (t3 - t2) / n_variants + tv2 - tv1},
                },
            }
            out.append((key, {"image.npy": img, "mask.npy": mask}, to_jsonable(meta)))
        wave_record = None
        if keep_waves:
            wave_arrays = {"wave.npy": waves.full}
            if waves.particle is not None:
                wave_arrays["particle_wave.npy"] = waves.particle
            wave_record = (f"{s:07d}", wave_arrays,
                           to_jsonable({"structure": st_meta, "simulation": waves.metadata, "seed": self.seed,
                                        "dataset": self.dataset}))
        return out, wave_record


# ------------------------------------------------------------------------------------------------- worker side

_FACTORY: SampleFactory | None = None
_TICKS = None


def _die_with_parent() -> None:
    """A worker must not outlive a killed driver: an orphan would still be writing when the rerun resumes."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _init_worker(recipe_json: str, seed: int, dataset: str, cache_dir: str, ticks) -> None:
    global _FACTORY, _TICKS
    _die_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _FACTORY = SampleFactory(recipe_from_dict(json.loads(recipe_json)), seed, dataset, Path(cache_dir))
    _TICKS = ticks


def make_shard(out: Path, plan: Plan, shard: int, keep_waves: bool, factory: SampleFactory | None = None,
               tick=None) -> dict:
    factory = factory or _FACTORY
    tick = tick or (_TICKS.put if _TICKS is not None else (lambda n: None))
    samples, hashes, waves = [], [], []
    timing = {"structure": 0.0, "simulate": 0.0, "image": 0.0, "mask": 0.0}
    for s in plan.structures_of(shard):
        records, wave_record = factory.structure_samples(s, plan.variants_of(s), keep_waves)
        for key, arrays, meta in records:
            samples.append(encode_sample(key, arrays, meta))
            hashes.append([key, sample_hash(key, arrays, meta)])
            for stage, seconds in meta["provenance"]["timing_s"].items():
                timing[stage] += seconds
        if wave_record is not None:
            waves.append(encode_sample(*wave_record))
        tick(len(records))
    name = SHARD_PATTERN.format(shard)
    write_shard(out / name, samples)
    record = {"name": name, "sha256": file_sha256(out / name), "n_samples": len(samples), "samples": hashes,
              "timing_s": timing}
    if keep_waves:
        wname = WAVE_SHARD_PATTERN.format(shard)
        write_shard(out / wname, waves)
        record["wave_shard"] = {"name": wname, "sha256": file_sha256(out / wname), "n_structures": len(waves)}
    # the record is written last: a shard counts as finished only when it exists
    write_atomic(out / PROGRESS_DIR / f"{name}.json", json.dumps(record).encode())
    return record


def _run_shard_in_worker(out: str, plan: Plan, shard: int, keep_waves: bool) -> dict:
    return make_shard(Path(out), plan, shard, keep_waves)


# ------------------------------------------------------------------------------------------------- driver side


def _run_identity(recipe: Recipe, seed: int, n: int, keep_waves: bool, dataset: str) -> dict:
    return {"format_version": FORMAT_VERSION, "recipe_hash": recipe.hash(), "recipe_name": recipe.name,
            "seed": seed, "n_samples": n, "keep_waves": keep_waves, "dataset": dataset}


def _check_output(out: Path, ident: dict) -> str:
    """'new', 'resume' or 'done'; refuses a folder that holds something else."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise DatasetError(f"--out {out}: exists and is not a folder")
    found = None
    manifest = out / MANIFEST
    run_file = out / PROGRESS_DIR / "run.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())["generation"]
    elif run_file.is_file():
        found = json.loads(run_file.read_text())
    elif any(out.iterdir()):
        raise DatasetError(f"--out {out}: folder is not empty and holds no dataset; choose a new or empty folder")
    else:
        return "new"
    diffs = [f"{k}: existing {found.get(k)!r}, requested {ident[k]!r}" for k in ident if found.get(k) != ident[k]]
    if diffs:
        raise DatasetError(f"--out {out} holds a dataset from a different recipe, seed or size; refusing to mix "
                           f"them ({'; '.join(diffs)}). Use a new folder.")
    return "done" if manifest.is_file() else "resume"


def _finished_records(out: Path, plan: Plan) -> dict[int, dict]:
    done = {}
    for shard in range(plan.n_shards):
        name = SHARD_PATTERN.format(shard)
        rec_path = out / PROGRESS_DIR / f"{name}.json"
        if not rec_path.is_file() or not (out / name).is_file():
            continue
        rec = json.loads(rec_path.read_text())
        if file_sha256(out / name) == rec["sha256"]:
            done[shard] = rec
    return done


def generate(recipe: Recipe, n: int, seed: int, out: Path, workers: int = 1, keep_waves: bool = False,
             dataset: str | None = None, progress: bool = True) -> dict:
    """Generate (or resume) a dataset; returns the manifest."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    dataset = dataset or f"{recipe.name}-seed{seed}"  # not the folder name: the same command gives the same hash anywhere
    ident = _run_identity(recipe, seed, n, keep_waves, dataset)
    state = _check_output(out, ident)
    if state == "done":
        return json.loads((out / MANIFEST).read_text())
    plan = Plan(n, recipe.imaging.n_conditions, recipe.output.structures_per_shard)
    progress_dir = out / PROGRESS_DIR
    progress_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(progress_dir / "run.json", json.dumps(ident).encode())
    for stale in out.rglob("*.partial"):  # shards that were being written when the last run died
        stale.unlink()
    records = _finished_records(out, plan)
    todo = [s for s in range(plan.n_shards) if s not in records]
    cache_dir = progress_dir / "substrate"

    from tqdm import tqdm

    bar = tqdm(total=n, initial=sum(r["n_samples"] for r in records.values()), unit="sample", disable=not progress,
               desc=f"generate {dataset}", dynamic_ncols=True)
    started = time.perf_counter()
    try:
        if todo:
            # the substrate bank is built once, here, before workers start; they read it from the cache
            SubstrateBank(recipe, seed, cache_dir).warm()
        if workers == 1 or len(todo) <= 1:
            factory = SampleFactory(recipe, seed, dataset, cache_dir) if todo else None
            for shard in todo:
                records[shard] = make_shard(out, plan, shard, keep_waves, factory, tick=bar.update)
        else:
            ctx = mp.get_context("spawn")
            ticks = ctx.Manager().Queue()
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                     initargs=(canonical_json(recipe.resolved()), seed, dataset, str(cache_dir),
                                               ticks)) as pool:
                pending = {pool.submit(_run_shard_in_worker, str(out), plan, s, keep_waves): s for s in todo}
                while pending:
                    finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    while not ticks.empty():
                        bar.update(ticks.get())
                    for fut in finished:
                        records[pending.pop(fut)] = fut.result()
                while not ticks.empty():
                    bar.update(ticks.get())
    finally:
        bar.close()
    elapsed = time.perf_counter() - started

    shards = [records[s] for s in range(plan.n_shards)]
    all_hashes = [tuple(h) for rec in shards for h in rec["samples"]]
    timing = {k: sum(rec["timing_s"][k] for rec in shards) for k in shards[0]["timing_s"]}
    manifest = {
        "name": dataset,
        "format_version": FORMAT_VERSION,
        "recipe": recipe.resolved(),
        "recipe_hash": recipe.hash(),
        "seed": seed,
        "n_samples": len(all_hashes),
        "n_structures": plan.n_structures,
        "imaging_conditions_per_structure": plan.variants,
        "content_hash": content_hash(all_hashes),
        "shards": [{k: rec[k] for k in ("name", "sha256", "n_samples", "samples")} for rec in shards],
        "wave_shards": [rec["wave_shard"] for rec in shards if "wave_shard" in rec],
        "generation": ident,
        "software": software_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timing_s": {"per_sample_by_stage": {k: v / len(all_hashes) for k, v in timing.items()},
                     "this_run_wall": elapsed},
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    shutil.rmtree(progress_dir, ignore_errors=True)
    return manifest
