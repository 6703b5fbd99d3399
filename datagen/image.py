"""Stage 3, image: objective lens, partial coherence, detector pixel, dose noise, median filter, crop.

The lens is abTEM's :class:`abtem.CTF` (polar aberration coefficients, quasi-coherent temporal envelope, aperture)
applied to the exit waves of every phonon configuration; intensities are averaged over phonons, band-limited and
resampled to the detector pixel by Fourier cropping (which keeps the mean), then Poisson noise is drawn for the dose.
Each imaging condition reuses the simulated exit waves: a new condition costs FFTs, not a new multislice.

Grid convention: sample ``[i, j]`` of every array here sits at ``(x, y) = (j * dx, i * dx)``, on the potential grid
and on the image grid alike, so particle coordinates in Å map to pixels as ``row = y / pixel``, ``col = x / pixel``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .distributions import sample
from .recipe import Imaging, Recipe
from .seeding import Streams

# abTEM's polar symbols (Å for magnitudes, rad for angles); C10 is set through imaging.defocus_A
_MAGNITUDES = ["C12", "C21", "C23", "C30", "C32", "C34", "C41", "C43", "C45", "C50", "C52", "C54", "C56"]
_ANGLES = ["phi12", "phi21", "phi23", "phi32", "phi34", "phi41", "phi43", "phi45", "phi52", "phi54", "phi56"]
ABERRATION_KEYS = {f"{s}_A" for s in _MAGNITUDES} | {f"{s}_rad" for s in _ANGLES}


def fourier_resample(image: np.ndarray, shape: int) -> np.ndarray:
    """Band-limited resampling of a real periodic [row, col] image to ``shape x shape`` (keeps the mean)."""
    n = image.shape[-1]
    if shape == n:
        return image.astype(np.float64)
    if shape > n:
        raise ValueError(f"cannot upsample from {n} to {shape} pixels")
    F = np.fft.fftshift(np.fft.fft2(image))
    c = n // 2
    lo = c - shape // 2
    F = F[lo:lo + shape, lo:lo + shape]
    if shape % 2 == 0:  # the Nyquist row/column of the new grid is shared by +/- frequencies
        F[0, :] = 0
        F[:, 0] = 0
    out = np.fft.ifft2(np.fft.ifftshift(F)).real * (shape * shape) / (n * n)
    return out


def draw_condition(im: Imaging, streams: Streams) -> dict:
    """The imaging parameters of one condition, from the variant's seed streams."""
    def draw(name, param):
        return sample(param, streams.rng(f"imaging.{name}"))

    cond = {
        "defocus_A": draw("defocus_A", im.defocus_A),
        "focal_spread_A": max(draw("focal_spread_A", im.focal_spread_A), 0.0),
        "semiangle_cutoff_mrad": draw("semiangle_cutoff_mrad", im.semiangle_cutoff_mrad),
        "dose_e_per_A2": max(draw("dose_e_per_A2", im.dose_e_per_A2), 0.0),
        "aberrations": {k: draw(f"aberrations.{k}", v) for k, v in sorted(im.aberrations.items())},
    }
    return cond


def ctf_kwargs(cond: dict, energy_eV: float) -> dict:
    ab = {k.rsplit("_", 1)[0]: v for k, v in cond["aberrations"].items()}
    ab["C10"] = -cond["defocus_A"]
    cutoff = cond["semiangle_cutoff_mrad"]
    return {
        "energy": energy_eV,
        "semiangle_cutoff": cutoff if cutoff < 1e8 else np.inf,
        # abTEM's focal_spread is the 1/e half-width: sqrt(2) * standard deviation
        "focal_spread": math.sqrt(2) * cond["focal_spread_A"],
        "aberration_coefficients": ab,
    }


def lens_intensity(waves: np.ndarray, sampling_A: float, cond: dict, energy_eV: float) -> np.ndarray:
    """Phonon-averaged image intensity [row, col] on the potential grid, relative to the incident beam (vacuum=1)."""
    import abtem

    # abTEM works in (x, y): hand it the transposed arrays and transpose back
    from abtem.core.axes import FrozenPhononsAxis

    w = abtem.Waves(np.ascontiguousarray(np.swapaxes(waves, -1, -2)), energy=energy_eV, sampling=sampling_A,
                    ensemble_axes_metadata=[FrozenPhononsAxis()])
    ctf = abtem.CTF(**ctf_kwargs(cond, energy_eV))
    image = w.apply_ctf(ctf).intensity()
    image = image.compute(scheduler="synchronous", progress_bar=False) if image.is_lazy else image
    array = np.asarray(image.array, np.float64)
    return np.swapaxes(array.reshape(-1, *array.shape[-2:]).mean(axis=0), -1, -2)


def choose_crop(recipe: Recipe, grid_px: int, centre_px: tuple[float, float] | None, radius_px: float,
                rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a random crop window that holds the whole particle (with its margin)."""
    size = recipe.field_of_view_px
    if size >= grid_px:
        return (0, 0)
    corner = []
    for axis in range(2):
        if centre_px is None:
            lo, hi = 0, grid_px - size
        else:
            lo = max(0, math.ceil(centre_px[axis] + radius_px - size + 1))
            hi = min(grid_px - size, math.floor(centre_px[axis] - radius_px))
            if hi < lo:  # cannot happen for a validated recipe; centre the particle rather than cut it
                lo = hi = int(np.clip(round(centre_px[axis] - size / 2), 0, grid_px - size))
        corner.append(int(rng.integers(lo, hi + 1)))
    return (corner[0], corner[1])


def make_image(intensity: np.ndarray, recipe: Recipe, cond: dict, crop: tuple[int, int],
               streams: Streams) -> tuple[np.ndarray, dict]:
    """Detected counts (float32 [H, W]) from the potential-grid intensity."""
    im = recipe.imaging
    grid_px = recipe.image_grid_px
    pixel = recipe.structure.cell.extent_A / grid_px
    ideal = np.clip(fourier_resample(intensity, grid_px), 0, None)
    expected = cond["dose_e_per_A2"] * pixel * pixel
    rng = streams.rng("imaging.noise")
    counts = rng.poisson(ideal * expected).astype(np.float32) if expected > 0 else ideal.astype(np.float32)
    if im.median_filter_px > 1:
        counts = ndimage.median_filter(counts, size=im.median_filter_px, mode="wrap")
    size = recipe.field_of_view_px
    r0, c0 = crop
    counts = np.ascontiguousarray(counts[r0:r0 + size, c0:c0 + size], np.float32)
    meta = {
        "pixel_size_A": pixel,
        "expected_counts_per_px": expected,
        "median_filter_px": im.median_filter_px,
        "crop_origin_px": [r0, c0],
        "shape": list(counts.shape),
        "mean_counts": float(counts.mean()),
    }
    return counts, meta
