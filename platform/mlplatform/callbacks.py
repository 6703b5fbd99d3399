"""Callbacks: out-of-distribution evaluation every epoch, and per-epoch tracking with step = epoch.

``OODEvaluation`` scores the model on every configured benchmark at the end of every ``interval``-th epoch (and the
last): dataset-level Dice and IoU from summed TP/FP/FN counts, and the mean per-image Dice, plus their mean over
benchmarks (``ood/mean/dice``). Under DDP each rank scores its share of the shards and the ranks' totals are summed,
so the scores equal one process's. It runs at the end of the validation epoch; ``EpochTracking`` then sends everything
the epoch produced to the tracked run in one call at the end of the training epoch (from rank 0).
"""

from __future__ import annotations

import time

import lightning as L
import torch

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


class EpochTracking(L.Callback):
    """Logs the epoch's metrics to the tracked run, once per epoch, from rank 0, with step = ``step_offset`` + epoch
    (0-based): a fine-tune's offset is its pretrain's epoch count, so its curves continue the pretrain's."""

    def __init__(self, run=None, step_offset: int = 0):
        self.run = run  # a TrackedRun on rank 0 (set once the run exists); None on the other ranks
        self.step_offset = step_offset
        self.last_step: int | None = None  # the step of the last epoch logged
        self._started = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = dict(pl_module.epoch_metrics)
        metrics["train/loss"] = pl_module.train_loss_of_epoch()
        metrics["time/epoch_s"] = time.perf_counter() - self._started
        if trainer.is_global_zero and self.run is not None:
            self.last_step = self.step_offset + trainer.current_epoch
            self.run.log_metrics(metrics, step=self.last_step)
        pl_module.epoch_metrics = {}


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
