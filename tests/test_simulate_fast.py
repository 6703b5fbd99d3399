"""The fast simulation engine against plain abTEM: same exit waves, images and masks; determinism; exact placement
of substrate blocks on the grid; and a smoke run of the benchmarks.

Every comparison runs both engines on the identical scene (same atoms, same phonon displacements), so the only
differences are rounding: the fast engine uses scipy's FFTs and real-to-complex transforms where abTEM uses FFTW.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from datagen.image import ExitWaveLens, fourier_resample
from datagen.pipeline import SampleFactory
from datagen.recipe import RecipeError, Simulation, recipe_from_dict
from datagen.seeding import Streams
from datagen.simulate import simulate
from datagen.simulate.backend import phonon_displacements, slice_thicknesses
from datagen.simulate.fast import FastEngine, place_on_grid
from datagen.simulate.plain import AbtemBackend
from datagen.structures import build_scene

pytestmark = pytest.mark.filterwarnings("ignore:ensemble_mean=False:UserWarning")

# a tiny Au-on-carbon recipe: 32 Å cell (320² grid), 2 phonons, carbon 8-20 Å so that the bank's checkpoints are used
TINY = {
    "name": "fast-test",
    "structure": {
        "particle": {"kind": "fcc_sphere", "element": "Au", "radius_A": {"dist": "uniform", "low": 8, "high": 10},
                     "defects": {"n": {"dist": "choice", "values": [0, 1]}}, "embed_A": {"dist": "uniform", "low": 0,
                                                                                          "high": 1.5},
                     "margin_A": 1.0},
        "substrate": {"thickness_A": {"dist": "uniform", "low": 8, "high": 20}, "bank_size": 2},
        "cell": {"extent_A": 32.0, "vacuum_A": 2.0},
    },
    "simulation": {"n_phonons": 2, "device": "cpu"},
    "imaging": {"n_conditions": 2, "pixel_size_A": 0.25, "crop_px": 96, "focal_spread_A": 15.0,
                "defocus_A": {"dist": "choice", "values": [-250, 0, 250]}, "aberrations": {"C30_A": -19130.0},
                "dose_e_per_A2": 400.0, "median_filter_px": 3},
}


def recipe(engine: str = "fast", **changes):
    data = copy.deepcopy(TINY)
    data["simulation"]["engine"] = engine
    for section, values in changes.items():
        data[section].update(values)
    return recipe_from_dict(data)


def _noise_free(lens, meta, r):
    cond = {k: meta["imaging"][k] for k in ("defocus_A", "focal_spread_A", "semiangle_cutoff_mrad", "aberrations")}
    image = np.clip(fourier_resample(lens.intensity(cond), r.image_grid_px), 0, None)
    (r0, c0), size = meta["imaging"]["crop_origin_px"], r.field_of_view_px
    return image[r0:r0 + size, c0:c0 + size]


@pytest.fixture(scope="module")
def both_engines():
    fast, plain = recipe("fast"), recipe("plain")
    out = {}
    for name, r in (("fast", fast), ("plain", plain)):
        factory = SampleFactory(r, 4, "fast-test", None)
        out[name] = [factory.structure_samples(s, 2, keep_waves=True) for s in range(3)]
    return fast, out


def test_fast_engine_equals_plain_abtem(both_engines):
    r, out = both_engines
    for (samples_f, waves_f), (samples_p, waves_p) in zip(out["fast"], out["plain"]):
        assert waves_f[2]["simulation"]["engine"] == "fast" and waves_p[2]["simulation"]["engine"] == "plain"
        for key in ("wave.npy", "particle_wave.npy"):
            a, b = waves_f[1][key], waves_p[1][key]
            assert a.dtype == b.dtype == np.complex64 and a.shape == b.shape
            assert np.abs(a - b).max() / np.abs(b).max() < 2e-5, key
        lenses = [ExitWaveLens(w[1]["wave.npy"], 0.1, r.simulation.energy_eV) for w in (waves_f, waves_p)]
        for (_, af, mf), (_, ap, mp) in zip(samples_f, samples_p):
            ideal_f, ideal_p = (_noise_free(lens, m, r) for lens, m in zip(lenses, (mf, mp)))
            assert np.corrcoef(ideal_f.ravel(), ideal_p.ravel())[0, 1] >= 0.999
            assert np.abs(ideal_f - ideal_p).max() / ideal_p.max() < 1e-4
            assert np.array_equal(af["mask.npy"], ap["mask.npy"]) and af["mask.npy"].any()
            strip = lambda m: {k: v for k, v in m.items() if k not in ("provenance", "simulation")}  # noqa: E731
            assert strip(mf) == strip(mp)  # structure, imaging and mask metadata: the same scene and conditions


def test_fast_engine_starts_from_the_bank_and_skips_vacuum():
    """The full scene starts at a bank checkpoint inside the carbon, the particle-only wave at the particle."""
    r = recipe("fast")
    factory = SampleFactory(r, 4, "fast-test", None)
    streams = Streams(4, 1)
    scene = build_scene(r, streams, factory.bank)
    disp = phonon_displacements(scene, r.simulation, streams)
    engine = factory.backend.engine(r.simulation, 32.0, 320, "cpu")
    bank = factory.backend.substrate_waves(engine, factory.bank, r.simulation)
    n_slices = len(slice_thicknesses(scene.cell_A[2], 2.0))
    first_particle = int(np.floor((scene.positions[scene.is_particle, 2] + disp[:, scene.is_particle, 2]).min() / 2))
    engine.scene_exit_waves(scene, disp, r.simulation, bank)  # computes the bank's waves (in memory here)
    engine.counts.clear()
    engine.scene_exit_waves(scene, disp, r.simulation, bank)
    assert bank.checkpoints and min(bank.checkpoints) > 1
    # particle-only: one wave per slice from its first particle slice; full scene: fewer than all its slices
    assert engine.counts["wave_slices"] < (n_slices - first_particle) + (n_slices - 1)
    assert engine.counts["wave_slices"] >= 2 * (n_slices - 1 - first_particle) - 2


@pytest.mark.parametrize("rot90", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_grid_placement_moves_the_abtem_potential_exactly(rot90, flip):
    """abTEM's projected potential of atoms placed like a substrate block equals the block's potential moved on the
    grid: the premise of reusing the block's exit waves."""
    import abtem
    import ase

    from datagen.structures import SubstratePlacement

    n, L = 48, 12.0
    rng = np.random.default_rng(rot90 + 4 * flip)
    xyz = np.column_stack([rng.uniform(0, L, (30, 2)), rng.uniform(0.2, 1.8, 30)])
    placement = SubstratePlacement(None, 0, np.arange(30), rot90, flip, (int(rng.integers(n)), int(rng.integers(n))),
                                   n, 0.0)
    moved = xyz.copy()
    moved[:, :2] = np.mod(placement.rotate_vectors(xyz[:, :2] - L / 2) + L / 2
                          + np.array(placement.shift_px) * L / n, L)

    def potential(positions):
        atoms = ase.Atoms(numbers=[6] * 30, positions=positions, cell=(L, L, 2.0), pbc=(True, True, False))
        return abtem.Potential(atoms, gpts=n, slice_thickness=2.0, projection="infinite").build().compute().array[0]

    block, placed = potential(xyz), potential(moved)
    assert np.abs(place_on_grid(block, rot90, flip, placement.shift_px) - placed).max() < 1e-5 * np.abs(placed).max()


def test_no_substrate_and_substrate_only():
    """Without carbon both scenes are one (simulated once); without a particle only the bank's block is imaged."""
    vacuum = recipe("fast", structure={**TINY["structure"], "substrate": {"thickness_A": 0.0}})
    only_c = recipe("fast", structure={**TINY["structure"], "particle": {"kind": "none"}})
    for r in (vacuum, only_c):
        factory = SampleFactory(r, 2, "fast-test", None)
        streams = Streams(2, 0)
        scene = build_scene(r, streams, factory.bank)
        fast = simulate(scene, r.simulation, streams, factory.backend)
        plain = simulate(scene, r.simulation.model_copy(update={"engine": "plain"}), streams, factory.backend)
        assert np.abs(fast.full - plain.full).max() < 2e-5 * np.abs(plain.full).max()
        if r is vacuum:
            assert np.array_equal(fast.full, fast.particle)
        else:
            assert fast.particle is None and plain.particle is None


def test_fast_engine_is_deterministic_with_and_without_the_bank_on_disk(tmp_path):
    """Same recipe and seed: the same bits, whether the bank's waves were computed in memory, written by the driver
    (``pipeline.prepare_substrate``) and memory-mapped, or read back by another process's factory."""
    from datagen.pipeline import prepare_substrate

    r = recipe("fast")
    prepare_substrate(r, 4, tmp_path)
    assert len(list(tmp_path.glob("waves-*.npy"))) == 2
    runs = [SampleFactory(r, 4, "fast-test", cache).structure_samples(2, 2, keep_waves=True)
            for cache in (None, tmp_path, tmp_path)]
    for samples, waves in runs[1:]:
        assert waves[1]["wave.npy"].tobytes() == runs[0][1][1]["wave.npy"].tobytes()
        assert waves[1]["particle_wave.npy"].tobytes() == runs[0][1][1]["particle_wave.npy"].tobytes()
        for (_, a, _), (_, b, _) in zip(samples, runs[0][0]):
            assert a["image.npy"].tobytes() == b["image.npy"].tobytes()
            assert a["mask.npy"].tobytes() == b["mask.npy"].tobytes()


def test_engine_is_validated_and_recorded():
    with pytest.raises(RecipeError, match=r"simulation\.engine"):
        recipe("turbo")
    assert Simulation().engine == "fast"


def test_slicing_is_anchored_at_the_entrance_face():
    assert slice_thicknesses(7.0, 2.0) == (2.0, 2.0, 2.0, 1.0)
    assert slice_thicknesses(6.0, 2.0) == (2.0, 2.0, 2.0)
    assert slice_thicknesses(0.5, 2.0) == (0.5,)


def test_benchmarks_quick_slice_section_runs(capsys):
    """``python -m benchmarks --quick --only c`` prints one table with its ratio against the FFT floor."""
    try:
        from benchmarks.cli import main
    except ModuleNotFoundError:  # plain `pytest` (not `python -m pytest`): the repository root is not on the path
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.cli import main

    assert main(["--quick", "--only", "c"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split("|")[1].strip() == "metric"  # one table: a title line, then the header
    rows = [line for line in lines if line.startswith("c |")]
    assert len(rows) == 3 and "FFT floor" in rows[0] and all(" ms " in row for row in rows)


def test_fast_engine_on_a_few_atoms_matches_abtem():
    """A few atoms, three phonon configurations (an odd number: the potentials are packed two to a complex FFT),
    Au and C in one slice, no substrate bank: both scenes against plain abTEM on each."""
    from datagen.structures import Scene

    sim = Simulation(n_phonons=3, device="cpu")
    positions = np.array([[4.0, 4.0, 3.0], [2.0, 5.0, 3.5], [6.0, 1.0, 1.0], [7.9, 7.9, 3.9]])
    scene = Scene((8.0, 8.0, 7.0), positions, np.array([79, 6, 6, 6]), np.array([True, False, False, False]))
    disp = np.random.default_rng(0).normal(0, 0.1, (3, 4, 3))
    fast, part = FastEngine(sim.energy_eV, sim.parametrization, 8.0, 80).scene_exit_waves(scene, disp, sim)
    plain = AbtemBackend()
    expected_full = plain.exit_waves(scene, disp, sim, 80, "cpu")
    expected_part = plain.exit_waves(scene.particle_only(), disp[:, :1], sim, 80, "cpu")
    assert np.abs(np.swapaxes(fast, -1, -2) - expected_full).max() < 1e-5
    assert np.abs(np.swapaxes(part, -1, -2) - expected_part).max() < 1e-5
    assert np.abs(fast - part).max() > 1e-2  # the carbon is seen by the full scene only
