"""Segmentation scores from confusion counts.

Dataset-level Dice and IoU are computed from true/false positive and negative counts summed over the whole dataset
(nnU-Net style), not as a mean of per-batch scores; the mean of per-image Dice is reported beside it. An image with
no particle in either mask scores Dice 1 (nothing to find, nothing found).

Everything the scores need is a sum (``totals``), so the scores of a set split across DDP ranks are computed from the
ranks' totals summed (all-reduced): the same numbers as one process scoring the whole set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image [tp, fp, fn] counts (int64, shape [B, 3]) of binary masks of shape [B, ...]."""
    pred = pred.bool().flatten(1)
    target = target.bool().flatten(1)
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    return torch.stack([tp, fp, fn], dim=1).to(torch.int64)


def dice_from_counts(tp, fp, fn):
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(denom, dtype=torch.float64))


def iou_from_counts(tp, fp, fn):
    denom = tp + fp + fn
    return torch.where(denom > 0, tp / denom.clamp(min=1), torch.ones_like(denom, dtype=torch.float64))


def totals(counts: torch.Tensor) -> torch.Tensor:
    """The sums the scores are made of, float64 ``[tp, fp, fn, n_images, sum of per-image Dice]``, of per-image
    ``[tp, fp, fn]`` rows (shape [N, 3]). Totals of disjoint parts of a set add up to the set's totals."""
    c = counts.to(torch.float64).reshape(-1, 3)
    per_image = dice_from_counts(c[:, 0], c[:, 1], c[:, 2])
    return torch.cat([c.sum(0), torch.tensor([c.shape[0]], dtype=torch.float64), per_image.sum().reshape(1)])


def scores_from_totals(t: torch.Tensor) -> dict[str, float]:
    """Dataset Dice and IoU, mean per-image Dice (NaN for no image) and the image count of ``totals``."""
    tp, fp, fn, n, dice_sum = t.to(torch.float64)
    return {
        "dice": float(dice_from_counts(tp, fp, fn)),
        "iou": float(iou_from_counts(tp, fp, fn)),
        "dice_mean_image": float(dice_sum / n),
        "n_images": int(n),
    }


@dataclass
class SegmentationScores:
    """Accumulates per-image counts; ``compute()`` gives dataset Dice, IoU and mean per-image Dice."""

    counts: list = field(default_factory=list)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.counts.append(confusion(pred, target).cpu())

    def compute(self) -> dict[str, float]:
        if not self.counts:
            raise ValueError("no images were scored")
        return scores_from_totals(totals(torch.cat(self.counts)))
