"""A classical segmentation baseline, scored exactly like the networks: the floor a trained model has to beat.

Per image: Gaussian filter (sigma in pixels), Otsu threshold of the filtered image, the particle on the side of the
threshold given by ``polarity`` ("dark": below, "bright": above), holes filled, then the largest connected component.
Dice is the benchmark's dataset Dice (counts summed over its images, :mod:`.metrics`), as ``ood/<name>/dice``.

The baseline is *tuned on the benchmark it is scored on*: sigma and polarity are chosen to maximise that benchmark's
Dice over a fixed grid. That is an optimistic floor: a real user has no masks to tune on. A network that beats it on
every benchmark beats every member of this family that does not look at the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .metrics import confusion, scores_from_totals, totals

SIGMAS_PX = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
POLARITIES = ("dark", "bright")


def otsu_threshold(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``x``: the histogram split that maximises the between-class variance."""
    x = np.asarray(x, np.float64).ravel()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(x, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1:][int(np.argmax(between[:-1]))]) if bins > 1 else float(centres[0])


def _filtered(image: np.ndarray, sigma_px: float) -> np.ndarray:
    x = np.asarray(image, np.float64)
    return ndimage.gaussian_filter(x, sigma_px, mode="reflect") if sigma_px > 0 else x


def _component(x: np.ndarray, t: float, polarity: str) -> np.ndarray:
    """The largest connected region (holes filled) on ``polarity``'s side of ``t``."""
    fg = ndimage.binary_fill_holes(x < t if polarity == "dark" else x > t)
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(x.shape, np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == 1 + int(np.argmax(sizes))).astype(np.uint8)


def segment(image: np.ndarray, sigma_px: float, polarity: str) -> np.ndarray:
    """Binary mask (uint8) of the classical pipeline on one image."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity {polarity!r}; allowed: {', '.join(POLARITIES)}")
    x = _filtered(image, sigma_px)
    return _component(x, otsu_threshold(x), polarity)


@dataclass(frozen=True)
class BaselineScore:
    benchmark: str
    dice: float
    iou: float
    dice_mean_image: float
    n_images: int
    sigma_px: float
    polarity: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _scores(pred: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    counts = torch.cat([confusion(torch.from_numpy(p)[None], torch.from_numpy(np.asarray(m))[None])
                        for p, m in zip(pred, masks)])
    return scores_from_totals(totals(counts))


def tuned(name: str, images: list[np.ndarray], masks: list[np.ndarray], sigmas=SIGMAS_PX,
          polarities=POLARITIES) -> BaselineScore:
    """The best (by dataset Dice; ties to the smaller sigma, then 'dark') setting on this benchmark, and its scores."""
    if not images:
        raise ValueError(f"benchmark {name}: no images to score the baseline on")
    results = {}
    for sigma in sigmas:
        filtered = [_filtered(i, sigma) for i in images]
        thresholds = [otsu_threshold(x) for x in filtered]
        for polarity in polarities:
            results[(sigma, polarity)] = _scores([_component(x, t, polarity) for x, t in zip(filtered, thresholds)],
                                                 masks)
    order = {p: i for i, p in enumerate(polarities)}
    (sigma, polarity), s = max(results.items(), key=lambda kv: (kv[1]["dice"], -kv[0][0], -order[kv[0][1]]))
    return BaselineScore(name, s["dice"], s["iou"], s["dice_mean_image"], s["n_images"], float(sigma), polarity)


def score_benchmarks(refs: list[dict]) -> tuple[dict[str, dict], list[str]]:
    """The tuned baseline on each benchmark ``refs`` (dicts of a config's ``benchmarks``: name, path, filter,
    max_samples...), on exactly the samples a run scores (the same selection and seed). Returns ({name: scores},
    notes): a benchmark whose data cannot be read here is left out, with a note saying why."""
    from .config import BenchmarkRef, DataConfig, DatasetRef
    from .curation import scan_dataset, select
    from .data import BENCHMARK_SEED, read_samples

    out, notes = {}, []
    d = DataConfig(train=[DatasetRef(path=".")], normalization={"kind": "per_image_minmax"})
    for raw in refs:
        try:
            ref = BenchmarkRef(**raw)
            records = select(scan_dataset(ref.path), ref.filter, ref.max_samples, ref.max_images_per_structure,
                             BENCHMARK_SEED)
            samples = read_samples(records, d)
        except Exception as exc:  # noqa: BLE001  a report is still worth writing without the baseline
            notes.append(f"{raw.get('name')}: baseline not computed ({type(exc).__name__}: {exc})")
            continue
        out[ref.name] = tuned(ref.name, [i for _, i, _ in samples], [m for _, _, m in samples]).as_dict()
    return out, notes
