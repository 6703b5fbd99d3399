"""Stage 3, image: objective lens, partial coherence, detector pixel, dose noise, median filter, crop.

The lens is abTEM's :class:`abtem.CTF` (polar aberration coefficients, quasi-coherent temporal envelope, aperture)
applied to the spectra of the exit waves of every phonon configuration; intensities are averaged over phonons,
band-limited and resampled to the detector pixel by Fourier cropping (which keeps the mean), then Poisson noise is
drawn for the dose. Each imaging condition reuses the simulated exit waves and their spectra (:class:`ExitWaveLens`):
a new condition costs one inverse FFT per phonon configuration, not a new multislice.

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


def fourier_resample(image: np.ndarray, shape: int) -> np.ndarray:
    """Band-limited resampling of a real periodic [row, col] image to ``shape x shape`` (keeps the mean)."""
    import scipy.fft

    n = image.shape[-1]
    if shape == n:
        return image.astype(np.float64)
    if shape > n:
        raise ValueError(f"cannot upsample from {n} to {shape} pixels")
    # the centred shape x shape block of the spectrum, by real-to-complex transforms (half the work of complex ones)
    F = scipy.fft.rfft2(np.asarray(image, np.float64), workers=1)
    h = shape // 2
    rows = np.r_[0:shape - h, n - h:n] if shape % 2 == 0 else np.r_[0:h + 1, n - h:n]
    F = F[rows, : h + 1]
    if shape % 2 == 0:  # the Nyquist row/column of the new grid is shared by +/- frequencies
        F[shape - h, :] = 0
        F[:, h] = 0
    return scipy.fft.irfft2(F, s=(shape, shape), workers=1) * (shape * shape) / (n * n)


# Paeth's 19-comparison network for the median of 9 (Graphics Gems; "opt_med9"): pairs to order, in turn
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
            (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def median3_wrap(image: np.ndarray) -> np.ndarray:
    """3 x 3 median filter with periodic edges: ``scipy.ndimage.median_filter(image, 3, mode="wrap")``, exactly (a
    median selects one of the values; no arithmetic), by a comparison network on whole arrays, ~4x faster."""
    padded = np.pad(image, 1, mode="wrap")
    h, w = image.shape
    p = [padded[i:i + h, j:j + w] for i in range(3) for j in range(3)]
    for a, b in _MEDIAN9:
        p[a], p[b] = np.minimum(p[a], p[b]), np.maximum(p[a], p[b])
    return np.ascontiguousarray(p[4])


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


# abTEM 1.0.11's polar aberration series (Aberrations._evaluate_from_angular_grid), in its order: the power n of
# alpha (with its factor 1/n), the coefficient without angular dependence, and (C, phi_C, m) for each term
# C * cos(m * (phi - phi_C))
_POLAR_GROUPS = (
    (2, "C10", (("C12", "phi12", 2),)),
    (3, None, (("C21", "phi21", 1), ("C23", "phi23", 3))),
    (4, "C30", (("C32", "phi32", 2), ("C34", "phi34", 4))),
    (5, None, (("C41", "phi41", 1), ("C43", "phi43", 3), ("C45", "phi45", 5))),
    (6, "C50", (("C52", "phi52", 2), ("C54", "phi54", 4), ("C56", "phi56", 6))),
)
# each group's symbols, as abTEM checks them (Aberrations._nonzero_coefficients) to decide whether to evaluate it
_GROUP_SYMBOLS = tuple(((scalar,) if scalar else ()) + tuple(s for c, p, _ in terms for s in (c, p))
                       for _, scalar, terms in _POLAR_GROUPS)


class ExitWaveLens:
    """The exit waves of one structure, ready for many imaging conditions: make one per structure and ask it for the
    intensity of each condition.

    The waves' spectra are computed once, here; each condition then costs abTEM's CTF kernel (aberrations, temporal
    envelope, aperture, evaluated by :class:`abtem.CTF` on abTEM's (x, y) grid), one product and one inverse FFT per
    phonon configuration. FFTs by scipy.fft (pocketfft): deterministic."""

    def __init__(self, waves: np.ndarray, sampling_A: float, energy_eV: float):
        import scipy.fft

        self.waves = waves
        self.sampling_A = sampling_A
        self.energy_eV = energy_eV
        self.spectra = scipy.fft.fft2(np.asarray(waves, np.complex64), axes=(-2, -1), workers=1)
        self._like = None  # an abtem.Waves on our grid, for each condition's CTF to match
        self._grid = None  # abTEM's polar grid of scattering angles (alpha, phi) on it
        self._alpha_powers: dict[int, np.ndarray] = {}  # (1/n) * alpha**n on self._grid

    def kernel(self, cond: dict) -> np.ndarray:
        """abTEM's CTF array for ``cond`` in our [row, col] layout (abTEM evaluates it on (x, y)).

        What ``CTF._evaluate_kernel`` does, with the polar grid of scattering angles computed once per lens, and the
        aberration phase by :meth:`_aberration_phase` (bit for bit abTEM's; tests/test_image.py checks it)."""
        import abtem

        ctf = abtem.CTF(**ctf_kwargs(cond, self.energy_eV))
        if self._like is None:
            n = self.waves.shape[-1]
            self._like = abtem.Waves(np.zeros((n, n), np.complex64), energy=self.energy_eV, sampling=self.sampling_A)
        ctf.grid.match(self._like)  # every condition's: abTEM's aperture is soft (antialiased) only on a known grid
        if self._grid is None:
            self._grid = ctf._angular_grid("cpu")
        alpha, phi = self._grid
        array = self._aberration_phase(ctf._aberrations, alpha, phi)
        if array is None or ctf._spatial_envelope.angular_spread != 0.0 or ctf._wiener_snr != 0.0 \
                or ctf._flip_phase:
            kernel = ctf._evaluate_from_angular_grid(alpha, phi)
        else:  # the rest of CTF._evaluate_from_angular_grid for scalar parameters
            kernel = array
            if ctf._temporal_envelope.focal_spread != 0.0:
                kernel = kernel * ctf._temporal_envelope._evaluate_from_angular_grid(alpha, phi)
            if ctf._aperture.semiangle_cutoff != np.inf:
                kernel = kernel * ctf._aperture._evaluate_from_angular_grid(alpha, phi)
        return np.ascontiguousarray(np.asarray(kernel, np.complex64).T)

    def _aberration_phase(self, aberrations, alpha: np.ndarray, phi: np.ndarray) -> np.ndarray | None:
        """``aberrations._evaluate_from_angular_grid(alpha, phi)`` with the same arithmetic in the same order, minus
        the work whose result is known: ``(1/n) * alpha**n`` is computed once per lens, and a term ``C * cos(m *
        (phi - phi_C))`` whose coefficient ``C`` is zero is left out (abTEM adds its +-0, which leaves every sum
        unchanged: the sums start from an array of +0). Only for coefficients that are Python numbers (numpy
        scalars would change the dtype of abTEM's arithmetic); otherwise None, and the caller asks abTEM."""
        from abtem.core.complex import complex_exponential

        coef = aberrations._aberration_coefficients
        if not all(type(v) in (float, int) for v in coef.values()):
            return None
        if not aberrations._has_aberrations:
            return np.ones(alpha.shape, dtype=np.complex64)
        powers = self._alpha_powers
        array = np.zeros(alpha.shape, dtype=np.float32)
        for (n, scalar, terms), symbols in zip(_POLAR_GROUPS, _GROUP_SYMBOLS):
            if not aberrations._nonzero_coefficients(symbols):
                continue
            total = coef[scalar] if scalar else None
            for c, p, m in terms:
                if coef[c] == 0.0:
                    continue
                angle = phi - coef[p] if m == 1 else m * (phi - coef[p])
                term = coef[c] * np.cos(angle)
                total = term if total is None else total + term
            if total is None:  # every coefficient of the group is zero (a phase alone is set): abTEM adds +-0
                continue
            if n not in powers:
                powers[n] = 1 / n * alpha**n
            array = array + powers[n] * total
        array *= np.array(2 * np.pi / aberrations.wavelength, dtype=np.float32)
        return complex_exponential(-array)

    def intensity(self, cond: dict) -> np.ndarray:
        """Phonon-averaged image intensity [row, col] on the potential grid, relative to the incident beam (vacuum
        = 1)."""
        import scipy.fft

        from abtem.core.complex import abs2

        waves = scipy.fft.ifft2(self.spectra * self.kernel(cond), axes=(-2, -1), workers=1, overwrite_x=True)
        intensity = abs2(waves).reshape(-1, *waves.shape[-2:])
        return intensity.sum(axis=0, dtype=np.float64) / intensity.shape[0]


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
    if im.median_filter_px == 3:
        counts = median3_wrap(counts)
    elif im.median_filter_px > 1:
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
