"""One tracked training run: pretrain from scratch, or fine-tune a tracked model.

Everything that can be checked is checked before the MLflow run exists (config, data, the parent model), so a bad
input leaves no run behind. Once the run exists, it ends FINISHED, FAILED (with the reason) or KILLED — never RUNNING.
"""

from __future__ import annotations

import re
import signal
import tempfile

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from .callbacks import EpochTracking, OODEvaluation
from .config import TrainConfig, flatten
from .data import DataError, SegmentationDataModule, curate
from .figures import prediction_figure
from .model_format import RUN_ID, THRESHOLD
from .models import count_parameters
from .module import SegmentationModule
from .provenance import __version__
from .serving import load_model
from .store import resolve_tracking_uri
from .tracking import TrackedRun

PHASES = ("pretrain", "finetune")


def parent_run_id(ref: str) -> str | None:
    """The run a model reference points into, where the reference says (a run id or a runs:/ URI)."""
    if RUN_ID.fullmatch(ref):
        return ref
    m = re.match(rf"runs:/({RUN_ID.pattern})(/|$)", ref)
    return m.group(1) if m else None


def _adopt_parent(config: TrainConfig, meta: dict) -> TrainConfig:
    """A fine-tune keeps the parent's architecture and input contract (normalisation)."""
    data = config.resolved()
    data["model"]["preset"] = meta["preset"]
    data["data"]["normalization"] = meta["normalization"]
    return TrainConfig.model_validate(data)


def train(config: TrainConfig, phase: str = "pretrain", init_from: str | None = None,
          tracking_uri: str | None = None, progress: bool = True, extra_tags: dict | None = None,
          nest_under: str | None = None, callbacks: list | None = None, extra_params: dict | None = None,
          stop_exceptions: tuple = (), on_start=None, commit=None) -> str:
    """Train one model; returns the MLflow run id.

    ``nest_under`` makes the run an MLflow child of another (a sweep or study run); the lineage of a fine-tune (the
    run its model came from) is recorded in the ``parent_run`` tag either way. ``callbacks`` are extra Lightning
    callbacks (e.g. Optuna pruning). ``on_start(run_id)`` and ``commit(run_id) -> bool`` are the hooks of a work
    queue (see :class:`~mlplatform.tracking.TrackedRun`): a refused commit ends the run KILLED and raises
    :class:`~mlplatform.tracking.Superseded`.
    """
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}; allowed: {', '.join(PHASES)}")
    if (phase == "finetune") != (init_from is not None):
        raise ValueError("a fine-tune needs --from RUN_ID|MODEL_URI, and only a fine-tune takes one")
    uri = resolve_tracking_uri(tracking_uri)
    network, parent_meta, parent = None, None, None
    if phase == "finetune":
        network, parent_meta = load_model(init_from, tracking_uri=uri)
        config = _adopt_parent(config, parent_meta)
        # the model's metadata names the run that made it, whatever form the reference took (models:/ included)
        parent = parent_meta.get("run_id") or parent_run_id(init_from)
    curated = curate(config)
    if parent_meta is not None and abs(parent_meta["pixel_size_A"] - curated.pixel_size_A) > 1e-6:
        raise DataError(f"the fine-tuning data have {curated.pixel_size_A} Å pixels, the model was trained at "
                        f"{parent_meta['pixel_size_A']} Å: resample the data first")

    L.seed_everything(config.seed, workers=True, verbose=False)
    tags = {
        "phase": phase,
        "seed": str(config.seed),
        "subset": curated.subset,
        "subset.filter": curated.subset_filter,
        "model.preset": config.model.preset,
        "config.hash": config.hash(),
        **(extra_tags or {}),
    }
    if init_from:
        tags["init_from"] = init_from
    if parent:
        tags["parent_run"] = parent
    run_name = config.tracking.run_name or f"{phase}-{curated.subset}-s{config.seed}"
    params = {**flatten(config.resolved()), **(extra_params or {})}
    with TrackedRun(uri, config.tracking.experiment, run_name, params=params, tags=tags,
                    parent_run_id=nest_under or parent, system_metrics=config.tracking.system_metrics,
                    stop_exceptions=stop_exceptions, on_start=on_start, commit=commit) as run:
        for use in curated.uses:
            run.log_dataset(use.role, use.name, use.path, use.content_hash, use.n_samples, use.filter)
        run.log_dict(config.resolved(), "config/resolved.yaml")
        datamodule = SegmentationDataModule(config, curated)
        module = SegmentationModule(config, network, freeze_encoder=phase == "finetune"
                                    and config.finetune.freeze_encoder)
        run.set_tags({"model.parameters": str(count_parameters(module.model)),
                      "model.trainable_parameters": str(sum(p.numel() for p in module.model.parameters()
                                                            if p.requires_grad))})
        with tempfile.TemporaryDirectory(prefix="ckpt-") as ckpt_dir:
            checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/dice", mode="max", save_top_k=1,
                                         filename="best-epoch{epoch}", auto_insert_metric_name=False)
            t = config.trainer
            trainer = L.Trainer(
                max_epochs=config.epochs, limit_train_batches=config.data.steps_per_epoch,
                accelerator=t.accelerator, devices=t.devices, precision=t.precision, deterministic=t.deterministic,
                logger=False, callbacks=[checkpoint, OODEvaluation(datamodule, list(curated.benchmarks),
                                                                   config.ood_interval), EpochTracking(run),
                                         *(callbacks or [])],
                reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, enable_progress_bar=progress,
                enable_model_summary=False, log_every_n_steps=t.log_every_n_steps,
            )
            _fit(trainer, module, datamodule)
            metadata = {
                "preset": config.model.preset,
                "pixel_size_A": curated.pixel_size_A,
                "normalization": config.data.normalization.model_dump(),
                "threshold": THRESHOLD,
                "phase": phase,
                "epochs": config.epochs,
                "run_id": run.run_id,
                "parent_run": parent,
                "config_hash": config.hash(),
                "train_datasets": [{"name": u.name, "content_hash": u.content_hash, "filter": u.filter}
                                   for u in curated.uses if u.role == "train"],
                "platform_version": __version__,
            }
            run.log_model(module.model, metadata)
            if checkpoint.best_model_path:
                run.log_artifact(checkpoint.best_model_path, "checkpoints")
        n_images = config.tracking.n_prediction_images
        if n_images:
            import matplotlib.pyplot as plt

            for name in curated.benchmarks:
                fig = prediction_figure(module, datamodule.benchmark_dataloader(name), f"{name} ({phase})", n_images)
                run.log_figure(fig, f"predictions/{name}.png")
                plt.close(fig)
        return run.run_id


def _fit(trainer: L.Trainer, module, datamodule) -> None:
    """trainer.fit, with Lightning's "graceful shutdown" on Ctrl-C (it calls sys.exit) turned back into an interrupt
    so the run ends KILLED, and Ctrl-C enabled again afterwards."""
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, datamodule=datamodule)
    except SystemExit as exc:
        if trainer.interrupted:
            raise KeyboardInterrupt("training interrupted") from exc
        raise
    finally:
        signal.signal(signal.SIGINT, sigint)
    if trainer.interrupted:
        raise KeyboardInterrupt("training interrupted")

