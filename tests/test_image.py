"""The imaging stage's lens kernel is abTEM's CTF, bit for bit: ExitWaveLens evaluates the aberration phase with
abTEM's arithmetic but caches the powers of alpha and leaves out terms whose coefficient is zero; these tests compare
it with ``abtem.CTF`` itself for many conditions, including the edge cases of that shortcut."""

from __future__ import annotations

import numpy as np
import pytest

from datagen.image import _GROUP_SYMBOLS, ExitWaveLens, ctf_kwargs

ENERGY = 300e3
SYMBOLS = [s for group in _GROUP_SYMBOLS for s in group]


def abtem_kernel(cond: dict, n: int, sampling: float) -> np.ndarray:
    import abtem

    ctf = abtem.CTF(**ctf_kwargs(cond, ENERGY))
    waves = abtem.Waves(np.zeros((n, n), np.complex64), energy=ENERGY, sampling=sampling)
    return np.asarray(ctf._evaluate_kernel(waves), np.complex64).T  # abTEM's (x, y) to our [row, col]


def random_condition(rng: np.random.Generator) -> dict:
    """Some coefficients zero, some not, phases set with zero magnitudes, -0.0 defocus, aperture on or off."""
    ab = {}
    for s in SYMBOLS:
        if s == "C10":
            continue
        u = rng.uniform()
        if s.startswith("phi"):
            ab[f"{s}_rad"] = 0.0 if u < 0.4 else float(rng.uniform(0, 2 * np.pi))
        else:
            scale = {"C1": 50.0, "C2": 500.0, "C3": 2e4, "C4": 1e5, "C5": 1e7}[s[:2]]
            ab[f"{s}_A"] = 0.0 if u < 0.5 else float(rng.normal(0, scale))
    defocus = [0.0, -0.0, float(rng.uniform(-500, 500))][rng.integers(3)]
    return {"defocus_A": defocus, "focal_spread_A": [0.0, float(rng.uniform(0, 40))][rng.integers(2)],
            "semiangle_cutoff_mrad": [1e9, float(rng.uniform(5, 40))][rng.integers(2)], "dose_e_per_A2": 100.0,
            "aberrations": ab}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("n, sampling", [(64, 0.1), (96, 0.05)])
def test_lens_kernel_is_abtems_ctf_bit_for_bit(n, sampling):
    rng = np.random.default_rng(7)
    lens = ExitWaveLens(np.zeros((2, n, n), np.complex64), sampling, ENERGY)
    conditions = [random_condition(rng) for _ in range(150)]
    # and the edge cases one by one: nothing at all, one group only, a phase without its magnitude
    conditions += [{"defocus_A": 0.0, "focal_spread_A": 0.0, "semiangle_cutoff_mrad": 1e9, "aberrations": {}},
                   {"defocus_A": 120.0, "focal_spread_A": 0.0, "semiangle_cutoff_mrad": 1e9, "aberrations": {}},
                   {"defocus_A": 0.0, "focal_spread_A": 0.0, "semiangle_cutoff_mrad": 1e9,
                    "aberrations": {"phi12_rad": 1.0, "phi23_rad": 0.3}},
                   {"defocus_A": -50.0, "focal_spread_A": 20.0, "semiangle_cutoff_mrad": 1e9,
                    "aberrations": {"C30_A": -19130.0, "C50_A": 1.048e7, "C12_A": 8.0, "phi12_rad": 0.7,
                                    "C23_A": 300.0, "phi23_rad": 1.1, "C21_A": 200.0, "phi21_rad": 4.0}}]
    for i, cond in enumerate(conditions):
        ours = lens.kernel(cond)
        assert same_bits(ours, abtem_kernel(cond, n, sampling)), f"condition {i}: {cond}"


def test_the_shortcut_is_taken_for_recipe_conditions_and_numpy_scalars_go_to_abtem():
    """Conditions drawn from a recipe hold Python floats (the shortcut applies); numpy scalars would change abTEM's
    dtypes (float32 arrays with float64 scalars give float64), so they are evaluated by abTEM itself, and equal."""
    import abtem

    from datagen.image import draw_condition
    from datagen.recipe import load_recipe
    from datagen.seeding import Streams

    lens = ExitWaveLens(np.zeros((1, 64, 64), np.complex64), 0.1, ENERGY)
    lens.kernel({"defocus_A": 1.0, "focal_spread_A": 0.0, "semiangle_cutoff_mrad": 1e9, "aberrations": {}})
    alpha, phi = lens._grid
    r = load_recipe("au-small")
    for variant in range(5):
        cond = draw_condition(r.imaging, Streams(3, 10**6, variant))
        ab = abtem.CTF(**ctf_kwargs(cond, ENERGY))._aberrations
        assert lens._aberration_phase(ab, alpha, phi) is not None
        assert same_bits(lens.kernel(cond), abtem_kernel(cond, 64, 0.1))
    as_numpy = {**cond, "defocus_A": np.float64(cond["defocus_A"]),
                "aberrations": {k: np.float64(v) for k, v in cond["aberrations"].items()}}
    ab = abtem.CTF(**ctf_kwargs(as_numpy, ENERGY))._aberrations
    assert lens._aberration_phase(ab, alpha, phi) is None
    assert same_bits(lens.kernel(as_numpy), abtem_kernel(as_numpy, 64, 0.1))
