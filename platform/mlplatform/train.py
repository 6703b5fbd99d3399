"""One tracked training run: pretrain from scratch, or fine-tune a tracked model.

Everything that can be checked is checked before the MLflow run exists (config, data, the parent model, the trainer
on this machine: :func:`check_trainer`, :func:`curate_checked`), so a bad input leaves no run behind, and its error
names the key and where its value came from. Once the run exists, it ends FINISHED, FAILED (with the reason) or
KILLED — never RUNNING.

Several devices (``trainer.devices``) or nodes (``trainer.num_nodes``) train with Lightning's DDP. The calling process
is rank 0: it alone creates and writes the tracked run, and it alone runs the caller's callbacks and hooks (a sweep's
claim, a study's pruning), which therefore must not call collectives. mlplatform, not Lightning, starts the node's
other ranks (``_other_local_ranks``): Lightning's ``ddp`` launcher re-runs the calling script in every rank (the CLI,
a sweep worker, pytest: each would train, claim units or open runs of its own), and ``ddp_spawn``/``ddp_fork`` run
every rank, rank 0 included, in new processes, away from the run, the claim and the trial. The other ranks run
``_run_rank``: the same curated data, module and trainer, without tracking. Processes started by a cluster (SLURM,
torchrun: one per device) are left to Lightning's detection; there, ranks other than 0 train and record nothing.

Resuming (``resume=RUN_ID``, ``--resume``). Every epoch ends with the run's resume point, ``last.ckpt`` (Lightning's
full state: weights, optimiser, schedule, loops, the best-epoch checkpoint's state, and the epoch's metrics), written
atomically into the run's checkpoint folder (``tracking.checkpoint_folder``: beside a local SQLite store, else in the
cache folder, and then also uploaded as the artifact ``checkpoints/last.ckpt``) before the epoch's metrics are logged.
A resume reopens the same run and continues after that epoch (``trainer.fit(ckpt_path=..., weights_only=True)``:
nothing in the file is unpickled beyond tensors and plain containers), logging the checkpoint's metrics first if the
kill came between the checkpoint and the logging: each step is logged once. It is refused, before anything changes,
for an unknown or FINISHED run, a run of a sweep or study, a superseded run, a run that failed with a non-finite
loss, a config or data other than the run's, and a run another process is training (``tracking.RunLock``). A run
killed before its first epoch ended has no checkpoint and no epoch metrics: it restarts from scratch, in the same run.
The folder is deleted when the run ends FINISHED (its best checkpoint is logged) or cannot be resumed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import (LightningEnvironment, LSFEnvironment, MPIEnvironment,
                                                    SLURMEnvironment, TorchElasticEnvironment)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from hrtem_core.config import show_value
from hrtem_core.errors import ConfigError, InputError
from hrtem_core.processes import die_with_parent

from .callbacks import LAST_CHECKPOINT, EpochTracking, OODEvaluation, PredictionImages
from .config import TrainConfig, flatten
from .curation import CurationError, scan_dataset, select
from .data import (CuratedData, DataError, SegmentationDataModule, check_eval_shards, curate, read_samples,
                   showcase_records)
from .model_format import EPOCH_OFFSET, PRETRAIN_RUN, RUN_ID, THRESHOLD
from .mlflow_ui import NOTE_TAG
from .models import count_parameters
from .module import NonFiniteLoss, SegmentationModule
from .provenance import __version__
from .serving import load_model
from .store import ensure_store, resolve_tracking_uri
from .tracking import RunBusy, RunLock, Superseded, TrackedRun, checkpoint_folder, uploads_checkpoints

PHASES = ("pretrain", "finetune")


def parent_run_id(ref: str) -> str | None:
    """The run a model reference points into, where the reference says (a run id or a runs:/ URI)."""
    if RUN_ID.fullmatch(ref):
        return ref
    m = re.match(rf"runs:/({RUN_ID.pattern})(/|$)", ref)
    return m.group(1) if m else None


def model_name(subset: str, seed: int, phase: str) -> str:
    """The logged model's name: subset, seed and phase (MLflow refuses '/', ':', '.', '%' and quotes: anything but
    letters, digits, '-' and '_' becomes '_')."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{subset}-s{seed}-{phase}").strip("_") or phase


def _pretrain_filter(meta: dict) -> str:
    """The pretrain data's description, from the parent model's metadata (older models: from its train datasets)."""
    if meta.get("subset_filter"):
        return meta["subset_filter"]
    return " ; ".join(f"{d.get('name')}: {d.get('filter') or 'all'}" for d in meta.get("train_datasets") or [])


def describe_run(config: TrainConfig, phase: str, subset: str, subset_filter: str, curated: CuratedData,
                 parent: str | None, step_offset: int, tracking_uri: str) -> str:
    """The run's description (MLflow's note, shown on the run page), in Markdown."""
    n = {role: sum(u.n_samples for u in curated.uses if u.role == role) for role in ("train", "validation")}
    lines = [f"**{phase.capitalize()}** of subset **{subset}**, seed {config.seed}: `{config.model.preset}` network, "
             f"{config.epochs} epoch(s) of {config.data.steps_per_epoch} batches of {config.data.batch_size}."]
    if phase == "finetune":
        link = parent or "?"
        if parent:
            try:
                from mlflow import MlflowClient

                pre = MlflowClient(tracking_uri).get_run(parent)
                link = f"[{pre.info.run_name}](#/experiments/{pre.info.experiment_id}/runs/{parent})"
            except Exception:  # noqa: BLE001  a description must not fail a run
                pass
        lines.append(f"- Fine-tuned from {link} (pretrained on {subset_filter or 'its data'}); its epochs continue "
                     f"the pretrain's count: steps {step_offset}-{step_offset + config.epochs - 1}.")
        lines.append(f"- Fine-tuning data: {curated.subset_filter} ({n['train']} train / {n['validation']} "
                     "validation samples).")
    else:
        lines.append(f"- Training data: {subset_filter} ({n['train']} train / {n['validation']} validation samples).")
    if curated.benchmarks:
        lines.append(f"- OOD benchmarks ({', '.join(f'{k} ({len(v)})' for k, v in curated.benchmarks.items())}): "
                     f"Dice every {config.ood_interval} epoch(s) as `ood/<benchmark>/dice`, their mean as "
                     "`ood/mean/dice`; predictions on fixed images under Images (`predictions/<benchmark>`).")
    if curated.skipped:
        shards = ", ".join(f"{s['dataset']}/{s['shard']}" for s in curated.skipped[:5])
        lines.append(f"- **{len(curated.skipped)} bad shard(s) left out** (data.skip_bad_shards): {shards}"
                     f"{' ...' if len(curated.skipped) > 5 else ''}; reasons in `data/skipped_shards.json`.")
    return "\n".join(lines)


def _adopt_parent(config: TrainConfig, meta: dict) -> TrainConfig:
    """A fine-tune keeps the parent's architecture and input contract (normalisation)."""
    data = config.resolved()
    data["model"]["preset"] = meta["preset"]
    data["data"]["normalization"] = meta["normalization"]
    return TrainConfig.model_validate(data).with_origins(config._origins)


def train(config: TrainConfig, phase: str = "pretrain", init_from: str | None = None,
          tracking_uri: str | None = None, progress: bool = True, extra_tags: dict | None = None,
          nest_under: str | None = None, callbacks: list | None = None, extra_params: dict | None = None,
          stop_exceptions: tuple = (), on_start=None, commit=None, resume: str | None = None) -> str | None:
    """Train one model; returns the MLflow run id (None in a rank other than 0 of a cluster-launched DDP job).

    ``resume``: the id of a run of this config to continue from its last checkpoint, in the same run (see the module
    docstring); its refusals are InputErrors raised before the run changes.

    ``nest_under`` makes the run an MLflow child of another (a sweep or study run); the lineage of a fine-tune (the
    run its model came from) is recorded in the ``pretrain_run`` tag either way. ``callbacks`` are extra Lightning
    callbacks (e.g. Optuna pruning). ``on_start(run_id)`` and ``commit(run_id) -> bool`` are the hooks of a work
    queue (see :class:`~mlplatform.tracking.TrackedRun`): a refused commit ends the run KILLED and raises
    :class:`~mlplatform.tracking.Superseded`. Under DDP, ``callbacks`` and the hooks run in rank 0 only (see the module
    docstring).
    """
    from hrtem_core import verbosity

    verbosity.apply()  # the libraries' INFO lines and deprecation warnings, unless the command is verbose
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}; allowed: {', '.join(PHASES)}")
    if (phase == "finetune") != (init_from is not None):
        raise ValueError("a fine-tune needs --from RUN_ID|MODEL_URI, and only a fine-tune takes one")
    uri = resolve_tracking_uri(tracking_uri)
    ensure_store(uri)  # the tracking store answers (bounded), before any data are read
    resumed = _resumable_run(uri, resume, phase) if resume is not None else None
    check_trainer(config)  # before the data are read: the settings and this machine's hardware
    network, parent_meta, parent = None, None, None
    if phase == "finetune":
        network, parent_meta = load_model(init_from, tracking_uri=uri)
        # load_model hands out a model ready for inference (eval mode); Lightning >= 2.2 keeps the modes it finds, so
        # without this a fine-tune would train with batch-norm statistics frozen and dropout off
        network.train()
        config = _adopt_parent(config, parent_meta)
        # the model's metadata names the run that made it, whatever form the reference took (models:/ included)
        parent = parent_meta.get("run_id") or parent_run_id(init_from)
    if resumed is not None:
        _check_same_config(config, resumed, parent)
    curated = curate_checked(config)
    if resumed is not None:
        _check_same_data(curated, resumed)
    for s in curated.skipped:
        print(f"warning: skipping a bad shard of the {s['role']} dataset {s['dataset']}: {s['reason']}",
              file=sys.stderr)
    if parent_meta is not None and abs(parent_meta["pixel_size_A"] - curated.pixel_size_A) > 1e-6:
        raise DataError(f"the fine-tuning data have {curated.pixel_size_A} Å pixels, the model was trained at "
                        f"{parent_meta['pixel_size_A']} Å: resample the data first")

    L.seed_everything(config.seed, workers=True, verbose=False)
    # a fine-tune belongs to its pretrain's subset; its own data are recorded as finetune.data
    subset = config.tracking.subset or (parent_meta or {}).get("subset") or curated.subset
    subset_filter = curated.subset_filter if parent_meta is None else _pretrain_filter(parent_meta)
    step_offset = 0 if parent_meta is None else int(parent_meta.get("epoch_offset", 0)) + int(parent_meta["epochs"])
    tags = {
        "phase": phase,
        "seed": str(config.seed),
        "subset": subset,
        "subset.filter": subset_filter,
        "model.preset": config.model.preset,
        "config.hash": config.hash(),
        **(extra_tags or {}),
    }
    if init_from:
        tags["init_from"] = init_from
        tags["finetune.data"] = curated.subset_filter
        tags[EPOCH_OFFSET] = str(step_offset)
    if parent:
        tags[PRETRAIN_RUN] = parent
    run_name = config.tracking.run_name or f"{subset}-s{config.seed}-{phase}"
    params = {**flatten(config.resolved()), **(extra_params or {})}
    freeze = config.finetune.frozen if phase == "finetune" else "none"
    datamodule = SegmentationDataModule(config, curated)
    tracking = EpochTracking(step_offset=step_offset)  # it gets the run and its checkpoint folder once the run exists
    ood = OODEvaluation(datamodule, list(curated.benchmarks), config.ood_interval)
    n_images = config.tracking.n_prediction_images
    showcase = {name: read_samples(showcase_records(records, n_images), config.data)
                for name, records in curated.benchmarks.items()} if n_images else {}
    images = PredictionImages(showcase, ood, tracking, f"{run_name}")
    with tempfile.TemporaryDirectory(prefix="ckpt-") as ckpt_dir:
        tracking.checkpoint_dir = ckpt_dir  # rank 0's is the run's folder (below); the other ranks write nothing
        try:
            trainer, checkpoint = _trainer(config, curated, datamodule, ckpt_dir,
                                           [tracking, images, *(callbacks or [])], progress, ood=ood)
        except _TRAINER_REFUSALS as exc:  # before the run exists: an input error naming the setting
            raise trainer_error(config, exc) from None
        check_eval_shards(curated, trainer.world_size, config.data.num_workers)
        if trainer.global_rank != 0:
            if on_start is not None or commit is not None:
                raise RuntimeError(f"rank {trainer.global_rank} of a DDP job started by a cluster launcher was given a "
                                   "work queue's hooks: start sweep and study workers one per node (they start the "
                                   "local ranks themselves), not under srun/torchrun with one task per device")
            module = SegmentationModule(config, network, freeze=freeze)
            module.step_offset = step_offset
            # a resumed cluster job: every rank reads rank 0's resume point (a folder the nodes must share)
            last = checkpoint_folder(uri, resume) / LAST_CHECKPOINT if resume else None
            _fit(trainer, module, datamodule, ckpt_path=last if last is not None and last.is_file() else None)
            return None
        lock, folder, finished = RunLock(), None, False
        try:
            ckpt_path, state = None, None
            if resumed is not None:  # taken before the run is looked at again: two resumes cannot both pass
                folder = checkpoint_folder(uri, resumed.info.run_id)
                _lock(lock, folder, resumed.info.run_id)
                resumed = _resumable_run(uri, resumed.info.run_id, phase)  # as it is now that we hold the lock
                ckpt_path, state = _resume_point(uri, resumed, folder, config)
            with TrackedRun(uri, config.tracking.experiment, run_name, params=params, tags=tags,
                            parent_run_id=nest_under or parent, system_metrics=config.tracking.system_metrics,
                            stop_exceptions=stop_exceptions, on_start=on_start, commit=commit,
                            resume_run_id=resumed.info.run_id if resumed is not None else None) as run:
                if folder is None:
                    folder = checkpoint_folder(uri, run.run_id)
                    _lock(lock, folder, run.run_id)
                tracking.run, tracking.checkpoint_dir, tracking.upload = run, folder, uploads_checkpoints(uri)
                checkpoint.dirpath = os.path.realpath(folder)  # the best epoch's too: a resume finds its state valid
                if resumed is not None:
                    _continue_run(run, ckpt_path, state, tracking)
                _train_in_run(run, config, phase, subset, subset_filter, curated, parent, step_offset, uri, network,
                              freeze, trainer, datamodule, tracking, checkpoint, run_name, ckpt_path)
            finished = True  # the run ended FINISHED (its commit hook, if any, accepted it)
            return run.run_id
        except (Superseded, NonFiniteLoss, *stop_exceptions):
            finished = True  # nothing to resume: a superseded run's work is another's, a divergence would recur
            raise
        finally:
            lock.release()
            if finished and folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


def _train_in_run(run: TrackedRun, config: TrainConfig, phase: str, subset: str, subset_filter: str,
                  curated: CuratedData, parent: str | None, step_offset: int, uri: str, network, freeze: str,
                  trainer: L.Trainer, datamodule, tracking: EpochTracking, checkpoint: ModelCheckpoint, run_name: str,
                  ckpt_path: Path | None) -> None:
    """Record the run's inputs, fit (from ``ckpt_path`` when resuming), log the model and the best checkpoint (a
    resumed run records its inputs again: MLflow keeps one copy of each)."""
    for use in curated.uses:
        run.log_dataset(use.role, use.name, use.path, use.content_hash, use.n_samples, use.filter,
                        digest=use.digest, profile=use.profile, image_shape=use.image_shape,
                        subset=subset if use.role in ("train", "validation") else None)
    note = describe_run(config, phase, subset, subset_filter, curated, parent, step_offset, uri)
    run.set_tags({NOTE_TAG: note})
    run.log_dict(config.resolved(), "config/resolved.yaml")
    if config.data.skip_bad_shards:  # what was left out, even when nothing was: the run says it was allowed to
        run.set_tags({"data.skipped_shards": str(len(curated.skipped))})
        run.log_dict({"skipped_shards": curated.skipped}, "data/skipped_shards.json")
    module = SegmentationModule(config, network, freeze=freeze)
    run.set_tags({"model.parameters": str(count_parameters(module.model)),
                  "model.trainable_parameters": str(sum(p.numel() for p in module.model.parameters()
                                                        if p.requires_grad))})
    module.step_offset = step_offset
    _fit(trainer, module, datamodule, ckpt_path=ckpt_path,
         ranks={"config": config, "curated": curated, "freeze": freeze, "step_offset": step_offset,
                "ckpt_path": ckpt_path})
    metadata = {
        "preset": config.model.preset,
        "pixel_size_A": curated.pixel_size_A,
        "normalization": config.data.normalization.model_dump(),
        "threshold": THRESHOLD,
        "phase": phase,
        "epochs": config.epochs,
        "epoch_offset": step_offset,
        "run_id": run.run_id,
        "parent_run": parent,
        "subset": subset,
        "subset_filter": subset_filter,
        "config_hash": config.hash(),
        "train_datasets": [{"name": u.name, "content_hash": u.content_hash, "filter": u.filter,
                            "digest": u.digest, "n_samples": u.n_samples}
                           for u in curated.uses if u.role == "train"],
        "platform_version": __version__,
    }
    # the model is the network as the last epoch left it: it carries that epoch's metrics
    last = tracking.last_step if tracking.last_step is not None else step_offset
    run.log_model(module.model, metadata, name=model_name(subset, config.seed, phase), step=last,
                  description=f"The network of run {run_name} after its last epoch (step {last}); its "
                  f"metrics are that epoch's.\n\n{note}")
    if checkpoint.best_model_path:
        run.log_artifact(checkpoint.best_model_path, "checkpoints")


# ------------------------------------------------------------------------------------------------ resuming a run

# tags of runs that a work queue owns (sweep cells, study trials): the queue retrains its unfinished units itself
_QUEUE_KINDS = {"cell": "sweep", "trial": "study", "sweep": "sweep", "study": "study"}


def _resumable_run(uri: str, run_id: str, phase: str):
    """The run ``--resume`` names, if it can be continued by this command (mlflow.entities.Run); InputError saying
    why not otherwise. Its lock (``_lock``) decides whether another process is training it now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not RUN_ID.fullmatch(run_id):
        raise InputError(f"--resume: {run_id}: not a run id; give the 32 hex digits the interrupted command printed, "
                         "or that the run's page shows")
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            raise InputError(f"--resume: {run_id}: no such run in the tracking store {uri}; give a run of this store "
                             "(--tracking-uri)") from None
        raise
    tags, status = run.data.tags, run.info.status
    if run.info.lifecycle_stage == "deleted":
        raise InputError(f"--resume: {run_id}: the run is deleted; restore it first, or start a new run")
    if status == "FINISHED":
        raise InputError(f"--resume: {run_id}: the run is FINISHED, there is nothing to resume; start a new run "
                         "(without --resume)")
    if tags.get("kind") in _QUEUE_KINDS:
        queue = _QUEUE_KINDS[tags["kind"]]
        raise InputError(f"--resume: {run_id}: the run is a {tags['kind']} of {queue} "
                         f"{tags.get(queue, '?')!r}, which owns it: run the {queue} again (it retrains its "
                         "unfinished runs)")
    if tags.get("superseded") == "true":
        raise InputError(f"--resume: {run_id}: the run was superseded (another run recorded its work): nothing to "
                         "resume")
    reason = tags.get("failure_reason", "")
    if reason.startswith(f"{NonFiniteLoss.__name__}:"):
        raise InputError(f"--resume: {run_id}: the run failed with a non-finite loss ({reason.split(': ', 1)[1]}); "
                         "resuming with the same config would diverge again: start a new run with another config")
    if tags.get("phase", phase) != phase:
        command = "finetune --from ..." if tags["phase"] == "finetune" else "train"
        raise InputError(f"--resume: {run_id}: the run is a {tags['phase']} run; resume it with "
                         f"'python -m experiments {command} --resume {run_id}'")
    return run


def _lock(lock: RunLock, folder: Path, run_id: str) -> None:
    try:
        lock.acquire(folder)
    except RunBusy as busy:
        raise InputError(f"--resume: {run_id}: the run is being trained right now by another process ({busy}, "
                         f"holding {folder / 'lock'}); let it finish, or stop it and resume then") from None


def _check_same_config(config: TrainConfig, run, parent: str | None) -> None:
    """The config (after a fine-tune adopted its parent's architecture) is the one the run was trained with, and a
    fine-tune starts from the same model; InputError naming the first key that differs otherwise."""
    run_id, tags = run.info.run_id, run.data.tags
    if parent is not None and tags.get(PRETRAIN_RUN) not in (None, parent):
        raise InputError(f"--from: {parent}: run {run_id} was fine-tuned from {tags[PRETRAIN_RUN]}; a resume "
                         "continues from the same model")
    if tags.get("config.hash") == config.hash():
        return
    params = run.data.params
    mine = {k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v)
            for k, v in flatten(config.resolved()).items()}
    sections = set(TrainConfig.model_fields)
    keys = sorted(set(mine) | {k for k in params if k.split(".", 1)[0] in sections})
    for key in keys:
        there = params.get(key, "")
        if mine.get(key) != params.get(key) and not (there.endswith("[truncated; full value in params.json]") and
                                                     mine.get(key, "").startswith(there.split(" ...[truncated")[0])):
            here = mine.get(key, "(not set)")
            there = params.get(key, "(not set)")
            raise InputError(f"{config.origin(key)}: {here}: run {run_id} was trained with {there}; a resume "
                             "continues the run with its own config: give the --config and --set values it was "
                             "started with")
    raise InputError(f"--config: its config.hash {config.hash()[:12]}… differs from run {run_id}'s "
                     f"{tags.get('config.hash', '(none recorded)')[:12]}…; give the config the run was started with")


def _check_same_data(curated: CuratedData, run) -> None:
    """The curated data are the samples the run read (its dataset inputs' digests); InputError naming the dataset
    otherwise (a dataset changed, or bad shards are skipped that were not)."""
    recorded = {}
    for entry in run.inputs.dataset_inputs:
        context = next((t.value for t in entry.tags if t.key == "mlflow.data.context"), "")
        recorded.setdefault((context, entry.dataset.name.split("/")[0]), set()).add(entry.dataset.digest)
    if not recorded:  # killed before it recorded its inputs
        return
    for use in curated.uses:
        digests = recorded.get((use.role, use.name), set())
        if use.digest[:36] not in digests:
            raise InputError(f"--resume: {run.info.run_id}: {use.role} data {use.name} ({use.path}): other samples "
                             f"than the run read (selection digest {use.digest[:12]}…, the run's "
                             f"{', '.join(sorted(d[:12] + '…' for d in digests)) or 'none'}); a resume must read the "
                             "same data: restore the dataset, or start a new run")


def _resume_point(uri: str, run, folder: Path, config: TrainConfig) -> tuple[Path | None, dict | None]:
    """(the run's last checkpoint, EpochTracking's state in it), or (None, None) for a run killed before its first
    epoch ended; InputError if the checkpoint is unusable or the run logged epochs the checkpoint does not hold."""
    from mlflow import MlflowClient

    run_id = run.info.run_id
    for leftover in folder.glob("*.partial"):  # a checkpoint being written when the process died
        leftover.unlink(missing_ok=True)
    last = folder / LAST_CHECKPOINT
    client = MlflowClient(uri)
    if not last.is_file():  # another machine's run (tracking server): its uploaded resume point
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            try:
                got = Path(client.download_artifacts(run_id, f"checkpoints/{LAST_CHECKPOINT}", tmp))
                os.replace(got, last)
            except Exception:  # noqa: BLE001  no such artifact: a run killed before its first epoch ended
                pass
    logged = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    if not last.is_file():
        if logged:
            raise InputError(f"--resume: {run_id}: the run logged epochs up to step {max(logged)} but its checkpoint "
                             f"is gone ({last}, artifact checkpoints/{LAST_CHECKPOINT}): it cannot continue without "
                             "logging those epochs again; start a new run")
        return None, None
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)  # our own file, still never unpickled freely
        state = ckpt["callbacks"]["EpochTracking"]
        step = state["pending"]["step"]
    except Exception as exc:  # noqa: BLE001  a truncated or foreign file
        raise InputError(f"--resume: {run_id}: its checkpoint {last} cannot be read ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}); start a new run") from None
    if ckpt.get("config_hash") != config.hash():
        raise InputError(f"--resume: {run_id}: its checkpoint {last} was written by another config "
                         f"({str(ckpt.get('config_hash'))[:12]}…); start a new run")
    if logged and max(logged) > step:
        raise InputError(f"--resume: {run_id}: the run logged epochs up to step {max(logged)}, its checkpoint ends at "
                         f"step {step}: it cannot continue without logging epochs again; start a new run")
    return last, state


def _continue_run(run: TrackedRun, ckpt_path: Path | None, state: dict | None, tracking: EpochTracking) -> None:
    """Before a resumed fit: the checkpointed epoch's metrics, if the kill came before they were logged, and the
    tags saying where the run continues."""
    if ckpt_path is None:
        run.set_tags({"resume.from_epoch": "0 (no checkpoint: restarted from scratch)"})
        return
    pending, step = state["pending"], state["pending"]["step"]
    if not any(m.step == step for m in run.client.get_metric_history(run.run_id, "train/loss")):
        run.log_metrics(pending["metrics"], step=step)
    tracking.last_step = state.get("last_step", step)
    run.set_tags({"resume.from_epoch": str(step - tracking.step_offset + 1)})


# ------------------------------------------------------------------------------------------------ checks before a run


def _selection_problem(config: TrainConfig, ref, prefix: str, seed: int) -> str | None:
    """Why the dataset reference at ``prefix`` (``data.train.0``, ``benchmarks.1``) selects nothing, or None."""
    try:
        index = scan_dataset(ref.path, skip_bad_shards=config.data.skip_bad_shards)
    except InputError as exc:
        return f"{config.origin(f'{prefix}.path')}: {show_value(ref.path)}: {exc}"
    try:
        select(index, ref.filter, ref.max_samples, ref.max_images_per_structure, seed)
    except InputError as exc:
        key, value = (f"{prefix}.filter", ref.filter) if ref.filter else (f"{prefix}.path", ref.path)
        hint = "; widen the filter, or leave this data out" if "selected none" in str(exc) else ""
        return f"{config.origin(key)}: {show_value(value)}: {exc}{hint}"
    return None


def _curation_error(config: TrainConfig, exc: InputError) -> InputError:
    """The error of a curation that failed, naming the key whose value made it fail and where that value came from:
    a dataset that cannot be read, a filter that selects nothing, or a selection too small to split by structure."""
    refs = [(f"data.train.{i}", ref, config.seed) for i, ref in enumerate(config.data.train)]
    refs += [(f"benchmarks.{i}", ref, 0) for i, ref in enumerate(config.benchmarks)]
    for prefix, ref, seed in refs:
        problem = _selection_problem(config, ref, prefix, seed)
        if problem:
            return CurationError(problem)
    if "cannot split" in str(exc):
        filtered = [(i, ref) for i, ref in enumerate(config.data.train) if ref.filter]
        if len(filtered) == 1:
            key, value = f"data.train.{filtered[0][0]}.filter", show_value(filtered[0][1].filter)
        else:
            key = "data.train"
            value = " ; ".join(f"{ref.path}: {ref.filter or 'all'}" for ref in config.data.train)
        return CurationError(f"{config.origin(key)}: {value}: selects too little: {exc}; widen the filter or add "
                             "data")
    return exc


def _image_size(meta: dict) -> tuple[int, int] | None:
    """(rows, cols) of a sample's image from its metadata (imaging.shape, or source.shape of an imported one)."""
    for section in ("imaging", "source"):
        shape = (meta.get(section) or {}).get("shape")
        if isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) for n in shape):
            return shape[0], shape[1]
    return None


def check_crop(config: TrainConfig, curated: CuratedData) -> None:
    """Training crops of ``data.crop_px`` must fit in every training image (a larger crop would be zero-padded, and
    the network would learn the padding)."""
    crop = config.data.crop_px
    small = Counter((r.dataset_name, size) for r in curated.train
                    if (size := _image_size(r.meta)) is not None and min(size) < crop)
    if small:
        (dataset, (rows, cols)), _ = min(small.items(), key=lambda item: min(item[0][1]))
        raise DataError(f"{config.origin('data.crop_px')}: {crop}: larger than the training images "
                        f"({rows} x {cols} px in dataset {dataset}, {sum(small.values())} of the {len(curated.train)} "
                        f"training samples); set data.crop_px <= {min(rows, cols)}")


def curate_checked(config: TrainConfig, crop: bool = True) -> CuratedData:
    """:func:`mlplatform.data.curate`, with errors that name the key at fault and where its value came from, and
    (``crop``) the crop size checked against the selected images."""
    try:
        curated = curate(config)
    except InputError as exc:
        raise _curation_error(config, exc) from None
    if crop:
        check_crop(config, curated)
    return curated


def logged_metrics(config: TrainConfig) -> list[str]:
    """The per-epoch metrics a run of ``config`` logs (mlplatform.module and mlplatform.callbacks), which a study's
    objective can name."""
    names = ["train/loss", "train/lr", "val/dice", "val/iou", "val/dice_mean_image"]
    if config.benchmarks:
        names += [f"ood/{b.name}/{m}" for b in config.benchmarks for m in ("dice", "iou", "dice_mean_image")]
        names.append("ood/mean/dice")
    return names


# what Lightning raises for trainer settings it refuses, or a machine without the requested hardware
_TRAINER_REFUSALS = (MisconfigurationException, ValueError, TypeError, ImportError, RuntimeError)


@contextmanager
def _quiet_lightning():
    """Lightning's info lines ("GPU available: ...") muted while a trainer is only being tried."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _try_trainer(**settings) -> None:
    plugins = None if _launched_by_cluster() else [_LocalRanks()]
    with _quiet_lightning():
        L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  plugins=plugins, **settings)


def _available_accelerators() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    found = []
    for name in sorted(AcceleratorRegistry.available_accelerators()):
        try:
            if AcceleratorRegistry[name]["accelerator"].is_available():
                found.append(name)
        except Exception:  # noqa: BLE001  an accelerator whose library is missing is not available
            pass
    return found


def trainer_error(config: TrainConfig, exc: Exception) -> Exception:
    """Which trainer setting Lightning refuses on this machine (tried one at a time, in the order Lightning reads
    them), as a ConfigError naming its key and where its value came from; ``exc`` (what building the trainer
    raised) itself when every setting is accepted: then it is not the settings' fault."""
    t = config.trainer
    steps = [("accelerator", {"accelerator": t.accelerator}), ("devices", {"devices": t.devices}),
             ("num_nodes", {"num_nodes": t.num_nodes}), ("strategy", {"strategy": t.strategy}),
             ("precision", {"precision": t.precision})]
    settings: dict = {}
    for name, step in steps:
        settings.update(step)
        try:
            _try_trainer(**settings)
        except _TRAINER_REFUSALS as refused:
            reason = " ".join(str(refused).split()) or type(refused).__name__
            if name == "accelerator":
                why = f" ({reason})" if isinstance(refused, ImportError) else ""
                reason = (f"not available on this machine{why}; use one that is: "
                          f"{', '.join(['auto', *_available_accelerators()])}")
            return ConfigError(f"{config.origin(f'trainer.{name}')}: {show_value(getattr(t, name))}: {reason}")
    return exc


def check_trainer(config: TrainConfig) -> None:
    """Lightning accepts the trainer settings on this machine (the accelerator exists, the devices are there, the
    precision is supported), tried by building a trainer (nothing runs); ConfigError naming the key otherwise."""
    t = config.trainer
    try:
        _try_trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                     precision=t.precision)
    except _TRAINER_REFUSALS as exc:
        raise trainer_error(config, exc) from None



# ------------------------------------------------------------------------------------------------ DDP


class _LocalRanks(LightningEnvironment):
    """Lightning's default environment (one node on 127.0.0.1, or ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` as
    set on each node), except that the node's other ranks are started by ``_other_local_ranks``, not by Lightning."""

    def __init__(self, local_rank: int = 0):
        super().__init__()
        self._local_rank = local_rank

    @property
    def creates_processes_externally(self) -> bool:
        return True

    def local_rank(self) -> int:
        return self._local_rank


def _launched_by_cluster() -> bool:
    """This process is one of several a launcher started (Lightning's detection, in Lightning's order)."""
    return "LOCAL_RANK" in os.environ or any(env.detect() for env in (
        TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment))


def _trainer(config: TrainConfig, curated: CuratedData, datamodule, ckpt_dir: str, callbacks: list, progress: bool,
             environment: _LocalRanks | None = None, ood: OODEvaluation | None = None
             ) -> tuple[L.Trainer, ModelCheckpoint]:
    """The trainer of every rank, with its ranks known (``global_rank``, ``world_size``) before fit."""
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/dice", mode="max", save_top_k=1,
                                 filename="best-epoch{epoch}", auto_insert_metric_name=False)
    if environment is None and not _launched_by_cluster():
        environment = _LocalRanks()
    t = config.trainer
    trainer = L.Trainer(
        max_epochs=config.epochs, limit_train_batches=config.data.steps_per_epoch,
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
        precision=t.precision, deterministic=t.deterministic, plugins=[environment] if environment else None,
        logger=False, callbacks=[checkpoint, ood or OODEvaluation(datamodule, list(curated.benchmarks),
                                                                  config.ood_interval), *callbacks],
        reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=t.log_every_n_steps,
    )
    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy.set_world_ranks()  # what fit would do first: the ranks are needed before the run exists
    return trainer, checkpoint


# the command of a rank started here: the parent's sys.path (as multiprocessing's spawn passes it), then _run_rank
_RANK_COMMAND = "import sys; sys.path[:] = {path!r}; from mlplatform.train import _run_rank; _run_rank(*sys.argv[1:])"
RANK_EXIT_TIMEOUT_S = 300  # how long rank 0 waits for the other ranks to exit after a successful fit


@contextmanager
def _other_local_ranks(trainer: L.Trainer, spec: dict | None):
    """Start ranks 1..n-1 of this node (this process being its local rank 0) running ``_run_rank`` on ``spec`` (config,
    curated data, freeze flag), and wait until each has built its trainer; after the fit, wait for them to exit.
    If the fit fails, they are killed (SIGKILL: a rank blocked in a collective never handles SIGTERM), and a rank that
    had died first is named as the cause."""
    strategy, env = trainer.strategy, getattr(trainer.strategy, "cluster_environment", None)
    if spec is None or not isinstance(env, _LocalRanks) or not isinstance(strategy, DDPStrategy) \
            or strategy.num_processes < 2:
        yield
        return
    first = env.node_rank() * strategy.num_processes
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        spec_file = Path(tmp) / "spec.pkl"
        spec_file.write_bytes(pickle.dumps(spec))
        child_env = {**os.environ, "MASTER_ADDR": env.main_address, "MASTER_PORT": str(env.main_port),
                     "NODE_RANK": str(env.node_rank())}
        command = [sys.executable, "-c", _RANK_COMMAND.format(path=sys.path), str(spec_file)]
        procs: dict[int, subprocess.Popen] = {}
        started = False
        try:
            for local in range(1, strategy.num_processes):
                procs[first + local] = subprocess.Popen([*command, str(local)], env=child_env)
            # before rank 0 blocks in the rendezvous, which would wait out the process group's timeout for a rank
            # that died while starting
            while not all((Path(tmp) / f"ready-{rank - first}").exists() for rank in procs):
                if dead := _failed(procs):
                    raise RuntimeError(f"{dead} before training (see its output above)")
                time.sleep(0.05)
            started = True
            yield
        except BaseException as exc:
            if started and isinstance(exc, Exception):  # a rank that died makes rank 0's next collective fail
                deadline = time.monotonic() + 2
                while not _failed(procs) and time.monotonic() < deadline:
                    time.sleep(0.05)
            dead = _failed(procs) if started else ""
            for p in procs.values():
                p.kill()
            for p in procs.values():
                p.wait()
            # a non-finite loss is decided over all ranks: every rank stops with it, and it is the message
            if dead and isinstance(exc, Exception) and not isinstance(exc, NonFiniteLoss):
                raise RuntimeError(f"{dead} (see its output above); rank {first} then stopped with "
                                   f"{type(exc).__name__}: {exc}") from exc
            raise
        for rank, p in procs.items():
            try:
                code = p.wait(timeout=RANK_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                raise RuntimeError(f"rank {rank} did not exit within {RANK_EXIT_TIMEOUT_S} s of the end of training") \
                    from None
            if code:
                raise RuntimeError(f"rank {rank} exited with code {code} after training (see its output above)")


def _failed(procs: dict[int, subprocess.Popen]) -> str:
    """'rank R exited with code C' for the ranks that have died, or ''."""
    dead = [f"rank {rank} exited with code {p.returncode}" for rank, p in procs.items() if p.poll()]
    return ", ".join(dead)


def _run_rank(spec_file: str, local_rank: str) -> None:
    """A rank started by ``_other_local_ranks``: rank 0's data, module and trainer, no tracking. The network's initial
    weights do not matter: DDP copies rank 0's parameters and buffers into every rank when it wraps the model."""
    die_with_parent()  # a rank whose rank 0 was killed would wait in its next collective until the group times out
    spec = pickle.loads(Path(spec_file).read_bytes())  # written by our rank 0, a moment ago, in its private folder
    config, curated = spec["config"], spec["curated"]
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = SegmentationDataModule(config, curated)
    module = SegmentationModule(config, freeze=spec["freeze"])
    module.step_offset = spec.get("step_offset", 0)
    with tempfile.TemporaryDirectory(prefix="ckpt-") as ckpt_dir:
        # it takes part in rank 0's checkpoint of every epoch (a collective), writing nothing itself
        trainer, _ = _trainer(config, curated, datamodule, ckpt_dir, [EpochTracking(checkpoint_dir=ckpt_dir)],
                              progress=False, environment=_LocalRanks(int(local_rank)))
        Path(spec_file).with_name(f"ready-{local_rank}").touch()
        _fit(trainer, module, datamodule, ckpt_path=spec.get("ckpt_path"))  # rank 0's resume point, on this node


# what a DDP fit changes in the process: Lightning exports the rendezvous and, with several local ranks, caps threads
_DDP_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


@contextmanager
def _process_state():
    """Leave the process as the fit found it: a process group the fit initialised is destroyed (the next run in this
    process, and the prediction figures, must not see ranks), and the variables and thread count are put back."""
    saved = {k: os.environ.get(k) for k in _DDP_ENVIRONMENT}
    threads = torch.get_num_threads()
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        yield
    finally:
        if not had_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _fit(trainer: L.Trainer, module, datamodule, ranks: dict | None = None, ckpt_path: Path | None = None) -> None:
    """trainer.fit, with Lightning's "graceful shutdown" on Ctrl-C (it calls sys.exit) turned back into an interrupt
    so the run ends KILLED, and Ctrl-C enabled again afterwards. ``ranks``: what the other local ranks of a DDP fit
    start from (rank 0 only). ``ckpt_path``: a run's resume point, loaded with ``weights_only=True`` (tensors and plain
    containers only: torch's safe unpickler, whatever the file holds)."""
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with _process_state(), _other_local_ranks(trainer, ranks), warnings.catch_warnings():
            # the run's checkpoint folder holds its lock, and after a resume its earlier checkpoints: as it should
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                        weights_only=True)
    except SystemExit as exc:
        if trainer.interrupted:
            raise KeyboardInterrupt("training interrupted") from exc
        raise
    finally:
        signal.signal(signal.SIGINT, sigint)
    if trainer.interrupted:
        raise KeyboardInterrupt("training interrupted")

