"""Images logged with a run: predictions on the same few images of each benchmark, every scored epoch.

Each benchmark's images are fixed for the run (and the same for every run that reads the same benchmark selection,
see ``data.showcase_records``), so MLflow's image view can compare them across epochs and across runs. A panel shows
the micrograph with the true mask outline (green) and the predicted one (magenta), and is labelled with what a
microscopist needs to read it: structure, defocus, dose and the image's Dice.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .metrics import confusion, dice_from_counts
from .model_format import THRESHOLD

TRUE_RGB, PRED_RGB = (0, 208, 96), (255, 48, 255)
PANEL_PX = 192  # each micrograph is shown at this size (nearest-neighbour), whatever the crop
LABEL_PX = 40


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, lines: list[str]):
    from PIL import Image, ImageDraw

    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    scale = max(1, PANEL_PX // max(image.shape))
    rgb = np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8))
    for mask, colour in ((truth, TRUE_RGB), (pred, PRED_RGB)):
        big = np.kron(mask.astype(np.uint8), np.ones((scale, scale), dtype=np.uint8)).astype(bool)
        rgb[_outline(big)] = colour
    canvas = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + LABEL_PX), "white")
    canvas.paste(Image.fromarray(rgb), (0, LABEL_PX))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((3, 2 + 12 * i), line, fill="black")
    return canvas


def _describe(meta: dict) -> list[str]:
    imaging, structure = meta.get("imaging") or {}, meta.get("structure") or {}
    first = " ".join(str(x) for x in (structure.get("material"), structure.get("kind")) if x) or "structure"
    if isinstance(structure.get("radius_A"), (int, float)):
        first += f", r {structure['radius_A']:.0f} A"
    if structure.get("n_defects"):
        first += f", {structure['n_defects']} defect(s)"
    parts = []
    if isinstance(imaging.get("defocus_A"), (int, float)):
        parts.append(f"defocus {imaging['defocus_A']:+.0f} A")
    if isinstance(imaging.get("dose_e_per_A2"), (int, float)):
        parts.append(f"dose {imaging['dose_e_per_A2']:.0f} e/A^2")
    return [first, ", ".join(parts)]


@torch.no_grad()
def prediction_panels(module, samples: list[tuple[dict, np.ndarray, np.ndarray]], title: str) -> np.ndarray:
    """One RGB image (H, W, 3 uint8): a labelled panel per (metadata, normalised image, mask) sample, side by side,
    under a title line. The module is put in eval mode for the prediction and restored."""
    from PIL import Image, ImageDraw

    was_training = module.training
    module.eval()
    try:
        panels = []
        for meta, image, mask in samples:
            x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(module.device)
            pred = (torch.sigmoid(module(x))[0, 0] > THRESHOLD).cpu().numpy()
            truth = np.asarray(mask) > THRESHOLD
            tp, fp, fn = confusion(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])[0]
            lines = [*_describe(meta), f"Dice {float(dice_from_counts(tp, fp, fn)):.3f}"]
            panels.append(_panel(np.asarray(image), truth, pred, lines))
    finally:
        module.train(was_training)
    width = sum(p.width for p in panels) + 4 * max(len(panels) - 1, 0)
    height = max((p.height for p in panels), default=LABEL_PX) + 16
    sheet = Image.new("RGB", (max(width, 320), height), "white")
    ImageDraw.Draw(sheet).text((3, 2), f"{title}   true: green, predicted: magenta", fill="black")
    x = 0
    for p in panels:
        sheet.paste(p, (x, 16))
        x += p.width + 4
    return np.asarray(sheet)
