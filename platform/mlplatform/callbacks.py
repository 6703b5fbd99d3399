"""Callbacks: out-of-distribution evaluation every epoch, and per-epoch tracking with step = epoch.

``OODEvaluation`` scores the model on every configured benchmark at the end of every ``interval``-th epoch (and the
last): dataset-level Dice and IoU from summed TP/FP/FN counts, and the mean per-image Dice, plus their mean over
benchmarks (``ood/mean/dice``). Under DDP each rank scores its share of the shards and the ranks' totals are summed,
so the scores equal one process's. It runs at the end of the validation epoch; ``EpochTracking`` then writes the
run's resume point (``last.ckpt``) and sends everything the epoch produced to the tracked run in one call at the end
of the training epoch (from rank 0).

Exactly once, across a kill and a resume: an epoch's metrics go to the run only after the checkpoint that holds the
end of that epoch has been written (atomically), and that checkpoint holds the metrics too (``EpochTracking``'s
state). A resume continues after the checkpoint's epoch, so no step is logged twice, and logs the checkpoint's
metrics if the kill came between the checkpoint and the logging, so no step is lost (``mlplatform.train``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from hrtem_core.files import partial_path

from .metrics import confusion
from .model_format import THRESHOLD
from .module import SAME_ON_EVERY_RANK, scores_over_ranks


@torch.no_grad()
def score_loader(module: L.LightningModule, loader) -> dict[str, float]:
    """Dice/IoU of the module's thresholded predictions over one finite loader (summed across ranks)."""
    counts = []
    for batch in loader:
        probs = torch.sigmoid(module(batch["image"].to(module.device)))
        counts.append(confusion(probs > THRESHOLD, batch["mask"].to(module.device) > THRESHOLD).cpu())
    rows = torch.cat(counts) if counts else torch.zeros((0, 3), dtype=torch.int64)
    return scores_over_ranks(rows, module.device)


MEAN_DICE = "ood/mean/dice"  # mean over benchmarks: the default objective of studies and pruning


class OODEvaluation(L.Callback):
    def __init__(self, datamodule, names: list[str], interval: int = 1):
        self.datamodule = datamodule
        self.names = list(names)
        self.interval = interval
        self.history: list[dict] = []

    def due(self, trainer: L.Trainer) -> bool:
        done = trainer.current_epoch + 1
        return done % self.interval == 0 or done == trainer.max_epochs

    def on_validation_epoch_end(self, trainer, pl_module):
        # during validation, so that callbacks reading trainer.callback_metrics at validation end (checkpointing,
        # optuna-integration's pruning callback) see this epoch's OOD scores
        if trainer.sanity_checking or not self.names or not self.due(trainer):
            return
        started = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        metrics = {}
        try:
            for name in self.names:
                scores = score_loader(pl_module, self.datamodule.benchmark_dataloader(name))
                for key in ("dice", "dice_mean_image", "iou"):
                    metrics[f"ood/{name}/{key}"] = scores[key]
                pl_module.log(f"ood/{name}/dice", scores["dice"], logger=False, **SAME_ON_EVERY_RANK)
            mean = sum(metrics[f"ood/{n}/dice"] for n in self.names) / len(self.names)
            metrics[MEAN_DICE] = mean
            pl_module.log(MEAN_DICE, mean, logger=False, **SAME_ON_EVERY_RANK)
        finally:
            pl_module.train(was_training)
        metrics["time/ood_s"] = time.perf_counter() - started
        pl_module.epoch_metrics.update(metrics)
        self.history.append({"epoch": trainer.current_epoch, **metrics})


LAST_CHECKPOINT = "last.ckpt"  # the resume point of a run, in its checkpoint folder (and the artifact checkpoints/)


class EpochTracking(Checkpoint):
    """Logs the epoch's metrics to the tracked run, once per epoch, from rank 0, with step = ``step_offset`` + epoch
    (0-based): a fine-tune's offset is its pretrain's epoch count, so its curves continue the pretrain's.

    With ``checkpoint_dir`` (a folder of rank 0; every rank must be given one, as saving is collective), the state of
    the fit at the end of every epoch is first written there as ``last.ckpt`` (under a temporary name, then renamed:
    a kill leaves the previous one whole), with this epoch's metrics in this callback's state; ``upload`` also logs
    it as the run's artifact ``checkpoints/last.ckpt`` (for a tracking server, whose runs another machine may
    resume). It is a Lightning ``Checkpoint`` so that Lightning runs it after the ``ModelCheckpoint`` of the best
    epoch, whose updated state the file then includes."""

    def __init__(self, run=None, step_offset: int = 0, checkpoint_dir: str | Path | None = None,
                 upload: bool = False):
        self.run = run  # a TrackedRun on rank 0 (set once the run exists); None on the other ranks
        self.step_offset = step_offset
        self.checkpoint_dir = checkpoint_dir
        self.upload = upload
        self.last_step: int | None = None  # the step of the last epoch logged
        self.pending: dict | None = None  # {"step", "metrics"} of the epoch being checkpointed, in its checkpoint
        self._started = 0.0

    @property
    def state_key(self) -> str:
        return "EpochTracking"

    def state_dict(self) -> dict:
        return {"pending": self.pending, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:  # a resumed fit: its pending metrics are train's business
        self.last_step = state_dict.get("last_step")

    def on_train_epoch_start(self, trainer, pl_module):
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = dict(pl_module.epoch_metrics)
        metrics["train/loss"] = pl_module.train_loss_of_epoch()
        metrics["time/epoch_s"] = time.perf_counter() - self._started
        step = self.step_offset + trainer.current_epoch
        self.pending, self.last_step = {"step": step, "metrics": metrics}, step
        if self.checkpoint_dir is not None:
            self._save_last(trainer)
        if trainer.is_global_zero and self.run is not None:
            self.run.log_metrics(metrics, step=step)
        self.pending = None
        pl_module.epoch_metrics = {}

    def _save_last(self, trainer) -> None:
        final = Path(self.checkpoint_dir) / LAST_CHECKPOINT
        temporary = partial_path(final)
        trainer.save_checkpoint(temporary, weights_only=False)  # every rank takes part; rank 0 writes
        if not trainer.is_global_zero:
            return
        with open(temporary, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(temporary, final)
        if self.upload and self.run is not None:
            self.run.log_artifact(final, "checkpoints")


class PredictionImages(L.Callback):
    """On the epochs the OOD scores are computed, logs one labelled image per benchmark of the predictions on fixed
    samples (``figures.prediction_panels``) under key ``predictions/<benchmark>``, with the tracking step, from rank 0.
    ``samples``: benchmark -> [(metadata, normalised image, mask)]."""

    def __init__(self, samples: dict[str, list], ood: OODEvaluation, tracking: EpochTracking, label: str):
        self.samples, self.ood, self.tracking, self.label = samples, ood, tracking, label

    def on_validation_epoch_end(self, trainer, pl_module):
        run = self.tracking.run
        if trainer.sanity_checking or run is None or not trainer.is_global_zero or not self.ood.due(trainer):
            return
        from .figures import prediction_panels

        step = self.tracking.step_offset + trainer.current_epoch
        for name, samples in self.samples.items():
            if samples:
                image = prediction_panels(pl_module, samples, f"{name} | {self.label} | epoch {step}")
                run.log_image(image, f"predictions/{name}", step)
