"""Data generation: (a) per-sample time and accuracy against plain abTEM, and the Prismatic backend against the abTEM
backend, (b) an extra imaging condition against an exit-wave simulation, (c) time per multislice slice against the FFT
floor.

The baseline of (a) is the same pipeline with ``simulation.engine: plain``: abTEM's ``Potential`` +
``PlaneWave.multislice`` on the full scene and on the particle-only scene, from scratch, on the same grid, slicing,
phonon configurations and atoms. Both pipelines share the substrate blocks (czone), whose one-time cost is reported
on its own row, as is the one-time cost of the fast engine's substrate exit-wave bank.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from statistics import median

import numpy as np

from .table import Row, at_least, at_most, best_of, timed

SEED = 1


def _recipe(name: str, overrides: list[str], engine: str):
    from datagen.recipe import load_recipe

    return load_recipe(name, [*overrides, f"simulation.engine={engine}", "simulation.device=cpu"])


def _warm_up(factory) -> None:
    """Pay one-time costs (imports, numba, FFT plans, scattering factors) on a one-atom scene of the same grid."""
    from datagen import image as image_stage
    from datagen.seeding import Streams
    from datagen.simulate import simulate
    from datagen.structures import Scene

    r = factory.recipe
    L, dz = r.structure.cell.extent_A, r.simulation.slice_thickness_A
    scene = Scene((L, L, 2 * dz), np.array([[L / 2, L / 2, dz / 2]]), np.array([79]), np.array([True]))
    waves = simulate(scene, r.simulation, Streams(SEED, 10**6), factory.backend)
    cond = image_stage.draw_condition(r.imaging, Streams(SEED, 10**6, 0))
    image_stage.ExitWaveLens(waves.full, waves.sampling_A, r.simulation.energy_eV).intensity(cond)


def _settings(recipe, n_structures: int, n_slices: list[int]) -> str:
    sim, im = recipe.simulation, recipe.imaging
    from datagen.structures import grid_points

    n = grid_points(recipe.structure.cell.extent_A, sim.sampling_A)
    slices = f"{min(n_slices)}-{max(n_slices)}" if n_slices and min(n_slices) != max(n_slices) else \
        str(n_slices[0] if n_slices else "?")
    return (f"{recipe.name}: {n}² grid, {slices} slices of {sim.slice_thickness_A:g} Å, {sim.n_phonons} phonons, "
            f"{im.n_conditions} conditions/structure, {n_structures} structure(s), "
            f"bank {recipe.structure.substrate.bank_size}")


def noise_free_image(lens, meta: dict, recipe) -> np.ndarray:
    """The detector image of a sample before noise and median filter: its condition through ``lens``, resampled to
    the detector pixel and cropped like the sample."""
    from datagen.image import fourier_resample

    cond = {k: meta["imaging"][k] for k in ("defocus_A", "focal_spread_A", "semiangle_cutoff_mrad", "aberrations")}
    image = np.clip(fourier_resample(lens.intensity(cond), recipe.image_grid_px), 0, None)
    (r0, c0), size = meta["imaging"]["crop_origin_px"], recipe.field_of_view_px
    return image[r0:r0 + size, c0:c0 + size]


def generation_rows(name: str, overrides: list[str], n_structures: int, workdir: Path) -> tuple[list[Row], dict]:
    """(a) for one recipe: time per sample, fast vs plain, and the accuracy of fast against plain."""
    from datagen.image import ExitWaveLens
    from datagen.pipeline import SampleFactory, prepare_substrate

    fast_r, plain_r = _recipe(name, overrides, "fast"), _recipe(name, overrides, "plain")
    cache = workdir / f"bank-{name}"
    t_blocks, _ = timed(prepare_substrate, plain_r, SEED, cache)  # czone blocks: needed by both engines
    t_waves, _ = timed(prepare_substrate, fast_r, SEED, cache)  # the fast engine's exit-wave bank
    fast = SampleFactory(fast_r, SEED, "bench", cache)
    plain = SampleFactory(plain_r, SEED, "bench", cache)
    _warm_up(fast)
    _warm_up(plain)
    n_var = fast_r.imaging.n_conditions
    times = {"fast": [], "plain": []}
    stage = {"fast": [], "plain": []}
    corr, image_err, wave_err, masks_same, mask_px, n_slices = [], [], [], 0, [], []
    for s in range(n_structures):
        out = {}
        order = ("fast", "plain") if s % 2 == 0 else ("plain", "fast")
        for engine in order:
            factory = fast if engine == "fast" else plain
            seconds, out[engine] = timed(factory.structure_samples, s, n_var, True)
            times[engine].append(seconds / n_var)
            stage[engine].append(out[engine][0][0][2]["provenance"]["timing_s"]["simulate"] * n_var)
        (rf, wf), (rp, wp) = out["fast"], out["plain"]
        n_slices.append(rf[0][2]["simulation"]["n_slices"])
        lenses = [ExitWaveLens(w[1]["wave.npy"], w[2]["simulation"]["sampling_A"], fast_r.simulation.energy_eV)
                  for w in (wf, wp)]
        for (_, af, mf), (_, ap, mp) in zip(rf, rp):
            # noise-free images: the detected ones differ in their Poisson draws, whose random stream depends on
            # the exact expected counts (numpy's sampler takes a count-dependent number of uniforms)
            ideal = [noise_free_image(lens, m, fast_r) for lens, m in zip(lenses, (mf, mp))]
            corr.append(float(np.corrcoef(ideal[0].ravel(), ideal[1].ravel())[0, 1]))
            image_err.append(float(np.abs(ideal[0] - ideal[1]).max() / np.abs(ideal[1]).max()))
            same = np.array_equal(af["mask.npy"], ap["mask.npy"])
            masks_same += same
            mask_px.append(float((af["mask.npy"] == ap["mask.npy"]).mean()))
        for key in ("wave.npy", "particle_wave.npy"):
            if key in wp[1]:
                a, b = wf[1][key], wp[1][key]
                wave_err.append(float(np.abs(a - b).max() / np.abs(b).max()))
    settings = _settings(fast_r, n_structures, n_slices)
    t_fast, t_plain = median(times["fast"]), median(times["plain"])
    n_samples = n_structures * n_var
    sim_share = median(stage["fast"]) / (t_fast * n_var)
    rows = [
        Row("a", f"{name}: time per sample (s); ratio = plain / ours", settings, t_fast, t_plain, t_plain / t_fast,
            ">= 5", at_least(t_plain / t_fast, 5.0), "s",
            notes={"profile": {"simulate stage, share of our time per sample": sim_share,
                               "simulate stage per structure, ours / plain": median(stage["fast"])
                               / median(stage["plain"]),
                               "bound": "the simulate stage is FFT-bound: see (c), our slices' FFTs vs the floor"}}),
        Row("a", f"{name}: simulate stage per structure (s), both scenes", settings, median(stage["fast"]),
            median(stage["plain"]), median(stage["plain"]) / median(stage["fast"]), "", None, "s"),
        Row("a", f"{name}: image correlation ours vs plain (noise-free, min of {n_samples})", settings, min(corr),
            None, min(corr), ">= 0.999", at_least(min(corr), 0.999)),
        Row("a", f"{name}: images (noise-free), max abs(ours - plain) / max abs(plain)", settings, max(image_err), None,
            max(image_err), "<= 1e-4", at_most(max(image_err), 1e-4)),
        Row("a", f"{name}: exit waves, max abs(ours - plain) / max abs(plain)", settings, max(wave_err), None,
            max(wave_err), "<= 1e-4", at_most(max(wave_err), 1e-4)),
        Row("a", f"{name}: identical masks (samples); pixels agreeing", settings,
            f"{masks_same}/{n_samples}", f"{100 * min(mask_px):.4f} %", masks_same / n_samples, "all (1.0)",
            masks_same == n_samples),
        Row("a", f"{name}: one-time per dataset (s): exit-wave bank (ours) vs czone blocks (both)", settings,
            t_waves, t_blocks, None, "", None, "s",
            notes={"amortised over 1000 structures, s/sample": t_waves / (1000 * n_var)}),
    ]
    return rows, {"factory": fast, "settings": settings}


def prismatic_rows(quick: bool, workdir: Path) -> list[Row]:
    """(a) au-small through the Prismatic backend against the abTEM backend (fast engine), in the same run: time per
    sample and noise-free image correlation. Both with Kirkland potentials (Prismatic has no other), the same
    structures, phonon displacements and imaging conditions. Without Prismatic, one row that says why it is skipped."""
    from datagen.image import ExitWaveLens
    from datagen.pipeline import SampleFactory, prepare_substrate
    from datagen.simulate.prismatic import _load_pyprismatic

    name = "au-small"
    # the substrate settings of the fast-vs-plain au-small rows above, so their czone blocks are reused from the cache;
    # one structure: Prismatic takes ~9 s per configuration and scene here (2 cores)
    overrides = ["simulation.n_phonons=2", "structure.substrate.bank_size=1"] if quick else []
    n_structures = 1
    try:
        _load_pyprismatic()
    except RuntimeError as err:
        return [Row("a", f"{name}: time per sample (s), abTEM backend vs Prismatic: SKIPPED",
                    f"{err}; build it with `make prismatic`", None, None, None, "", None, "s")]
    recipes = {b: _recipe(name, [*overrides, f"simulation.backend={b}", "simulation.parametrization=kirkland"], "fast")
               for b in ("abtem", "prismatic")}
    cache = workdir / f"bank-{name}"  # cache names hash what the data depend on (parametrization included)
    for recipe in recipes.values():
        prepare_substrate(recipe, SEED, cache)
    factories = {b: SampleFactory(r, SEED, "bench", cache) for b, r in recipes.items()}
    for factory in factories.values():
        _warm_up(factory)
    n_var = recipes["abtem"].imaging.n_conditions
    times = {b: [] for b in factories}
    corr, n_slices = [], []
    for s in range(n_structures):
        out = {}
        for b in (("abtem", "prismatic") if s % 2 == 0 else ("prismatic", "abtem")):
            seconds, out[b] = timed(factories[b].structure_samples, s, n_var, True)
            times[b].append(seconds / n_var)
        (ra, wa), (rp, wp) = out["abtem"], out["prismatic"]
        n_slices.append(ra[0][2]["simulation"]["n_slices"])
        energy = recipes["abtem"].simulation.energy_eV
        lenses = [ExitWaveLens(w[1]["wave.npy"], w[2]["simulation"]["sampling_A"], energy) for w in (wa, wp)]
        for (_, _, ma), (_, _, mp) in zip(ra, rp):
            ideal = [noise_free_image(lens, m, recipes["abtem"]) for lens, m in zip(lenses, (ma, mp))]
            corr.append(float(np.corrcoef(ideal[0].ravel(), ideal[1].ravel())[0, 1]))
    settings = _settings(recipes["abtem"], n_structures, n_slices) + ", Kirkland"
    t_abtem, t_prism = median(times["abtem"]), median(times["prismatic"])
    return [
        Row("a", f"{name}: time per sample (s), abTEM backend vs Prismatic; ratio = Prismatic / abTEM", settings,
            t_abtem, t_prism, t_prism / t_abtem, "", None, "s"),
        Row("a", f"{name}: image correlation abTEM vs Prismatic backend (noise-free, min of {len(corr)})", settings,
            min(corr), None, min(corr), ">= 0.99", at_least(min(corr), 0.99)),
    ]


def condition_rows(factory, settings: str, repeat: int) -> list[Row]:
    """(b): one more imaging condition (image + mask of a condition, on waves already simulated) against one
    exit-wave simulation (both scenes, all phonons, fast engine) of the same structure."""
    from datagen.simulate import simulate

    r = factory.recipe
    structure = factory.simulate_structure(0)
    t_sim = min(timed(simulate, structure.scene, r.simulation, structure.streams, factory.backend)[0]
                for _ in range(repeat))
    # the conditions of a structure share its waves' spectra (the lens) and its particle map, computed with it
    per_condition = [timed(factory.image_variant, structure, v)[0] for v in range(r.imaging.n_conditions)]
    extra = median(per_condition)
    return [Row("b", "extra imaging condition (s) vs one exit-wave simulation (s); ratio = ours / baseline",
                settings, extra, t_sim, extra / t_sim, "<= 0.05", at_most(extra / t_sim, 0.05), "s",
                notes={"exit-wave spectra (shared by conditions), s": structure.timing_s["lens"],
                       "particle map (shared by conditions), s": structure.timing_s["mask"]})]


def synthetic_scene(extent_A: float, radius_A: float, carbon_A: float, seed: int = 0):
    """An Au sphere (FCC, a = 4.078 Å, random orientation) under a random carbon film (0.11 atoms/Å³), no bank."""
    from scipy.spatial.transform import Rotation

    from datagen.structures import Scene

    rng = np.random.default_rng(seed)
    a = 4.07825
    m = int(math.ceil(radius_A / a)) + 1
    grid = np.stack(np.meshgrid(*[np.arange(-m, m + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    au = ((grid[:, None, :] + basis[None]) * a).reshape(-1, 3)
    au = au[np.linalg.norm(au, axis=1) < radius_A] @ Rotation.random(random_state=rng).as_matrix().T
    vac = 2.0
    n_c = int(0.11 * extent_A**2 * carbon_A)
    carbon = rng.uniform([0, 0, vac], [extent_A, extent_A, vac + carbon_A], (n_c, 3))
    au = au + [extent_A / 2, extent_A / 2, vac + carbon_A + radius_A]
    positions = np.concatenate([au, carbon])
    numbers = np.concatenate([np.full(len(au), 79), np.full(n_c, 6)])
    flags = np.concatenate([np.ones(len(au), bool), np.zeros(n_c, bool)])
    return Scene((extent_A, extent_A, vac + carbon_A + 2 * radius_A + vac), positions, numbers, flags)


def slice_rows(quick: bool) -> list[Row]:
    """(c): our time per wave per slice against the FFTs on the same grid.

    The scene is what the fast engine computes for an au-small-like structure: a particle on the few substrate
    slices below the bank's checkpoint (the substrate above comes from the bank). Rows: ours against the forward and
    inverse FFT of the wave that any Fourier multislice needs per slice (the floor; the goal); ours against the FFTs
    our slices actually do (band-limiting the transmission function, the potential's real transforms, the
    propagation: how FFT-bound we are); plain abTEM against the same floor, for reference."""
    from datagen.recipe import Simulation
    from datagen.seeding import Streams
    from datagen.simulate.backend import phonon_displacements, slice_thicknesses
    from datagen.simulate.fast import FastEngine
    from datagen.simulate.plain import AbtemBackend

    extent, radius, carbon, n_ph = (32.0, 8.0, 4.0, 2) if quick else (64.0, 10.0, 4.0, 8)
    sim = Simulation(n_phonons=n_ph, device="cpu")
    scene = synthetic_scene(extent, radius, carbon)
    gpts = int(round(extent / sim.sampling_A))
    disp = phonon_displacements(scene, sim, Streams(SEED, 0))
    n_slices = len(slice_thicknesses(scene.cell_A[2], sim.slice_thickness_A))
    engine = FastEngine(sim.energy_eV, sim.parametrization, extent, gpts, "cpu")
    engine.scene_exit_waves(scene, disp, sim)  # warm-up: kernels, propagators, numba
    engine.counts.clear()
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal((n_ph, gpts, gpts)) + 0j).astype(np.complex64)
    packed = wave[: (n_ph + 1) // 2].copy()  # potentials: two configurations per complex transform
    fft_pair = lambda: engine.ifft2(engine.fft2(wave))  # noqa: E731  (in place: no copy in the timing)
    t_ours, t_pair, t_half = [], [], []
    for _ in range(3 if quick else 4):  # interleaved, so both see the same machine load; the minima are kept
        t_ours.append(timed(engine.scene_exit_waves, scene, disp, sim)[0])
        t_pair.append(best_of(fft_pair, 3))
        t_half.append(best_of(lambda: engine.ifft2(engine.fft2(packed)), 3) / 2)
    runs = len(t_ours)
    counts = {k: v // runs for k, v in engine.counts.items()}
    ours = min(t_ours) / counts["wave_slices"]
    pair = min(t_pair)
    # every transform the engine did: propagations (pair), transmissions (pair + the packed potential's inverse),
    # potentials (the packed forward transform per element)
    our_ffts = (counts["propagations"] * pair + counts["transmissions"] * (pair + min(t_half))
                + counts["potentials"] * min(t_half)) / counts["wave_slices"]
    plain = AbtemBackend()
    plain.exit_waves(scene, disp[:1], sim, gpts, "cpu")  # warm-up: FFTW plans
    t_plain = min(timed(plain.exit_waves, scene, disp, sim, gpts, "cpu")[0] for _ in range(2))
    per_plain = t_plain / n_slices
    settings = (f"{gpts}² grid, {n_ph} phonons batched (times per batch), Au r {radius:g} Å on {carbon:g} Å C, "
                f"{n_slices} slices of 2 Å, scipy.fft; ours: both scenes, potential + transmission + propagation")
    profile = {"our FFTs per wave per slice, in floor pairs (the bound at this FFT speed)": our_ffts / pair,
               "share of our time in FFTs": our_ffts / ours,
               "propagations, transmissions, potential spectra per wave-slice":
                   [round(counts[k] / counts["wave_slices"], 3) for k in ("propagations", "transmissions",
                                                                         "potentials")]}
    return [
        Row("c", "time per wave per slice (ms) vs FFT floor: fft2 + ifft2 of the wave", settings, ours * 1e3,
            pair * 1e3, ours / pair, "<= 1.5", at_most(ours / pair, 1.5), "ms",
            notes={"counts": counts, "profile": profile}),
        Row("c", "time per wave per slice (ms) vs the FFTs our slices do (all of them)", settings, ours * 1e3,
            our_ffts * 1e3, ours / our_ffts, "", None, "ms"),
        Row("c", "plain abTEM: time per slice (ms, one scene) vs FFT floor", settings, per_plain * 1e3,
            pair * 1e3, per_plain / pair, "", None, "ms"),
    ]


def run(sections: set[str], quick: bool, workdir: Path | None = None) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="hrtem-bench-") as tmp:
        work = Path(workdir or tmp)
        if sections & {"a", "b"}:
            if quick:
                plans = [("au-small", ["structure.substrate.bank_size=1"], 1),
                         ("au-large", ["simulation.n_phonons=2", "structure.substrate.bank_size=1"], 1)]
            else:
                plans = [("au-small", [], 3), ("au-large", ["structure.substrate.bank_size=2"], 2)]
            small = None
            for name, overrides, n in plans:
                if "a" not in sections and name != "au-small":
                    continue
                generated, context = generation_rows(name, overrides, n if "a" in sections else 1, work)
                if "a" in sections:
                    rows += generated
                if name == "au-small":
                    small = context
            if "a" in sections:
                rows += prismatic_rows(quick, work)
            if "b" in sections and small is not None:
                rows += condition_rows(small["factory"], small["settings"], 1 if quick else 2)
        if "c" in sections:
            rows += slice_rows(quick)
    return rows
