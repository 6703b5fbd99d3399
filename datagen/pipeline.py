"""The generation pipeline: structure -> simulate -> image -> mask -> shards, resumable and parallel on local cores.

Work is split into shards of whole structures (so the imaging variants of one structure are simulated once and stay
together). A shard is a pure function of (recipe, seed, shard index): any process can make any shard, a finished
shard is never redone, and a half-written one (``*.partial``) is discarded and redone on resume.

Local workers are plain spawned processes (:func:`_run_on_processes`), each with a pipe to the driver: nothing of a
run outlives it, however it ends. A worker dies with the driver (PDEATHSIG, also if the driver is SIGKILLed) and
ignores Ctrl-C and SIGTERM, which the driver handles: it kills its workers, deletes what they left half-written, and
then exits as the signal says (``python -m datagen``: 130 for Ctrl-C, 143 for SIGTERM). No server process, no
semaphore, no temporary folder is involved (multiprocessing's resource tracker, which every spawn starts, exits by
itself once the driver and its workers are gone); a rerun into the same folder resumes.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import shutil
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrtem_core.cluster import connect
from hrtem_core.config import canonical_json, config_hash
from hrtem_core.dataset import (FORMAT_VERSION, MANIFEST, SHARD_PATTERN, WAVE_SHARD_PATTERN, build_manifest,
                                check_output, encode_sample, file_sha256, sample_hash, software_versions, to_jsonable,
                                utc_now, write_atomic, write_manifest, write_shard)
from hrtem_core.errors import InputError
from hrtem_core.locations import is_url, join, upload
from hrtem_core.processes import StopSignals, become_worker

from . import image as image_stage
from . import mask as mask_stage
from .recipe import Recipe, recipe_from_dict
from .seeding import Streams
from .cache import ArrayCache
from .simulate import ExitWaves, get_backend, simulate, warm_substrate_waves
from .structures import Scene, SubstrateBank, build_scene

PROGRESS_DIR = ".progress"
DASK_RETRIES = 2  # a shard whose task raised is tried again this often (a lost worker's shard is rescheduled anyway)


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


@dataclass
class SimulatedStructure:
    """One structure after the structure and simulate stages: what its imaging variants share."""

    index: int
    streams: Streams
    scene: Scene
    waves: ExitWaves
    lens: image_stage.ExitWaveLens
    particle_map: np.ndarray | None  # smoothed particle indicator on the potential grid (mask.particle_map)
    centre_px: tuple[float, float] | None  # particle centre on the image grid, [row, col]; None without a particle
    radius_px: float  # particle radius plus its margin, in image pixels (0 without a particle)
    timing_s: dict  # seconds: structure, simulate, lens (the waves' spectra), mask (the particle map)


@dataclass
class ImagingVariant:
    """One imaging condition of a structure: the detected image and its mask, cropped alike."""

    condition: dict
    crop_px: tuple[int, int]  # top-left corner of the crop on the image grid, [row, col]
    image: np.ndarray
    image_meta: dict
    mask: np.ndarray
    mask_meta: dict
    timing_s: dict  # seconds: image, mask


def prepare_substrate(recipe: Recipe, seed: int, cache_dir: Path) -> None:
    """Build the dataset's substrate bank into the cache in ``cache_dir``: its blocks and, for the fast engine, their
    exit waves. The driver calls this once, before workers start; they read the bank from the cache."""
    cache = ArrayCache(cache_dir)
    bank = SubstrateBank(recipe, seed, cache)
    bank.build_blocks()
    warm_substrate_waves(bank, cache)


class SampleFactory:
    """Makes the samples of one structure. One per process; holds the backend and the substrate bank, and the cache
    in ``cache_dir`` (None: memory) that both keep what is computed once per dataset in."""

    def __init__(self, recipe: Recipe, seed: int, dataset: str, cache_dir: Path | None):
        self.recipe = recipe
        self.seed = seed
        self.dataset = dataset
        self.recipe_hash = recipe.hash()
        cache = ArrayCache(cache_dir) if cache_dir else None
        self.bank = SubstrateBank(recipe, seed, cache)
        self.backend = get_backend(recipe.simulation.backend, cache)
        self.versions = software_versions()

    def simulate_structure(self, s: int) -> SimulatedStructure:
        """Scene, exit waves, lens and particle map of structure ``s``."""
        r = self.recipe
        streams = Streams(self.seed, s)
        t0 = time.perf_counter()
        scene = build_scene(r, streams, self.bank)
        t1 = time.perf_counter()
        waves = simulate(scene, r.simulation, streams, self.backend)
        t2 = time.perf_counter()
        smooth_mask = mask_stage.particle_map(waves.particle, waves.sampling_A, r.mask)
        t3 = time.perf_counter()
        lens = image_stage.ExitWaveLens(waves.full, waves.sampling_A, r.simulation.energy_eV)
        t4 = time.perf_counter()
        pixel = r.structure.cell.extent_A / r.image_grid_px
        centre = None
        radius_px = 0.0
        if scene.particle is not None:
            cx, cy = scene.particle.center_A[0], scene.particle.center_A[1]
            centre = (cy / pixel, cx / pixel)
            radius_px = (scene.particle.radius_A + r.structure.particle.margin_A) / pixel
        return SimulatedStructure(s, streams, scene, waves, lens, smooth_mask, centre, radius_px,
                                  {"structure": t1 - t0, "simulate": t2 - t1, "mask": t3 - t2, "lens": t4 - t3})

    def image_variant(self, structure: SimulatedStructure, v: int) -> ImagingVariant:
        """Imaging condition ``v`` of a simulated structure: its image and mask."""
        r = self.recipe
        vs = structure.streams.for_variant(v)
        tv0 = time.perf_counter()
        cond = image_stage.draw_condition(r.imaging, vs)
        intensity = structure.lens.intensity(cond)
        origin = structure.scene.field_origin_A
        if origin is not None:  # particles placed in a fixed field of view (several, or off-field): crop to it
            pixel = r.structure.cell.extent_A / r.image_grid_px
            crop = (int(round(origin[1] / pixel)), int(round(origin[0] / pixel)))
        else:
            crop = image_stage.choose_crop(r, r.image_grid_px, structure.centre_px, structure.radius_px,
                                           vs.rng("imaging.crop"))
        img, img_meta = image_stage.make_image(intensity, r, cond, crop, vs)
        tv1 = time.perf_counter()
        mask, mask_meta = mask_stage.mask_on_image(structure.particle_map, r, crop)
        tv2 = time.perf_counter()
        return ImagingVariant(cond, crop, img, img_meta, mask, mask_meta, {"image": tv1 - tv0, "mask": tv2 - tv1})

    def structure_samples(self, s: int, n_variants: int, keep_waves: bool = False):
        """[(key, arrays, metadata)] for the imaging variants of structure ``s`` (and its waves if kept)."""
        r = self.recipe
        st = self.simulate_structure(s)
        waves, centre = st.waves, st.centre_px
        st_meta = to_jsonable(st.scene.metadata)
        # structure, simulation, the lens and the particle map are shared by the variants: their cost is split
        shared = {k: v / n_variants for k, v in st.timing_s.items()}
        out = []
        for v in range(n_variants):
            variant = self.image_variant(st, v)
            cond, crop = variant.condition, variant.crop_px
            structure = dict(st_meta)
            structure["structure_index"] = s
            if centre is not None:
                structure["center_px"] = [centre[0] - crop[0], centre[1] - crop[1]]
            if "particles" in structure:  # per-particle record (see structures.build_scene): centres on this image
                pixel = r.structure.cell.extent_A / r.image_grid_px
                structure["particles"] = [{**rec, "center_px": [rec["center_A"][1] / pixel - crop[0],
                                                                 rec["center_A"][0] / pixel - crop[1]]}
                                          for rec in structure["particles"]]
            imaging = {**cond, "C10_A": -cond["defocus_A"], **variant.image_meta,
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
                "mask": variant.mask_meta,
                "provenance": {
                    "recipe": r.name,
                    "recipe_hash": self.recipe_hash,
                    "versions": self.versions,
                    "created_utc": utc_now(),
                    "host": socket.gethostname(),
                    "timing_s": {"structure": shared["structure"], "simulate": shared["simulate"],
                                 "image": shared["lens"] + variant.timing_s["image"],
                                 "mask": shared["mask"] + variant.timing_s["mask"]},
                },
            }
            out.append((key, {"image.npy": variant.image, "mask.npy": variant.mask}, to_jsonable(meta)))
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

FAULT_HOLD_ENV = "HRTEM_FAULT_HOLD"


def _fault_hold(point: str) -> None:
    """Fault injection for tests only (tests/test_faults_generation.py); nothing happens unless $HRTEM_FAULT_HOLD
    is set, which nothing but those tests does.

    With ``HRTEM_FAULT_HOLD=<point>:<file>``, the first process (driver or worker) to reach ``point`` creates
    ``<file>`` (holding its pid) and waits there until it is killed, so that a test kills a run at an exact point:
    ``start`` (substrate bank built, no shard begun), ``partial`` (a shard's tar written under its ``.partial`` name,
    not yet renamed), ``unrecorded`` (a shard's tar in place, its progress record not yet written), ``manifest``
    (every shard recorded, no manifest yet), ``cleanup`` (the manifest written, the progress folder still there)."""
    spec = os.environ.get(FAULT_HOLD_ENV)
    if not spec:
        return
    wanted, _, marker = spec.partition(":")
    if wanted != point:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # another process holds there already
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    while True:
        time.sleep(3600)


def _then_hold(items, point: str):
    yield from items
    _fault_hold(point)


def make_shard(out: Path, plan: Plan, shard: int, keep_waves: bool, factory: SampleFactory, tick=None) -> dict:
    tick = tick or (lambda n: None)
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
    write_shard(out / name, _then_hold(samples, "partial"))
    _fault_hold("unrecorded")
    record = {"name": name, "sha256": file_sha256(out / name), "n_samples": len(samples), "samples": hashes,
              "timing_s": timing}
    if keep_waves:
        wname = WAVE_SHARD_PATTERN.format(shard)
        write_shard(out / wname, waves)
        record["wave_shard"] = {"name": wname, "sha256": file_sha256(out / wname), "n_structures": len(waves)}
    # the record is written last: a shard counts as finished only when it exists
    write_atomic(out / PROGRESS_DIR / f"{name}.json", json.dumps(record).encode())
    return record


def _shard_worker(conn, parent_pid: int, recipe_json: str, seed: int, dataset: str, cache_dir: str, out: str,
                  plan: Plan, keep_waves: bool) -> None:
    """A local worker process (:func:`_run_on_processes`): makes the shards whose indices the driver sends over
    ``conn`` until it sends None; sends ("tick", n) after each structure, ("done", record) after each shard, and
    ("error", pickled exception, traceback) if anything fails (then ends)."""
    become_worker(parent_pid)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        factory = SampleFactory(recipe_from_dict(json.loads(recipe_json)), seed, dataset, Path(cache_dir))
        while (shard := conn.recv()) is not None:
            record = make_shard(Path(out), plan, shard, keep_waves, factory, tick=lambda n: conn.send(("tick", n)))
            conn.send(("done", record))
    except EOFError:  # the driver is gone
        return
    except BaseException as exc:
        conn.send(("error", _portable(exc), traceback.format_exc()))


def _portable(exc: BaseException) -> bytes:
    """``exc`` pickled, or a RuntimeError with its type and message where it does not survive a round trip."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


class WorkerTraceback(Exception):
    """The traceback of an error raised in a worker process (the cause of the error re-raised in the driver)."""

    def __str__(self) -> str:
        return f"\n{self.args[0]}"


_DASK_STATE = threading.local()  # per task thread of a Dask worker: the factory of the dataset it last worked on


def make_shard_on_dask(out: str, recipe_json: str, seed: int, dataset: str, cache_dir: str, plan: Plan, shard: int,
                       keep_waves: bool) -> dict:
    """One shard as a Dask task. A worker keeps the SampleFactory (backend, substrate bank) of the dataset it last
    made a shard of, so the shards of one dataset that land on it pay for those once."""
    key = (recipe_json, seed, dataset, cache_dir)
    if getattr(_DASK_STATE, "key", None) != key:
        _DASK_STATE.factory = SampleFactory(recipe_from_dict(json.loads(recipe_json)), seed, dataset, Path(cache_dir))
        _DASK_STATE.key = key
    return make_shard(Path(out), plan, shard, keep_waves, _DASK_STATE.factory, tick=lambda n: None)


def _run_on_dask(client, out: Path, plan: Plan, todo: list[int], recipe: Recipe, seed: int, dataset: str,
                 cache_dir: Path, keep_waves: bool, records: dict, bar) -> None:
    """The shards in ``todo`` as Dask tasks on ``client``'s cluster. A shard is a pure function of (recipe, seed,
    index) written atomically: a worker lost mid-shard costs that shard, which the scheduler gives to another worker.
    A shard made twice has the same samples but not the same bytes (provenance timings): the manifest takes each
    shard's record from disk once the cluster has stopped working on the dataset."""
    from distributed import as_completed

    from hrtem_core.cluster import check_workers

    check_workers(client, [out, cache_dir])
    recipe_json = canonical_json(recipe.resolved())
    token = config_hash(_run_identity(recipe, seed, plan.n_samples, keep_waves, dataset))[:16]
    futures = {client.submit(make_shard_on_dask, str(out.absolute()), recipe_json, seed, dataset,
                             str(cache_dir.absolute()), plan, s, keep_waves, key=f"hrtem-shard-{token}-{s:06d}",
                             retries=DASK_RETRIES): s for s in todo}
    keys = [f.key for f in futures]
    for future in as_completed(futures, loop=client.loop):
        bar.update(future.result()["n_samples"])
    # A finished task's result lives on its worker: if that worker dies while a future still holds the key, the
    # scheduler computes the shard again, and the second execution writes the file again (the same samples, other
    # provenance timings: other bytes) after its first record was returned here. So the records are not taken from
    # the futures: the futures are released (nothing more is recomputed), executions still running are waited for,
    # and each shard's record is read from disk, where the execution that wrote the file last wrote its record last.
    del future, futures
    _wait_until_idle(client, keys)
    on_disk = _finished_records(out, plan)
    lost = [SHARD_PATTERN.format(s) for s in todo if s not in on_disk]
    if lost:
        raise RuntimeError(f"{out}: {', '.join(lost)} changed while the cluster finished (a worker was lost and the "
                           "shard computed again): run the same command again; it resumes and remakes only these")
    records.update({s: on_disk[s] for s in todo})


DASK_SETTLE_S = 300  # how long generate waits for tasks of its own that the cluster is still running after the end


def _wait_until_idle(client, keys: list[str]) -> None:
    """Wait until neither the scheduler nor any worker holds one of ``keys`` (a released task that a worker is
    still executing runs to its end: it may still write its shard)."""
    wanted = set(keys)

    def on_workers(dask_worker, keys=()):
        return [k for k in keys if k in dask_worker.state.tasks]

    def on_scheduler(dask_scheduler, keys=()):
        return [k for k in keys if k in dask_scheduler.tasks]

    deadline = time.monotonic() + DASK_SETTLE_S
    while True:
        busy = set(client.run_on_scheduler(on_scheduler, keys=list(wanted)))
        busy.update(k for held in client.run(on_workers, keys=list(wanted)).values() for k in held)
        if not busy:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster still runs {len(busy)} shard task(s) of this dataset {DASK_SETTLE_S} s "
                               "after the end: run the same command again once it is idle")
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------- driver side


def _run_identity(recipe: Recipe, seed: int, n: int, keep_waves: bool, dataset: str) -> dict:
    return {"format_version": FORMAT_VERSION, "recipe_hash": recipe.hash(), "recipe_name": recipe.name,
            "seed": seed, "n_samples": n, "keep_waves": keep_waves, "dataset": dataset}


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


def _remove_partials(out: Path, pids) -> None:
    """Delete the half-written files (``<name>.<pid>.partial``, :mod:`hrtem_core.files`) that the processes ``pids``
    (stopped: this run's) left anywhere in ``out``."""
    ends = tuple(f".{pid}.partial" for pid in pids)
    if ends and out.is_dir():
        for path in list(out.rglob("*.partial")):
            if path.name.endswith(ends):
                _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: object  # the driver's end of the worker's pipe
    shard: int | None = None  # the shard it is making


WORKER_EXIT_S = 60  # how long a worker that was told to stop may take to exit before it is killed


def _run_on_processes(out: Path, plan: Plan, todo: list[int], workers: int, recipe: Recipe, seed: int,
                      dataset: str, cache_dir: Path, keep_waves: bool, records: dict, bar) -> None:
    """The shards in ``todo`` on ``workers`` spawned processes, one shard at a time each, over a pipe per worker.

    Plain processes and pipes, not a pool, so that nothing outlives this call however it ends: no server process (a
    Manager's outlives a killed driver), no semaphore (a pool's queues leave theirs in /dev/shm when the driver dies
    without its exit handlers), and a worker that dies is seen at once (its pipe ends). Workers die with the driver
    (PDEATHSIG) and leave Ctrl-C and SIGTERM to it (:func:`hrtem_core.processes.become_worker`). On such a signal,
    or if a worker fails or dies, the workers are killed at once (the shards they were making are redone on resume),
    their half-written files deleted, and only then is the error raised or the signal delivered."""
    ctx = mp.get_context("spawn")
    recipe_json = canonical_json(recipe.resolved())
    queue = list(reversed(todo))  # popped from the end: lowest index first
    team: list[_Worker] = []
    finished = False
    with StopSignals() as stop:
        try:
            with stop.blocked():  # the workers start with both blocked, until they ignore them
                for _ in range(min(workers, len(todo))):
                    here, there = ctx.Pipe()
                    proc = ctx.Process(target=_shard_worker, name=f"generate-worker-{len(team)}",
                                       args=(there, os.getpid(), recipe_json, seed, dataset, str(cache_dir), str(out),
                                             plan, keep_waves))
                    try:
                        proc.start()
                    except BaseException:
                        here.close()
                        raise
                    finally:
                        there.close()  # the worker's end is the worker's: its death ends the pipe
                    team.append(_Worker(proc, here))
            busy = {w.conn: w for w in team}
            for w in team:
                _next_shard(w, queue, busy)
            while busy and not stop.received:
                for conn in multiprocessing.connection.wait([*busy, stop]):
                    if conn is stop:
                        break
                    w = busy[conn]
                    try:
                        kind, *payload = conn.recv()
                    except (EOFError, OSError):
                        raise _worker_died(w) from None
                    if kind == "tick":
                        bar.update(payload[0])
                    elif kind == "done":
                        records[w.shard] = payload[0]
                        _next_shard(w, queue, busy)
                    else:
                        exc = pickle.loads(payload[0])
                        raise exc from WorkerTraceback(payload[1])
            finished = not busy
        finally:
            if not finished:
                for w in team:
                    w.process.kill()
            for w in team:
                w.process.join(WORKER_EXIT_S)
                if w.process.exitcode is None:  # told to stop, but still there
                    w.process.kill()
                    w.process.join()
                w.conn.close()
            if not finished:
                _remove_partials(out, [w.process.pid for w in team if w.process.pid is not None])


def _next_shard(w: _Worker, queue: list[int], busy: dict) -> None:
    """Give worker ``w`` the next shard of ``queue``, or tell it to stop (and stop waiting for it) if none is left."""
    w.shard = queue.pop() if queue else None
    try:
        w.conn.send(w.shard)
    except OSError:
        raise _worker_died(w) from None
    if w.shard is None:
        busy.pop(w.conn)


def _worker_died(w: _Worker) -> RuntimeError:
    w.process.join(WORKER_EXIT_S)
    doing = f"while making {SHARD_PATTERN.format(w.shard)}" if w.shard is not None else "before its first shard"
    return RuntimeError(f"worker process {w.process.pid} ended {doing} (exit code {w.process.exitcode}, see its "
                        "output above); run the same command again to resume")


STAGING_ENV = "HRTEM_STAGING_DIR"


def _generate_to_object_store(recipe: Recipe, n: int, seed: int, out: str, workers: int, keep_waves: bool,
                              dataset: str | None, progress: bool, scheduler) -> dict:
    """Generate into a local staging folder (resumable as any local run; ``$HRTEM_STAGING_DIR``, default
    ``.hrtem-staging/`` in the working directory, which Dask workers must share), then upload the shards and, last,
    the manifest: a dataset on object storage is finished exactly when its manifest object exists."""
    dataset = dataset or f"{recipe.name}-seed{seed}"
    ident = _run_identity(recipe, seed, n, keep_waves, dataset)
    state, manifest = check_output(out, ident)
    if state == "done":
        return manifest
    staging = Path(os.environ.get(STAGING_ENV, ".hrtem-staging")).absolute() / config_hash(ident)[:16]
    manifest = generate(recipe, n, seed, staging, workers, keep_waves, dataset, progress, scheduler)
    for shard in (*manifest["shards"], *manifest["wave_shards"]):
        upload(staging / shard["name"], join(out, shard["name"]))
    upload(staging / MANIFEST, join(out, MANIFEST))
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def generate(recipe: Recipe, n: int, seed: int, out: Path, workers: int = 1, keep_waves: bool = False,
             dataset: str | None = None, progress: bool = True, scheduler=None) -> dict:
    """Generate (or resume) a dataset; returns the manifest.

    ``workers`` local processes make the shards, or, with ``scheduler`` (a Dask scheduler address, scheduler file
    or cluster object, see :mod:`hrtem_core.cluster`), the workers of a Dask cluster that share ``out``'s filesystem.
    ``out`` may be an object-storage prefix (``s3://bucket/prefix``): see :func:`_generate_to_object_store`. The
    content hash is the same either way."""
    if is_url(out):
        return _generate_to_object_store(recipe, n, seed, str(out), workers, keep_waves, dataset, progress, scheduler)
    if n < 1:
        raise InputError(f"--n must be >= 1, got {n}")
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    dataset = dataset or f"{recipe.name}-seed{seed}"  # not the folder name: the same command gives the same hash anywhere
    ident = _run_identity(recipe, seed, n, keep_waves, dataset)
    state, manifest = check_output(out, ident, progress_file=out / PROGRESS_DIR / "run.json")
    if state == "done":
        if (out / PROGRESS_DIR).exists():  # left by a run killed after it wrote the manifest
            shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
        return manifest
    # before anything is written: a cluster that cannot take the work leaves no folder behind
    client = connect(scheduler) if scheduler is not None else None
    bar = None
    try:
        plan = Plan(n, recipe.imaging.n_conditions, recipe.output.structures_per_shard)
        progress_dir = out / PROGRESS_DIR
        progress_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(progress_dir / "run.json", json.dumps(ident).encode())
        for stale in list(out.rglob("*.partial")):  # what was being written when the last run died
            _remove(stale)
        records = _finished_records(out, plan)
        todo = [s for s in range(plan.n_shards) if s not in records]
        cache_dir = progress_dir / "substrate"

        from tqdm import tqdm

        bar = tqdm(total=n, initial=sum(r["n_samples"] for r in records.values()), unit="sample", disable=not progress,
                   desc=f"generate {dataset}", dynamic_ncols=True)
        started = time.perf_counter()
        if todo:
            # the substrate bank is built once, here, before workers start; they read it from the cache
            prepare_substrate(recipe, seed, cache_dir)
            _fault_hold("start")
        if scheduler is not None and todo:
            _run_on_dask(client, out, plan, todo, recipe, seed, dataset, cache_dir, keep_waves, records, bar)
        elif workers == 1 or len(todo) <= 1:
            factory = SampleFactory(recipe, seed, dataset, cache_dir) if todo else None
            for shard in todo:
                records[shard] = make_shard(out, plan, shard, keep_waves, factory, tick=bar.update)
        else:
            _run_on_processes(out, plan, todo, workers, recipe, seed, dataset, cache_dir, keep_waves, records, bar)
    except BaseException:
        _remove_partials(out, [os.getpid()])  # what this process was writing (its workers' are gone already)
        raise
    finally:
        if bar is not None:
            bar.close()
        if client is not None:
            client.close()
    elapsed = time.perf_counter() - started

    shards = [records[s] for s in range(plan.n_shards)]
    n_done = sum(rec["n_samples"] for rec in shards)
    timing = {k: sum(rec["timing_s"][k] for rec in shards) for k in shards[0]["timing_s"]}
    manifest = build_manifest(
        dataset, shards, generation=ident, software=software_versions(), created_utc=utc_now(),
        recipe=recipe.resolved(), recipe_hash=recipe.hash(), seed=seed, n_structures=plan.n_structures,
        imaging_conditions_per_structure=plan.variants,
        wave_shards=[rec["wave_shard"] for rec in shards if "wave_shard" in rec],
        timing_s={"per_sample_by_stage": {k: v / n_done for k, v in timing.items()}, "this_run_wall": elapsed})
    _fault_hold("manifest")
    write_manifest(out, manifest)
    _fault_hold("cleanup")
    shutil.rmtree(progress_dir, ignore_errors=True)
    return manifest
