"""Stage 4, mask: where the particle is, from the phase of its own exit wave.

Per phonon configuration a pixel is "particle" where the magnitude of the (wrapped) exit-wave phase exceeds the
threshold: a thick particle's phase wraps past pi, and a signed test would drop the wrapped half. Pixels are voted over
configurations, the vote map is smoothed with a Gaussian (sigma in Å), sampled on the image grid (same grid convention
as the image: sample [i, j] at x = j * pixel, y = i * pixel) and thresholded, then cropped with the image's window.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .recipe import Recipe


def particle_mask(particle_waves: np.ndarray | None, sampling_A: float, recipe: Recipe,
                  crop: tuple[int, int]) -> tuple[np.ndarray, dict]:
    m = recipe.mask
    size = recipe.field_of_view_px
    grid_px = recipe.image_grid_px
    if particle_waves is None:
        mask = np.zeros((size, size), np.uint8)
    else:
        above = np.abs(np.angle(particle_waves)) > m.phase_threshold_rad
        vote = (above.mean(axis=0) >= m.vote_fraction).astype(np.float64)
        smooth = ndimage.gaussian_filter(vote, m.smoothing_sigma_A / sampling_A, mode="wrap") \
            if m.smoothing_sigma_A > 0 else vote
        n = smooth.shape[-1]
        step = n / grid_px  # potential-grid samples per image pixel
        r0, c0 = crop
        rows = (np.arange(r0, r0 + size) * step)[:, None]
        cols = (np.arange(c0, c0 + size) * step)[None, :]
        coords = np.stack(np.broadcast_arrays(rows, cols))
        on_image = ndimage.map_coordinates(smooth, coords, order=1, mode="grid-wrap")
        mask = (on_image > m.smoothed_threshold).astype(np.uint8)
    meta = {
        "method": "exit_wave_phase",
        "phase_threshold_rad": m.phase_threshold_rad,
        "vote_fraction": m.vote_fraction,
        "smoothing_sigma_A": m.smoothing_sigma_A,
        "smoothed_threshold": m.smoothed_threshold,
        "n_pixels": int(mask.sum()),
        "area_fraction": float(mask.mean()),
    }
    return mask, meta
