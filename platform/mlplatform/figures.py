"""Figures logged with a run: predictions on a few images of each benchmark."""

from __future__ import annotations

import numpy as np
import torch

from .model_format import THRESHOLD


@torch.no_grad()
def prediction_figure(module, loader, title: str, n: int):
    """Images with the true mask outline (green) and the predicted one (magenta); ``n`` first images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, truths, preds, keys = [], [], [], []
    module.eval()
    for batch in loader:
        probs = torch.sigmoid(module(batch["image"].to(module.device))).cpu()
        for i in range(len(batch["key"])):
            images.append(batch["image"][i, 0].numpy())
            truths.append(batch["mask"][i, 0].numpy() > THRESHOLD)
            preds.append(probs[i, 0].numpy() > THRESHOLD)
            keys.append(batch["key"][i])
            if len(images) == n:
                break
        if len(images) == n:
            break
    cols = max(len(images), 1)
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.9), squeeze=False)
    for ax, image, truth, pred, key in zip(axes[0], images, truths, preds, keys):
        lo, hi = np.percentile(image, [1, 99])
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        for mask, colour in ((truth, "#00d060"), (pred, "#ff30ff")):
            if 0 < mask.sum() < mask.size:
                ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.0)
        inter = np.logical_and(truth, pred).sum()
        denom = truth.sum() + pred.sum()
        ax.set_title(f"{key}\nDice {2 * inter / denom if denom else 1.0:.3f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title}   true: green, predicted: magenta", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # room for the suptitle above the panel titles
    return fig
