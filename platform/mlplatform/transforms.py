"""Input transforms: normalisation (explicit and recorded with every model) and training augmentation.

Normalisation is part of the model's contract: training, evaluation and ``predict`` all call :func:`normalize` with
the spec stored in the model's metadata, so a model sees real micrographs exactly as it saw its training data.
Augmentation (training only) uses albumentations.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise checks PyPI on import


def normalize(image: np.ndarray, spec: dict, inplace: bool = False) -> np.ndarray:
    """float32 image normalised per ``spec`` ({'kind': 'per_image_zscore' | 'per_image_minmax', 'clip_sigma'}).

    ``inplace``: a writable float32 ``image`` is normalised in its own memory (the loaders' freshly read buffers);
    otherwise a copy is. The same float32 operations either way, so the values are the same to the bit."""
    x = np.asarray(image, np.float32)
    if x is image and not (inplace and x.flags.writeable):
        x = x.copy()
    kind = spec["kind"]
    if kind == "per_image_zscore":
        std = float(x.std())
        np.subtract(x, float(x.mean()), out=x)
        np.divide(x, std if std > 0 else 1.0, out=x)
        if spec.get("clip_sigma"):
            np.clip(x, -spec["clip_sigma"], spec["clip_sigma"], out=x)
    elif kind == "per_image_minmax":
        lo, hi = float(x.min()), float(x.max())
        np.subtract(x, lo, out=x)
        np.divide(x, hi - lo if hi > lo else 1.0, out=x)
    else:
        raise ValueError(f"normalization kind {kind!r}; allowed: per_image_zscore, per_image_minmax")
    return x


def build_augmentation(aug: dict, crop_px: int | None):
    """albumentations pipeline for training: random crop, then the configured symmetry/intensity/noise options."""
    import albumentations as A

    steps = []
    if crop_px:
        steps.append(A.RandomCrop(crop_px, crop_px, pad_if_needed=True, border_mode=0, fill=0, fill_mask=0))
    if aug.get("dihedral", True):
        steps.append(A.D4(p=1.0))
    if aug.get("gaussian_blur_sigma_px", 0) > 0:
        steps.append(A.GaussianBlur(sigma_limit=(0.1, aug["gaussian_blur_sigma_px"]), blur_limit=0, p=0.5))
    if aug.get("brightness_contrast", 0) > 0:
        lim = aug["brightness_contrast"]
        steps.append(A.RandomBrightnessContrast(brightness_limit=lim, contrast_limit=lim, ensure_safe_range=False,
                                                p=0.5))
    if aug.get("gaussian_noise_std", 0) > 0:
        std = aug["gaussian_noise_std"]
        steps.append(A.GaussNoise(std_range=(0.0, std), mean_range=(0.0, 0.0), p=0.5))
    return A.Compose(steps, seed=None)


def thin_counts(counts: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """The image ``counts`` (whole, non-negative numbers) as detected at ``factor`` times the dose: each count kept
    with probability ``factor`` (binomial thinning of Poisson(lambda) counts is Poisson(factor lambda)), rescaled by
    1 / factor so the mean intensity is unchanged. Images that are not counts are returned unchanged."""
    x = np.asarray(counts)
    if factor >= 1 or x.size == 0 or x.min() < 0 or not np.array_equal(x, np.round(x)):
        return x
    return (rng.binomial(x.astype(np.int64), factor) / factor).astype(np.float32)


class PhysicsAugmentation:
    """The augmentations that follow the image formation, seeded: dose resampling before normalisation, contrast
    inversion after it (see config.Augmentation)."""

    def __init__(self, aug: dict, seed: int):
        self.p_dose = float(aug.get("dose_resample") or 0.0)
        self.min_factor = float(aug.get("dose_min_factor") or 1.0)
        self.p_invert = float(aug.get("contrast_inversion") or 0.0)
        self.rng = np.random.default_rng(seed)

    def before_normalization(self, image: np.ndarray) -> np.ndarray:
        if self.p_dose and self.rng.random() < self.p_dose:
            factor = float(np.exp(self.rng.uniform(np.log(self.min_factor), 0.0)))
            return thin_counts(image, factor, self.rng)
        return image

    def after_normalization(self, image: np.ndarray) -> np.ndarray:
        if self.p_invert and self.rng.random() < self.p_invert:
            return -image
        return image
