"""Prismatic backend without Prismatic: its file formats, parameters, output reading, and the backend's plumbing
driven by a stand-in ``pyprismatic`` that writes HDF5 files in Prismatic's layout."""

import math
import os
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest

from datagen.simulate import prismatic as pr
from datagen.recipe import Simulation
from datagen.simulate import electron_wavelength_A, get_backend
from datagen.structures import Scene

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
                     "algorithm": meta.algorithm})
        n = max(4, 4 * math.floor(meta.cellDimX / meta.realspacePixelSizeX / 4 + 0.5)) // 2
        wave = _back_propagate(_band_limited_wave(n, L), L, Lz / 2, energy)
        _write_prismatic_output(meta.filenameOutput, wave.T)  # Prismatic stores (x, y)

    fields = list(pr.prismatic_parameters(Simulation(), (L, L, Lz), 8, "a", "b"))
    monkeypatch.setitem(sys.modules, "pyprismatic", _fake_pyprismatic(fields, go))
    monkeypatch.chdir(tmp_path)
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
    assert not (tmp_path / "scratch_param.txt").exists()
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
