"""Sweeps: data subsets x seeds x phases (pretrain, then a fine-tune of each pretrained model).

Every (cell, phase) is a unit in a claims database (``--storage``: SQLite in ``mlruns/sweeps.db`` by default,
PostgreSQL shared by workers on many machines; see :mod:`experiments.claims`). Workers — local processes, or any
number of ``sweep`` commands on other machines — claim units one at a time, renew their lease while they train, and
record the MLflow run of a finished unit by a commit that only the current holder can make. A fine-tune is claimable
once its cell's pretrain is done and starts from exactly that recorded pretrain run.

The rule, whatever the timing: a unit is recorded once. A worker that is killed leaves its claim to expire (on the same
host a dead process is seen at once); a worker that stalls past its lease loses the unit to another and, when it
wakes, finds its claim gone: it stops training, or its commit is refused, and its run ends KILLED, tagged
``superseded``. On every start and at the end, MLflow is brought into line with the claims (runs of dead or
superseded holders end KILLED; a run whose commit landed just before its worker died ends FINISHED), and the sweep
exits non-zero, naming the units, if any is missing or recorded twice.
"""

from __future__ import annotations

import random
import re
import sys
import time
from pathlib import Path
from collections import Counter
from dataclasses import dataclass

import sqlalchemy as sa
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient

from hrtem_core.config import config_hash
from hrtem_core.errors import ConfigError, InputError
from mlplatform import mlflow_ui
from mlplatform.model_format import LEGACY_PRETRAIN_RUN, PRETRAIN_RUN
from mlplatform.store import resolve_tracking_uri
from mlplatform.tracking import Superseded, close_run, find_runs, get_or_create_experiment, is_insert_race
from mlplatform.train import check_trainer, curate_checked, train

from . import claims
from .claims import CLAIMED, DONE, FAILED, PENDING
from .specs import (Cell, Design, Experiment, cells_of, load_experiment, phases_for, phases_of, selector_phase,
                    unit_config, unit_phase)
from .datasets import datasets_read, ensure_datasets
from .progress import QueueProgress
from .workers import dispatch, share_cores

POLL_S = 1.0  # how often a worker with nothing to claim looks again


def _experiment_name(exp: Experiment) -> str:
    return exp.config(exp.spec.subsets[0].set).tracking.experiment


# -- before anything exists: every subset's configs checked against the data and this machine ----------------------

def groups_of(exp: Experiment) -> list[Cell]:
    """One cell per (subset, axis levels): the cells of the first seed."""
    first = exp.spec.seed_list[0]
    return [c for c in cells_of(exp) if c.seed == first]


def check_sweep(exp: Experiment, machine: bool = True) -> None:
    """What every cell's configs imply, checked before the sweep is registered (no claim, no MLflow run): the
    trainer settings on this machine (``machine``; not when other machines train, e.g. Dask workers), and each
    cell's data curated once (filters that select something, enough structures to split, crop size within the
    images, benchmarks and fine-tune data at the pretrain's pixel size). InputError naming the subset, the axis
    levels, the key and where its value came from. The study's own datasets must exist (:mod:`.datasets`)."""
    tried: set[str] = set()
    curated: dict[str, object] = {}
    design = Design(exp.spec)
    for cell in groups_of(exp):
        pixel = {}
        for phase in phases_for(exp, cell, design):
            config = unit_config(exp, cell.subset, cell.levels, phase)
            settings = config_hash(config.trainer.model_dump(mode="json"))
            if machine and settings not in tried:
                check_trainer(config)
                tried.add(settings)
            # the data a phase reads: the same definition is curated once (a fine-tune's data are often shared)
            data = config_hash({"seed": config.seed, "data": config.data.model_dump(mode="json"),
                                "benchmarks": [b.model_dump(mode="json") for b in config.benchmarks]})
            if data not in curated:
                curated[data] = curate_checked(config)
            pixel[phase] = curated[data].pixel_size_A
            if phase != "pretrain" and abs(pixel[phase] - pixel["pretrain"]) > 1e-6:
                raise ConfigError(f"{config.origin('data.train')}: {pixel[phase]} Å pixels: the fine-tune data must "
                                  f"have the pretrain data's pixel size ({pixel['pretrain']} Å); resample them or "
                                  "choose other data")


# -- opening a sweep: idempotent, safe when many processes start at once -------------------------------------------

@dataclass
class SweepContext:
    """Where a sweep lives: its claims and its runs (enough to inspect and repair it without its definition)."""
    name: str
    experiment: str  # MLflow experiment of its runs
    engine: sa.Engine
    tracking_uri: str
    parent: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


def open_sweep(exp: Experiment, storage_url: str | None, tracking_uri: str) -> SweepContext:
    """Queue the sweep's units and make sure its parent run exists; any step a killed process left undone is done."""
    engine = claims.open_engine(storage_url)
    design = Design(exp.spec)
    units = [(c.index, c.key, p) for c in cells_of(exp) for p in phases_for(exp, c, design)]
    row = claims.register_sweep(engine, exp.name, exp.fingerprint(), _experiment_name(exp), units,
                                previous_fingerprint=exp.legacy_fingerprint())
    exp_id = get_or_create_experiment(row["experiment"], tracking_uri)
    client = MlflowClient(tracking_uri)
    parent = row["parent_run"] or _legacy_parent(exp, tracking_uri)
    if parent is None:
        # every process that sees no parent makes a candidate; the database keeps one, the others are deleted
        run = client.create_run(exp_id, run_name=f"sweep-{exp.name}", tags={"sweep.candidate": exp.name})
        parent = claims.set_parent_run(engine, exp.name, run.info.run_id)
        if parent != run.info.run_id:
            client.delete_run(run.info.run_id)
    else:
        parent = claims.set_parent_run(engine, exp.name, parent)
    with claims.exclusive(engine, _writes_key(exp.name)):
        _complete_parent(client, exp, parent, engine)
    ctx = SweepContext(exp.name, row["experiment"], engine, tracking_uri, parent)
    _adopt_legacy_runs(ctx)
    return ctx


def _writes_key(sweep: str) -> str:
    """The lock (:func:`claims.exclusive`) of the MLflow writes that every worker of a sweep may make: completing
    and summarising the parent run, ending runs out of line with the claims. Unlocked, three workers finishing at
    once each set the parent's tags and metrics, and MLflow's read-then-insert collides on a unique key (or logs each
    summary metric three times)."""
    return f"sweep-mlflow-writes:{sweep}"


def _legacy_parent(exp: Experiment, tracking_uri: str) -> str | None:
    """The parent run of this sweep made before sweeps had claims (same name and definition), if there is one."""
    parents = find_runs(tracking_uri, _experiment_name(exp), f"tags.kind = 'sweep' and tags.sweep = '{exp.name}'")
    if not parents:
        return None
    if parents[-1].data.tags.get("sweep.fingerprint") not in (exp.fingerprint(), exp.legacy_fingerprint()):
        raise InputError(f"sweep {exp.name!r} already exists in {tracking_uri} (run {parents[-1].info.run_id}) with "
                         "a different definition; give the changed sweep a new name")
    return parents[-1].info.run_id  # the first one made: the one its cells were reused under


def _adopt_legacy_runs(ctx: SweepContext) -> None:
    """Units finished by a sweep of this name before it had claims count as done: their earliest FINISHED run (the
    one that sweep reused) is recorded; any later one is reported as a duplicate by :func:`summarize`."""
    pending = {(r["cell_key"], r["phase"]): r for r in claims.unit_rows(ctx.engine, ctx.name)
               if r["state"] == PENDING and r["epoch"] == 0}
    if not pending:
        return
    legacy = [r for r in cell_runs(ctx) if r.info.status == "FINISHED" and "sweep.claim_epoch" not in r.data.tags]
    for run in sorted(legacy, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        row = pending.pop(_unit_key(run), None)
        if row is not None:
            claims.adopt(ctx.engine, claims.UnitKey(ctx.name, row["cell"], row["phase"]), run.info.run_id)


def load_sweep(name: str, storage_url: str | None, tracking_uri: str) -> SweepContext:
    """A registered sweep, by name (ValueError naming the known ones if there is none)."""
    engine = claims.open_engine(storage_url)
    row = claims.sweep_row(engine, name)
    if row is None:
        raise InputError(f"--sweep {name!r}: no such sweep in {claims.redact(str(engine.url))}; sweeps there: "
                         f"{', '.join(claims.sweep_names(engine)) or 'none'}")
    return SweepContext(name, row["experiment"], engine, tracking_uri, row["parent_run"])


def _complete_parent(client: MlflowClient, exp: Experiment, parent: str, engine: sa.Engine) -> None:
    run = client.get_run(parent)
    if run.data.tags.get("kind") == "sweep" and run.info.status == "FINISHED":
        return
    client.log_dict(parent, exp.spec.model_dump(mode="json"), "sweep/definition.yaml")
    client.log_dict(parent, exp.base, "sweep/base.yaml")
    # the tags that make it the sweep's parent come last: a run that has them is complete
    for key, value in {"sweep.storage": claims.redact(str(engine.url)), "sweep.fingerprint": exp.fingerprint(),
                       "sweep": exp.name, "kind": "sweep"}.items():
        client.set_tag(parent, key, value)
    client.set_terminated(parent, "FINISHED")  # a container: the cells are its children


# -- MLflow brought into line with the claims ----------------------------------------------------------------------

def cell_runs(ctx: SweepContext) -> list:
    return find_runs(ctx.tracking_uri, ctx.experiment, f"tags.sweep = '{ctx.name}' and "
                     "tags.kind = 'cell'")


def _unit_key(run) -> tuple[str | None, str | None]:
    """(cell key, unit phase) of a cell run: a fine-tune variant's unit phase is ``ft:<variant>``."""
    tags = run.data.tags
    variant = tags.get("sweep.variant")
    phase = tags.get("phase")
    return tags.get("sweep.cell"), unit_phase(variant) if phase == "finetune" and variant else phase


def align_runs(ctx: SweepContext, fix: bool = True) -> list[str]:
    """Bring each cell run's status into line with its unit's claim; returns what was (or, without ``fix``, would
    be) changed, one line per run.

    A committed run ends FINISHED (its worker died between the commit and ending the run). A RUNNING run ends KILLED
    when no live claim stands behind it: its unit was taken over (a newer epoch), given back, or its holder is
    provably dead. A run still covered by its holder's claim is left alone: that worker may yet commit it.
    """
    if fix:
        with claims.exclusive(ctx.engine, _writes_key(ctx.name)):
            return _align_runs(ctx, fix)
    return _align_runs(ctx, fix)


def _align_runs(ctx: SweepContext, fix: bool) -> list[str]:
    # runs first, claims second: a run's claim is at least as new as the run, so a live worker's run just started is
    # never judged against an older claim; a status is re-read before it is changed
    runs = cell_runs(ctx)
    by_key = {(r["cell_key"], r["phase"]): r for r in claims.unit_rows(ctx.engine, ctx.name)}
    client, changes = ctx.client, []
    for run in runs:
        row, rid, status = by_key.get(_unit_key(run)), run.info.run_id, run.info.status
        if row is None:
            continue
        if row["state"] == DONE and row["run_id"] == rid:
            if status != "FINISHED":
                changes.append(f"{rid} ({row['cell_key']}:{row['phase']}): {status} -> FINISHED (its result was "
                               "committed; the worker stopped before ending the run)")
                if fix:
                    client.set_terminated(rid, "FINISHED")
            continue
        if status != "RUNNING":
            continue
        epoch = run.data.tags.get("sweep.claim_epoch")
        covered = (row["state"] == CLAIMED and epoch == str(row["epoch"]) and not claims.holder_is_dead(row["holder"]))
        if covered or client.get_run(rid).info.status != "RUNNING":  # live, or ended by its worker meanwhile
            continue
        superseded = row["state"] == DONE or (row["state"] == CLAIMED and epoch != str(row["epoch"]))
        why = ("its unit was taken over by another worker" if superseded else
               "its worker died" if row["state"] == CLAIMED else "its worker died or gave the unit back")
        changes.append(f"{rid} ({row['cell_key']}:{row['phase']}): RUNNING -> KILLED ({why})")
        if fix:
            close_run(client, rid, "KILLED", f"closed by the sweep: {why}", superseded)
    return changes


# -- workers ---------------------------------------------------------------------------------------------------------

class ClaimGuard(Callback):
    """Stops training as soon as the unit's claim is lost, so a superseded worker wastes no more time."""

    def __init__(self, claim: claims.Claim):
        self.claim = claim

    def _check(self) -> None:
        if self.claim.lost.is_set():
            raise Superseded(f"unit {self.claim.cell_key}:{self.claim.key.phase} was taken over by another worker "
                             f"(epoch {self.claim.epoch} is no longer current)")

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self._check()

    def on_validation_end(self, *args, **kwargs) -> None:
        self._check()


def is_infrastructure_error(exc: BaseException) -> bool:
    """A failure that is not the unit's fault: a lost or locked database, a refused connection, an insert race."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # MLflow wraps the database's error: look along the chain
        seen.add(id(exc))
        if isinstance(exc, (sa.exc.OperationalError, ConnectionError, TimeoutError, requests.ConnectionError)):
            return True
        if isinstance(exc, MlflowException) and exc.error_code == "TEMPORARILY_UNAVAILABLE":
            return True  # MLflow's word for an OperationalError of its store (lost connection, aborted pipeline)
        text = str(exc)
        if is_insert_race(exc) or "database is locked" in text or "TEMPORARILY_UNAVAILABLE" in text:
            return True
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def _run_unit(ctx: SweepContext, exp: Experiment, claim: claims.Claim, cell: Cell, pretrain_run: str | None,
              me: str, progress: bool) -> bool:
    """Train the claimed unit; True if this worker's run is its recorded result."""
    phase = claim.key.phase
    variant = selector_phase(phase) if phase.startswith("ft:") else None
    per_cell = {"seed": cell.seed, "tracking.subset": cell.subset}
    if cell.levels or variant:  # the run's name carries every coordinate (sweeps without them keep their names)
        per_cell["tracking.run_name"] = "-".join([cell.group.replace("/", "-"), f"s{cell.seed}",
                                                  variant or ("finetune" if phase != "pretrain" else "pretrain")])
    config = unit_config(exp, cell.subset, cell.levels, phase, per_cell)
    tags = {"sweep": exp.name, "kind": "cell", "sweep.subset": cell.subset, "sweep.cell": cell.key,
            "sweep.claim_epoch": str(claim.epoch), "sweep.worker": me}
    if cell.levels:
        tags["sweep.group"] = cell.group
        tags.update({f"sweep.axis.{key}": level for key, level in cell.levels})
    if variant:
        tags["sweep.variant"] = variant
    with claim:
        try:
            train(config, "pretrain" if phase == "pretrain" else "finetune", init_from=pretrain_run,
                  tracking_uri=ctx.tracking_uri, progress=progress,
                  extra_tags=tags, nest_under=ctx.parent, callbacks=[ClaimGuard(claim)], commit=claim.commit)
            return True
        except Superseded as exc:
            print(f"sweep {exp.name}: {cell.key}:{phase}: {exc}; this worker's run ends KILLED", file=sys.stderr)
            return False
        except Exception as exc:  # noqa: BLE001  the unit failed; the claims decide whether it is tried again
            infra = is_infrastructure_error(exc)
            message = f"{type(exc).__name__}: {exc}"
            state = claim.release(message, "infra" if infra else "unit", exp.spec.max_retries)
            print(f"sweep {exp.name}: {cell.key}:{phase} failed ({'not its fault, ' if infra else ''}"
                  f"{'given up' if state == FAILED else 'will be tried again'}): {message}", file=sys.stderr)
            return False
        except BaseException:  # Ctrl-C, SIGTERM: give the unit back at once, without counting a failure
            try:
                claim.release("interrupted", "interrupted", exp.spec.max_retries)
            except Exception:  # noqa: BLE001  the lease runs out instead
                pass
            raise


def _settled(row: dict, by_key: dict) -> bool:
    """Nothing more will happen to this unit: recorded, given up, or a fine-tune whose pretrain was given up."""
    if row["state"] in (DONE, FAILED):
        return True
    return row["phase"] != "pretrain" and by_key[(row["cell"], "pretrain")]["state"] == FAILED


def worker(exp: Experiment, storage_url: str | None, tracking_uri: str, progress: bool = False,
           ctx: SweepContext | None = None) -> int:
    """Claim and train units until every one is settled; returns the number this worker recorded. ``ctx``: the
    sweep as this process already opened it."""
    ctx = ctx or open_sweep(exp, storage_url, tracking_uri)
    me = claims.worker_identity()
    cells = {c.index: c for c in cells_of(exp)}
    align_runs(ctx)
    recorded, last_cell = 0, None
    while True:
        rows = claims.unit_rows(ctx.engine, exp.name)
        by_key = {(r["cell"], r["phase"]): r for r in rows}
        now = time.time()
        ready = [r for r in rows if claims.claimable(r, now)
                 and (r["phase"] == "pretrain" or by_key[(r["cell"], "pretrain")]["state"] == DONE)]
        if not ready:
            if all(_settled(r, by_key) for r in rows):
                return recorded
            time.sleep(POLL_S * random.uniform(0.5, 1.5))  # others hold the rest; a silent one's lease runs out
            continue
        # finish the cell just pretrained here, then other fine-tunes, then new cells in order
        ready.sort(key=lambda r: (not (r["cell"] == last_cell and r["phase"] != "pretrain"),
                                  r["phase"] == "pretrain", r["cell"]))
        claim = claims.try_claim(ctx.engine, ready[0], me)
        if claim is None:  # another worker was first: look again
            continue
        cell = cells[claim.key.cell]
        pretrain_run = by_key[(cell.index, "pretrain")]["run_id"] if claim.key.phase != "pretrain" else None
        recorded += _run_unit(ctx, exp, claim, cell, pretrain_run, me, progress)
        last_cell = cell.index


def _worker_main(path: str, cli_sets: list[str], storage_url: str | None, tracking_uri: str, workers: int) -> int:
    share_cores(workers)
    return worker(load_experiment(path, "sweep", cli_sets), storage_url, tracking_uri)


def run_sweep(path: str, cli_sets: list[str], workers: int, storage_url: str | None, tracking_uri: str | None,
              progress: bool = True, scheduler=None, quiet: bool = False) -> dict:
    """Run the sweep to the end with ``workers`` local processes, or with one worker per slot of the Dask cluster
    ``scheduler`` (see :func:`workers.run_on_dask`); the claims make the result the same. Unless ``quiet``, one line
    per recorded unit with its final Dice and a progress bar (:class:`.progress.QueueProgress`); ``progress``: also
    Lightning's bar of each run when this process trains (one worker, no cluster)."""
    exp = load_experiment(path, "sweep", cli_sets)
    # the sweep's own datasets first (a dataset made here is reused by identity, whatever happens next), then,
    # before the sweep exists anywhere: a bad cell leaves no claim and no run (the hardware is the workers' own
    # when they run on a Dask cluster: each checks it as it trains)
    design = Design(exp.spec)
    needed = datasets_read(exp, [unit_config(exp, c.subset, c.levels, p) for c in groups_of(exp)
                                 for p in phases_for(exp, c, design)])
    ensure_datasets(exp, needed, storage_url, workers, scheduler, log=lambda line: print(line, flush=True))
    check_sweep(exp, machine=scheduler is None)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    ctx = open_sweep(exp, storage_url, tracking_uri)
    # what the workers get must mean the same on every machine: absolute paths, the resolved store URLs
    shared_storage = storage_url if scheduler is None else storage_url or claims.default_url()
    with QueueProgress(ctx.engine, ctx.name, tracking_uri, f"sweep {exp.name}", enabled=not quiet):
        dispatch(_worker_main, lambda slot, share: (str(Path(path).absolute()), list(cli_sets), shared_storage,
                                                    tracking_uri, share),
                 f"sweep {exp.name}", workers, scheduler,
                 inline=lambda: worker(exp, storage_url, tracking_uri, progress and quiet, ctx))
    summary = summarize(ctx)
    if not summary["missing"] and not summary["duplicates"]:
        finish_parent(ctx, exp)
    return summary


def sweep_view(client: MlflowClient, experiment_id: str, name: str, exp: Experiment | None = None) -> str:
    """The key of sweep ``name``'s comparison view in the MLflow UI (saved in its experiment; see
    mlplatform.mlflow_ui): its cell runs, grouped by subset, every declared axis and the phase (and the fine-tune
    variant), charted per epoch."""
    axes = [f"sweep.axis.{key}" for key in exp.spec.axes] if exp is not None else []
    variant = ["sweep.variant"] if exp is not None and exp.spec.variants else []
    view = mlflow_ui.comparison_view(f"tags.sweep = '{name}' and tags.kind = 'cell'",
                                     ["subset", *axes, "phase", *variant])
    return mlflow_ui.save_view(client, experiment_id, view)


def latest_sweep(client: MlflowClient):
    """The parent run of the most recently registered sweep in the store, or None."""
    exps = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(exps, "tags.kind = 'sweep'", max_results=1,
                               order_by=["attributes.start_time DESC"]) if exps else []
    return found[0] if found else None


def _metric_key(key: str) -> str:
    """``key`` with what MLflow refuses in metric names (anything but letters, digits, _ - . space /) as '_'."""
    return re.sub(r"[^\w\-. /]", "_", key)


def finish_parent(ctx: SweepContext, exp: Experiment) -> None:
    """Give the sweep's parent run what a reader of the UI needs: summary metrics (per subset and phase, the mean over
    seeds of each benchmark's final Dice, and the run count), a description with the definition, a table of results
    linking every recorded run and the comparison view, and the sweep's real duration (registration to the last
    cell's end). Idempotent: it only writes what changed, and workers finishing at once take turns (each reads the
    parent after the one before it wrote)."""
    with claims.exclusive(ctx.engine, _writes_key(ctx.name)):
        _finish_parent(ctx, exp)


def _finish_parent(ctx: SweepContext, exp: Experiment) -> None:
    client = ctx.client
    recorded = {r["run_id"] for r in claims.unit_rows(ctx.engine, ctx.name) if r["state"] == DONE}
    runs = [r for r in cell_runs(ctx) if r.info.run_id in recorded]
    if not runs:
        return
    parent = client.get_run(ctx.parent)
    exp_id = parent.info.experiment_id
    groups: dict[tuple[str, str], list] = {}
    order = {c.group: i for i, c in enumerate(cells_of(exp))}
    phase_order = {selector_phase(p): i for i, p in enumerate(phases_of(exp))}

    def coordinates(r) -> tuple[str, str]:
        tags = r.data.tags
        phase = tags.get("sweep.variant") or tags.get("phase", "?")
        return tags.get("sweep.group") or tags.get("sweep.subset", "?"), "none" if phase == "pretrain" else phase

    for r in sorted(runs, key=lambda r: (order.get(coordinates(r)[0], len(order)),
                                         phase_order.get(coordinates(r)[1], len(phase_order)),
                                         int(r.data.tags.get("seed", 0)))):
        group, phase = coordinates(r)
        groups.setdefault((group, "pretrain" if phase == "none" else phase), []).append(r)
    benchmarks = sorted({k.split("/")[1] for r in runs for k in r.data.metrics
                         if k.startswith("ood/") and k.endswith("/dice")}, key=lambda b: (b == "mean", b))
    metrics: dict[str, float] = {}
    rows = []
    for (subset, phase), members in groups.items():
        means = {}
        for b in benchmarks:
            values = [m.data.metrics[f"ood/{b}/dice"] for m in members if f"ood/{b}/dice" in m.data.metrics]
            if values:
                means[b] = sum(values) / len(values)
                metrics[_metric_key(f"summary/{subset}/{phase}/ood_{b}_dice")] = means[b]
        metrics[_metric_key(f"summary/{subset}/{phase}/n_runs")] = len(members)
        links = ", ".join(mlflow_ui.run_link(exp_id, m.info.run_id, f"s{m.data.tags.get('seed')}") for m in members)
        rows.append(f"| {subset} | {phase} | {len(members)} | "
                    + " | ".join(f"{means[b]:.3f}" if b in means else "" for b in benchmarks) + f" | {links} |")
    key = sweep_view(client, exp_id, ctx.name, exp)
    filters = "; ".join(f"**{s.name}**: {', '.join(f'`{k}` = `{v}`' for k, v in s.set.items()) or 'the base data'}"
                        for s in exp.spec.subsets)
    note = "\n".join([
        f"**Sweep `{ctx.name}`**: {len(exp.spec.subsets)} subsets"
        + "".join(f" x {len(levels)} levels of `{k}`" for k, levels in exp.spec.axes.items())
        + f" x {len(exp.spec.seed_list)} seeds ({', '.join(map(str, exp.spec.seed_list))}), phases "
        f"{' + '.join(phases_of(exp))}; {len(runs)} recorded runs.",
        "",
        f"Subsets: {filters}.",
        *([""] + [f"Axis `{k}`: " + ", ".join(f"**{lv.name}** = `{lv.value}`" for lv in levels) + "."
                  for k, levels in exp.spec.axis_levels.items()] if exp.spec.axes else []),
        "",
        f"[Compare the runs: grouped by subset{', axes' if exp.spec.axes else ''} and phase, OOD Dice per epoch]"
        f"({mlflow_ui.view_link(exp_id, key)}). "
        "The report (when written: "
        f"`python -m experiments report --sweep {ctx.name}`) is under Artifacts, `report/index.html`.",
        "",
        "Mean over seeds of each benchmark's final-epoch Dice:",
        "",
        f"| {'cell' if exp.spec.axes else 'subset'} | phase | runs | " + " | ".join(benchmarks) + " | runs |",
        "|" + "---|" * (len(benchmarks) + 4),
        *rows,
    ])
    # the parent started when the sweep was registered; it ends with the last recorded cell
    mlflow_ui.update_parent(client, parent, note, metrics, max((r.info.end_time or 0) for r in runs))


def record_problems(summary: dict) -> list[str]:
    """One line per unit recorded more than once or fine-tuned from another pretrain than its cell's recorded one."""
    return ([f"recorded more than once: {unit}: FINISHED runs {', '.join(ids)}"
             for unit, ids in summary["duplicates"].items()]
            + [f"wrong lineage: {line}" for line in summary["lineage"]])


def summarize(ctx: SweepContext, fix: bool = True) -> dict:
    """The sweep's state after aligning MLflow with the claims: units not recorded (``missing``), units with more
    than one FINISHED run or a FINISHED run other than the recorded one (``duplicates``: unit -> run ids), fine-tunes
    not descended from their cell's recorded pretrain (``lineage``)."""
    changes = align_runs(ctx, fix=fix)
    rows = claims.unit_rows(ctx.engine, ctx.name)
    by_key = {(r["cell_key"], r["phase"]): r for r in rows}
    runs = cell_runs(ctx)
    finished: dict[tuple, list[str]] = {}  # oldest first
    for run in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        if run.info.status == "FINISHED":
            finished.setdefault(_unit_key(run), []).append(run.info.run_id)
    missing = [f"{r['cell_key']}:{r['phase']}" for r in rows if r["state"] != DONE]
    phases = list(dict.fromkeys(["pretrain", "finetune", *sorted(r["phase"] for r in rows)]))
    duplicates = {f"{k[0]}:{k[1]}": ids for k, ids in sorted(finished.items(), key=str)
                  if len(ids) > 1 or (k in by_key and ids != [by_key[k]["run_id"]])}
    lineage = []
    for run in runs:
        tags = run.data.tags
        if tags.get("phase") == "finetune" and run.info.status == "FINISHED":
            pre = by_key.get((tags.get("sweep.cell"), "pretrain"))
            origin = tags.get(PRETRAIN_RUN) or tags.get(LEGACY_PRETRAIN_RUN)
            if pre is None or origin != pre["run_id"]:
                lineage.append(f"{run.info.run_id} ({tags.get('sweep.cell')}): pretrain_run "
                               f"{origin} is not the cell's recorded pretrain "
                               f"{pre['run_id'] if pre else None}")
    failed = {f"{r['cell_key']}:{r['phase']}": r["error"] for r in rows if r["state"] == FAILED}
    return {"sweep": ctx.name, "parent_run": ctx.parent, "cells": len({r["cell"] for r in rows}),
            "phases": sorted({r["phase"] for r in rows}, key=phases.index),
            "missing": missing, "failed": failed, "duplicates": duplicates, "lineage": lineage, "aligned": changes,
            "runs_by_status": dict(Counter(r.info.status for r in runs)),
            "units_by_state": dict(Counter(r["state"] for r in rows))}
