"""The Prismatic backend. Without Prismatic: its file formats, parameters, output reading, and the backend's plumbing
driven by a stand-in ``pyprismatic`` that writes HDF5 files in Prismatic's layout. With Prismatic (``make prismatic``;
skipped with the reason otherwise): its exit waves, masks, geometry and datasets against the abTEM backend's."""

import math
import os
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import unavailable
from datagen.simulate import prismatic as pr
from datagen.pipeline import SampleFactory, generate
from datagen.recipe import Simulation
from datagen.simulate import electron_wavelength_A, get_backend
from datagen.structures import Scene
from hrtem_core.dataset import iter_dataset, verify_dataset
from test_physics import ZONE_REFLECTIONS, make_recipe, strongest_spot, windowed_power_spectrum

COMPLEX = np.dtype([("r", "<f4"), ("i", "<f4")])  # fileIO.cpp: compound {r, i} of float32, h5py's complex names


def _write_prismatic_output(path, wave_xy, group="HRTEM_fp0000", dataset="data"):
    """An HDF5 file laid out as Prismatic's HRTEM output: realslices/<group>/<dataset>, (x, y, tilt), dim1 = R_x."""
    nx, ny = wave_xy.shape[:2]
    data = np.zeros(wave_xy.shape if wave_xy.ndim == 3 else (nx, ny, 1), COMPLEX)
    data["r"], data["i"] = (wave_xy.real, wave_xy.imag) if wave_xy.ndim == 3 else (wave_xy.real[..., None],
                                                                                 wave_xy.imag[..., None])
    with h5py.File(path, "w") as f:
        g = f.create_group(f"4DSTEM_simulation/data/realslices/{group}")
        g.create_dataset(dataset, data=data)
        g.create_dataset("dim1", data=np.arange(nx, dtype="f4"))
        g.create_dataset("dim2", data=np.arange(ny, dtype="f4"))


def _parse_xyz(path):
    lines = Path(path).read_text().splitlines()
    cell = [float(v) for v in lines[1].split()]
    rows = np.array([[float(v) for v in line.split()] for line in lines[2:-1]])
    return lines[0], cell, rows, lines[-1]


def test_write_xyz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    cell = (20.0, 18.0, 12.0)
    pos = rng.uniform(0, 1, (7, 3)) * cell
    numbers = rng.integers(1, 80, 7)
    pr.write_xyz(tmp_path / "a.xyz", pos, numbers, cell, comment="two\nlines")
    comment, cell_read, rows, last = _parse_xyz(tmp_path / "a.xyz")
    assert comment == "two lines" and last == "-1" and cell_read == list(cell)
    np.testing.assert_array_equal(rows[:, 0], numbers)
    np.testing.assert_allclose(rows[:, 1:3], pos[:, :2], atol=1e-8)
    np.testing.assert_allclose(cell[2] - rows[:, 3], pos[:, 2], atol=1e-8)  # beam enters Prismatic at the top
    assert (rows[:, 4] == 1).all() and (rows[:, 5] == 0).all()  # occupancy 1, thermal sigma 0
    with pytest.raises(ValueError, match="1..103"):
        pr.write_xyz(tmp_path / "b.xyz", pos[:1], [104], cell)
    with pytest.raises(ValueError, match="at least one atom"):
        pr.write_xyz(tmp_path / "c.xyz", np.zeros((0, 3)), [], cell)


def test_parameters():
    sim = Simulation(energy_eV=300e3, sampling_A=0.1, slice_thickness_A=1.5, parametrization="kirkland")
    p = pr.prismatic_parameters(sim, (64.0, 64.0, 30.0), 640, "in.xyz", "out.h5", device="gpu", threads=4)
    expected = {"filenameAtoms": "in.xyz", "filenameOutput": "out.h5", "algorithm": "hrtem", "E0": 300.0,
                "realspacePixelSizeX": 0.05, "realspacePixelSizeY": 0.05, "interpolationFactorX": 1,
                "cellDimX": 64.0, "cellDimZ": 30.0, "tileX": 1, "tileZ": 1, "sliceThickness": 1.5,
                "potBound": pr.POT_BOUND_A, "potential3D": False, "numFP": 1, "includeThermalEffects": False,
                "saveComplexOutputWave": True, "maxXtilt": 0.0, "maxYtilt": 0.0, "probeDefocus": 0.0, "C3": 0.0,
                "numGPUs": 1, "numThreads": 4}
    assert {k: p[k] for k in expected} == pytest.approx(expected)
    assert next(iter(p)) == "filenameAtoms"
    assert pr.prismatic_parameters(sim, (64.0, 64.0, 30.0), 640, "a", "b")["numGPUs"] == 0
    # Prismatic's grid (params.h: N = 4 round(L / px / 4), output N / 2) lands on ours, or on gpts + 1 when odd
    for L, gpts in [(64.0, 640), (64.0, 641), (37.3, 373), (50.0, 2), (123.4, 1235)]:
        px = pr.prismatic_parameters(sim, (L, L, 10.0), gpts, "a", "b")["realspacePixelSizeX"]
        out = max(4, 4 * math.floor(L / px / 4 + 0.5)) // 2
        assert out == pr.prismatic_gpts(gpts) == (gpts if gpts % 2 == 0 else gpts + 1)


def test_read_hrtem_output(tmp_path):
    rng = np.random.default_rng(1)
    wave_xy = (rng.normal(size=(6, 4)) + 1j * rng.normal(size=(6, 4))).astype(np.complex64)  # 6 x, 4 y
    _write_prismatic_output(tmp_path / "new.h5", wave_xy)
    out = pr.read_hrtem_output(tmp_path / "new.h5", (4, 6))
    assert out.dtype == np.complex64 and out.shape == (4, 6)
    np.testing.assert_array_equal(out, wave_xy.T)  # [row=y, col=x]
    _write_prismatic_output(tmp_path / "old.h5", wave_xy, group="HRTEM", dataset="realslice")  # earlier 2.0 layout
    np.testing.assert_array_equal(pr.read_hrtem_output(tmp_path / "old.h5", (4, 6)), wave_xy.T)
    with pytest.raises(ValueError, match=r"6 x 4 \(x, y\) points; expected 4 x 6"):
        pr.read_hrtem_output(tmp_path / "new.h5", (6, 4))
    with pytest.raises(ValueError, match="expected"):
        pr.read_hrtem_output(tmp_path / "new.h5", 6)
    _write_prismatic_output(tmp_path / "tilts.h5", np.ones((6, 4, 3), np.complex64))
    with pytest.raises(ValueError, match=r"\(6, 4, 3\).*one untilted plane wave"):
        pr.read_hrtem_output(tmp_path / "tilts.h5", (4, 6))
    with h5py.File(tmp_path / "intensity.h5", "w") as f:
        f["4DSTEM_simulation/data/realslices/HRTEM/data"] = np.ones((6, 4, 1), "f4")
    with pytest.raises(ValueError, match="not the complex wave"):
        pr.read_hrtem_output(tmp_path / "intensity.h5", (4, 6))
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("4DSTEM_simulation/data/realslices")
    with pytest.raises(ValueError, match="no HRTEM output"):
        pr.read_hrtem_output(tmp_path / "empty.h5", (4, 6))


def _band_limited_wave(n, L):
    """A wave [row=y, col=x] with few Fourier components, so any grid samples it exactly."""
    y, x = np.meshgrid(np.arange(n) * L / n, np.arange(n) * L / n, indexing="ij")
    return 1 + 0.2 * np.exp(2j * np.pi * 2 * x / L) + 0.1j * np.exp(-2j * np.pi * 3 * y / L)


def _back_propagate(wave, L, distance, energy_eV):
    """What Prismatic's propBack does to the exit wave: exp(+i pi lambda d q^2)."""
    q = np.fft.fftfreq(wave.shape[0], L / wave.shape[0])
    q2 = q[:, None] ** 2 + q[None, :] ** 2
    return np.fft.ifft2(np.fft.fft2(wave) * np.exp(1j * np.pi * electron_wavelength_A(energy_eV) * distance * q2))


@pytest.mark.parametrize("gpts", [16, 15])
def test_to_exit_plane_undoes_mid_plane_reference_and_resamples(gpts):
    L, Lz, energy = 12.0, 40.0, 200e3
    n = pr.prismatic_gpts(gpts)
    saved = _back_propagate(_band_limited_wave(n, L), L, Lz / 2, energy)
    assert not np.allclose(saved, _band_limited_wave(n, L), atol=1e-3)  # the reference plane matters
    out = pr.to_exit_plane(saved, (L, L), Lz / 2, energy, (gpts, gpts))
    assert out.dtype == np.complex64 and out.shape == (gpts, gpts)
    np.testing.assert_allclose(out, _band_limited_wave(gpts, L), atol=1e-5)


def test_get_backend_without_pyprismatic(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyprismatic", None)  # absent, whatever is installed
    with pytest.raises(RuntimeError, match=r"simulation.backend=prismatic needs Prismatic 2.x with HRTEM mode "
                                           r"\(pyprismatic from conda-forge or built from source\); "
                                           r"pyprismatic is not installed"):
        get_backend("prismatic")


def _fake_pyprismatic(fields, go=None):
    module = types.ModuleType("pyprismatic")

    class Metadata:
        def __init__(self):
            for k in fields:
                setattr(self, k, None)

        def go(self):
            go(self)

    module.Metadata = Metadata
    return module


def test_old_pyprismatic_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyprismatic", _fake_pyprismatic(["E0", "algorithm", "numFP"]))
    with pytest.raises(RuntimeError, match=r"HRTEM mode .*; the installed pyprismatic .* lacks it"):
        get_backend("prismatic")


def test_exit_waves_through_a_stand_in_pyprismatic(monkeypatch, tmp_path):
    """A stand-in go() behaves as Prismatic's HRTEM mode: (x, y) output at twice the potential pixel, referred to the
    cell mid-plane. The backend must give our exit waves back, one run per phonon configuration, on our grid."""
    L, Lz, energy = 12.0, 30.0, 300e3
    runs = []

    def go(meta):
        Path("scratch_param.txt").write_text("written into the working directory, as pyprismatic does")
        runs.append({"xyz": Path(meta.filenameAtoms).read_text(), "cwd": Path.cwd(), "E0": meta.E0,
                     "algorithm": meta.algorithm, "home": os.environ.get("HOME")})
        n = max(4, 4 * math.floor(meta.cellDimX / meta.realspacePixelSizeX / 4 + 0.5)) // 2
        wave = _back_propagate(_band_limited_wave(n, L), L, Lz / 2, energy)
        _write_prismatic_output(meta.filenameOutput, wave.T)  # Prismatic stores (x, y)

    fields = list(pr.prismatic_parameters(Simulation(), (L, L, Lz), 8, "a", "b"))
    monkeypatch.setitem(sys.modules, "pyprismatic", _fake_pyprismatic(fields, go))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HOME", raising=False)  # Prismatic needs one: the run's own folder stands in
    backend = get_backend("prismatic")
    assert backend.name == "prismatic" and "pyprismatic" in backend.versions()

    scene = Scene((L, L, Lz), np.array([[3.0, 4.0, 10.0], [6.0, 6.0, 12.0]]), np.array([79, 6]),
                  np.array([True, False]))
    sim = Simulation(energy_eV=energy, parametrization="kirkland", n_phonons=2)
    disp = np.random.default_rng(2).normal(0, 0.1, (2, 2, 3))
    for gpts in (16, 15):
        runs.clear()
        waves = backend.exit_waves(scene, disp, sim, gpts, "cpu")
        assert waves.dtype == np.complex64 and waves.shape == (2, gpts, gpts)
        np.testing.assert_allclose(waves, np.broadcast_to(_band_limited_wave(gpts, L), waves.shape), atol=1e-5)
        assert len(runs) == 2 and runs[0]["xyz"] != runs[1]["xyz"]  # each configuration its own displacements
        assert all(r["cwd"] != tmp_path and r["E0"] == 300.0 and r["algorithm"] == "hrtem" for r in runs)
        assert all(r["home"] == str(r["cwd"]) for r in runs)
    assert not (tmp_path / "scratch_param.txt").exists() and "HOME" not in os.environ
    assert backend.exit_waves(Scene((L, L, Lz), np.zeros((0, 3)), np.zeros(0, int), np.zeros(0, bool)),
                              np.zeros((2, 0, 3)), sim, 15, "cpu").shape == (2, 15, 15)
    with pytest.raises(ValueError, match="simulation.parametrization='lobato'.*kirkland"):
        backend.exit_waves(scene, disp, Simulation(parametrization="lobato"), 16, "cpu")


def test_stand_in_run_without_output_fails_clearly(monkeypatch, tmp_path):
    def go(meta):  # pyprismatic's C++ core prints this to file descriptor 1 and returns
        os.write(1, b"Invalid parameters detected. Cancelling calculation, please check inputs.\n")

    fields = list(pr.prismatic_parameters(Simulation(), (10.0, 10.0, 10.0), 8, "a", "b"))
    monkeypatch.setitem(sys.modules, "pyprismatic", _fake_pyprismatic(fields, go))
    scene = Scene((10.0, 10.0, 10.0), np.array([[1.0, 1.0, 5.0]]), np.array([79]), np.array([True]))
    with pytest.raises(RuntimeError, match="(?s)wrote no output file.*Invalid parameters detected"):
        get_backend("prismatic").exit_waves(scene, np.zeros((1, 1, 3)), Simulation(parametrization="kirkland"),
                                            8, "cpu")


# ------------------------------------------------------------------------------------------ with Prismatic itself
# Built by `make prismatic` (tools/build-prismatic.sh); .ci/run builds it when the source archive is there. Without it
# these tests are skipped, with the reason.

NEEDS_PRISMATIC = "build it with `make prismatic` (tools/build-prismatic.sh) or install Prismatic 2.x from conda-forge"


@pytest.fixture(scope="module")
def real_prismatic():
    """Skips, naming what is missing, unless a pyprismatic with HRTEM mode imports."""
    try:
        pr._load_pyprismatic()
    except RuntimeError as err:
        unavailable("Prismatic", f"{err}: {NEEDS_PRISMATIC}")


def complex_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """|<a - mean a, b - mean b>| / (|a - mean a| |b - mean b|): 1 for waves equal up to a constant phase and scale;
    the means are taken out so the vacuum's unit wave does not dominate."""
    a = a.astype(np.complex128) - a.mean()
    b = b.astype(np.complex128) - b.mean()
    return float(abs(np.vdot(a, b)) / math.sqrt(np.vdot(a, a).real * np.vdot(b, b).real))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def both_backends(sections: dict, seed: int, cache_dir, structure: int = 0):
    """{backend: ([(key, arrays, metadata)], wave record)} of one structure through the real pipeline, the recipe
    otherwise equal (Kirkland potentials for both: Prismatic has no other); ``cache_dir`` shares the substrate."""
    out = {}
    for backend in ("abtem", "prismatic"):
        sim = {**sections.get("simulation", {}), "backend": backend, "parametrization": "kirkland"}
        recipe = make_recipe(**{**sections, "simulation": sim})
        out[backend] = SampleFactory(recipe, seed, "prismatic-test", cache_dir).structure_samples(structure, 1, True)
    return out


def test_exit_waves_and_masks_match_abtem(real_prismatic, tmp_path):
    """An Au particle on carbon, two phonon configurations: same atoms, grid, slicing and displacements in both
    backends; Prismatic's exit waves correlate with abTEM's, and its masks (after the recipe's smoothing) overlap."""
    sections = dict(structure={"particle": {"radius_A": 8.0}, "substrate": {"thickness_A": 8.0},
                               "cell": {"extent_A": 24.0}},
                    simulation={"n_phonons": 2, "slice_thickness_A": 2.0})
    runs = both_backends(sections, seed=1, cache_dir=tmp_path)
    (samples_a, waves_a), (samples_p, waves_p) = runs["abtem"], runs["prismatic"]
    (_, arr_a, meta_a), = samples_a
    (_, arr_p, meta_p), = samples_p
    assert meta_p["simulation"]["backend"] == "prismatic" and meta_a["simulation"]["backend"] == "abtem"
    assert meta_p["structure"] == meta_a["structure"]  # the same structure, drawn from the same seed
    corr = {}
    for key in ("wave.npy", "particle_wave.npy"):
        a, p = waves_a[1][key], waves_p[1][key]
        assert a.shape == p.shape == (2, 240, 240) and p.dtype == np.complex64
        corr[key] = [complex_correlation(x, y) for x, y in zip(a, p)]
    d = dice(arr_a["mask.npy"], arr_p["mask.npy"])
    area = arr_p["mask.npy"].sum() / arr_a["mask.npy"].sum()
    print(f"complex correlation Prismatic vs abTEM per phonon: {corr}; mask Dice {d:.4f}, area ratio {area:.3f}")
    assert min(min(c) for c in corr.values()) >= 0.99
    assert d >= 0.97


def projected_centre_px(particle_waves: np.ndarray, sampling_A: float, recipe, crop_px) -> np.ndarray:
    """[row, col] on the cropped image grid of the particle's projected centre in its exit waves: the centroid of the
    smoothed particle map (phase threshold, vote, smoothing: ``mask.particle_map``), not yet thresholded.

    Not the phase-weighted centroid of the low-passed wave: on this [110] particle that sits 0.35 px (0.07 Å) off the
    atoms' mean in abTEM's and Prismatic's waves alike (dynamical scattering along the columns), the map within 0.2 px.
    """
    from datagen.mask import particle_map

    smooth = particle_map(particle_waves, sampling_A, recipe.mask)
    ii, jj = np.indices(smooth.shape)
    centroid_A = np.array([(ii * smooth).sum(), (jj * smooth).sum()]) / smooth.sum() * sampling_A
    return centroid_A / recipe.structure.cell.extent_A * recipe.image_grid_px - np.asarray(crop_px)


def test_axes_centring_and_lattice_fringes(real_prismatic):
    """An off-centre Au particle on the [110] zone axis, in vacuum: its projected centre in Prismatic's wave lands on
    structure.center_px (an x/y swap or a flip would move it by many pixels), and the noise-free image shows the
    {111}/{200} fringes at their spacings (helpers of tests/test_physics.py, where abTEM passes the same checks)."""
    recipe = make_recipe(
        structure={"particle": {"radius_A": 12.0, "orientation": {"mode": "zone_axis", "zone_axis": [1, 1, 0],
                                                                  "tilt_mrad": 0.0}},
                   "cell": {"extent_A": 40.0}},
        simulation={"backend": "prismatic", "parametrization": "kirkland"},
        imaging={"pixel_size_A": 0.2, "crop_px": None, "defocus_A": 0.0, "aberrations": {}, "dose_e_per_A2": 1e9},
    )
    (records, waves) = SampleFactory(recipe, 11, "prismatic-test", None).structure_samples(0, 1, True)
    (_, arrays, meta), = records
    st, im, sim = meta["structure"], meta["imaging"], meta["simulation"]
    assert sim["backend"] == "prismatic"
    row, col = st["center_px"]
    r0, c0 = im["crop_origin_px"]
    # off the diagonal and off the cell's centre, so a swap or flip of the axes is caught
    assert abs((row + r0) - (col + c0)) > 10 and min(abs(row + r0 - 100), abs(col + c0 - 100)) > 5, "pick another seed"
    centre = projected_centre_px(waves[1]["particle_wave.npy"], sim["sampling_A"], recipe, (r0, c0))
    error = centre - np.array([row, col])
    print(f"center_px {np.round([row, col], 2)}, Prismatic wave's projected centre {np.round(centre, 2)}: "
          f"error {np.round(error, 3)} px")
    assert np.all(np.abs(error) <= 0.5)

    power, k = windowed_power_spectrum(arrays["image.npy"].astype(np.float64), im["pixel_size_A"])
    for family in ("111", "200"):
        d = ZONE_REFLECTIONS[(1, 1, 0)][family]
        k_spot, prominence = strongest_spot(power, k, 0.93 / d, 1.07 / d)
        assert prominence > 50, f"{family}: no clear spot (peak / median = {prominence:.1f})"
        print(f"{family}: d = {1 / k_spot:.4f} Å, expected {d:.4f} Å ({100 * (1 / k_spot / d - 1):+.2f} %)")
        assert 1 / k_spot == pytest.approx(d, rel=0.02)


def _images(root) -> dict:
    """{key: (image as float64, mask)} of a dataset."""
    return {key: (arrays["image.npy"].astype(np.float64), arrays["mask.npy"]) for key, arrays, _ in iter_dataset(root)}


@pytest.mark.slow
def test_tiny_dataset_with_prismatic_matches_abtem(real_prismatic, tmp_path):
    """The backend-agnostic stages run unchanged on Prismatic's waves: a `tiny` dataset generated with it passes
    verify, and its images correlate with the abTEM dataset of the same recipe and seed (dose 0: the image stage then
    keeps the expected intensity, without Poisson noise); a second generation, in two worker processes at once,
    reproduces it to a tolerance, not bit for bit (module docstring of datagen/simulate/prismatic.py)."""
    from datagen.recipe import load_recipe

    # a shard per structure, so that the second Prismatic generation runs in two worker processes at once
    common = ["simulation.parametrization=kirkland", "imaging.dose_e_per_A2=0", "output.structures_per_shard=1"]
    datasets = {}
    for name, backend, workers in (("abtem", "abtem", 1), ("prismatic", "prismatic", 1),
                                   ("prismatic-again", "prismatic", 2)):
        recipe = load_recipe("tiny", [*common, f"simulation.backend={backend}"])
        manifest = generate(recipe, 4, 5, tmp_path / name, workers=workers, progress=False, dataset="tiny-seed5")
        assert verify_dataset(tmp_path / name)["content_hash"] == manifest["content_hash"]
        datasets[name] = _images(tmp_path / name)
    abtem, prism, again = datasets["abtem"], datasets["prismatic"], datasets["prismatic-again"]
    assert sorted(abtem) == sorted(prism) == sorted(again) and len(abtem) == 4
    corr = [float(np.corrcoef(abtem[k][0].ravel(), prism[k][0].ravel())[0, 1]) for k in abtem]
    dices = [dice(abtem[k][1], prism[k][1]) for k in abtem]
    rerun = max(float(np.abs(prism[k][0] - again[k][0]).max() / prism[k][0].max()) for k in prism)
    rerun_dice = min(dice(prism[k][1], again[k][1]) for k in prism)
    print(f"tiny, Prismatic vs abTEM: image correlation {np.round(corr, 4)}, mask Dice {np.round(dices, 4)}; "
          f"Prismatic twice: max |image difference| / max image {rerun:.2e}, min mask Dice {rerun_dice:.4f}")
    assert min(corr) >= 0.99
    assert min(dices) >= 0.97
    assert rerun <= 1e-5 and rerun_dice >= 0.999


def test_threads_take_turns_and_home_may_be_unset(real_prismatic, monkeypatch, tmp_path):
    """Runs from two threads of one process at once, with HOME unset: each gets its own folder (Prismatic writes
    scratch_param.txt into the working directory, and needs HOME), the process's working directory and HOME come back
    as they were, and the waves equal a run on its own to Prismatic's run-to-run tolerance."""
    import threading

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    L, Lz = 12.0, 10.0
    scene = Scene((L, L, Lz), np.array([[3.1, 7.7, 4.0], [8.0, 5.0, 6.0]]), np.array([79, 29]), np.array([True, True]))
    sim = Simulation(parametrization="kirkland")
    disp = np.random.default_rng(3).normal(0, 0.1, (2, 2, 3))
    backend = get_backend("prismatic")
    alone = backend.exit_waves(scene, disp, sim, 120, "cpu")
    results, errors = [None, None], []

    def work(i):
        try:
            results[i] = backend.exit_waves(scene, disp, sim, 120, "cpu")
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert Path.cwd() == tmp_path and "HOME" not in os.environ and not list(tmp_path.iterdir())
    for waves in results:
        assert np.abs(waves - alone).max() < 1e-5
