"""The Lightning module: a segmentation network, Dice + cross-entropy loss, optimiser and schedule from config.

Validation Dice is computed from TP/FP/FN counts summed over the whole validation set (each rank's totals summed
across ranks), not as a mean of per-batch scores. The module keeps the epoch's scalar results in ``epoch_metrics`` for
the tracking callback, which logs them with step = epoch.

A training loss that is not finite (nan, inf) stops the run at once with :class:`NonFiniteLoss` (an InputError: the
configuration or the data make training diverge), decided over all ranks so that every rank stops at the same step.
Every epoch starts from random streams seeded by (seed, epoch) (:func:`seed_epoch`), so an epoch computes the same
whether the run went through uninterrupted or was resumed from a checkpoint (``mlplatform.train``).
"""

from __future__ import annotations

import hashlib
import math
import random

import lightning as L
import numpy as np
import torch
from monai.losses import DiceCELoss

from hrtem_core.errors import InputError

from .config import TrainConfig
from .metrics import confusion, scores_from_totals, totals
from .model_format import THRESHOLD
from .models import build_model, frozen_parameters


# how to self.log a score that is already the whole set's (from the ranks' summed totals): every rank holds the same
# value, the maximum over ranks keeps it exactly (a mean over 3 ranks could round), and Lightning does not warn that an
# epoch-level value is left unsynchronised
SAME_ON_EVERY_RANK = {"sync_dist": True, "reduce_fx": "max"}


class NonFiniteLoss(InputError):
    """The training loss became nan or infinite: the run ends FAILED, and no model is logged."""


def seed_epoch(seed: int, epoch: int) -> None:
    """Python's, NumPy's and torch's global random streams (CPU and GPU) seeded by (seed, epoch): what an epoch draws
    from them (none of the presets uses dropout today; the data streams have seeds of their own, ``mlplatform.data``)
    does not depend on what earlier epochs drew, nor on whether they ran in this process."""
    value = int.from_bytes(hashlib.sha256(repr(("epoch", seed, epoch)).encode()).digest()[:4], "little")
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def scores_over_ranks(counts: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Scores of the per-image [tp, fp, fn] rows of every rank: each rank's ``totals`` summed over the process group
    when one is initialised (a collective: every rank calls it, with or without images), as they are otherwise."""
    t = totals(counts)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        t = t.to(device)  # NCCL reduces tensors on the rank's GPU
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return scores_from_totals(t.cpu())


class SegmentationModule(L.LightningModule):
    def __init__(self, config: TrainConfig, network: torch.nn.Module | None = None, freeze: str = "none"):
        super().__init__()
        self.config = config
        self.preset = config.model.preset
        self.model = network if network is not None else build_model(self.preset)
        self.freeze = freeze  # none, encoder or decoder (a fine-tune's finetune.frozen)
        for p in frozen_parameters(self.model, self.preset, freeze):
            p.requires_grad_(False)
        self.loss = DiceCELoss(sigmoid=True, batch=True, lambda_dice=config.loss.dice_weight,
                               lambda_ce=config.loss.ce_weight)
        self.epoch_metrics: dict[str, float] = {}
        self.step_offset = 0  # a fine-tune's epochs continue its pretrain's count (in messages, as in the metrics)
        self._train_loss = torch.zeros(2, dtype=torch.float64)
        self._val_counts: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        loss = self.loss(self(batch["image"]), batch["mask"])
        bad = not bool(torch.isfinite(loss.detach()))
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):  # any rank: every rank stops here
            value = float(loss.detach())
            shown = str(value) if not math.isfinite(value) else "not finite on another rank"  # nan, inf, -inf
            raise NonFiniteLoss(
                f"training loss is {shown} at epoch {self.step_offset + self.current_epoch} step {self.global_step} "
                f"(batch {batch_idx} of the epoch): training diverged; lower optim.lr (now {self.config.optim.lr:g}) "
                "or check the data")
        self._train_loss += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64)
        self.log("train/loss", loss, prog_bar=True, logger=False)
        return loss

    def on_train_epoch_start(self):
        seed_epoch(self.config.seed, self.current_epoch)
        self._train_loss.zero_()
        self.epoch_metrics["train/lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"])  # this epoch's

    def train_loss_of_epoch(self) -> float:
        """Mean training loss of the epoch so far over all ranks (called by the tracking callback, which Lightning
        runs before the module's own on_train_epoch_end)."""
        total = self.trainer.strategy.reduce(self._train_loss.to(self.device), reduce_op="sum").cpu()
        return float(total[0] / max(total[1], 1))

    def on_validation_epoch_start(self):
        self._val_counts = []

    def validation_step(self, batch, batch_idx):
        probs = torch.sigmoid(self(batch["image"]))
        self._val_counts.append(confusion(probs > THRESHOLD, batch["mask"] > THRESHOLD).cpu())

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            return
        counts = torch.cat(self._val_counts) if self._val_counts else torch.zeros((0, 3), dtype=torch.int64)
        scores = scores_over_ranks(counts, self.device)
        self.epoch_metrics["val/dice"] = scores["dice"]
        self.epoch_metrics["val/dice_mean_image"] = scores["dice_mean_image"]
        self.epoch_metrics["val/iou"] = scores["iou"]
        # for checkpointing and early stopping; MLflow gets it from the tracking callback
        self.log("val/dice", scores["dice"], logger=False, **SAME_ON_EVERY_RANK)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # which config the checkpoint continues: a resume refuses a checkpoint of another config
        checkpoint["config_hash"] = self.config.hash()

    def configure_optimizers(self):
        o = self.config.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        if o.name == "adam":
            opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        elif o.name == "adamw":
            opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        if o.scheduler == "none":
            return opt
        if o.scheduler == "exponential":
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=o.gamma)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.config.epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
