"""Recipes: presets, distributions, overrides and the errors a user sees."""

import math
import subprocess
import sys

import numpy as np
import pytest

from datagen.distributions import Choice, LogUniform, TruncNormal, Uniform, bounds, sample
from datagen.recipe import RecipeError, available_recipes, load_recipe
from hrtem_core.config import parse_override
from datagen.seeding import Streams


def test_presets_load_and_follow_the_reference():
    assert {"tiny", "au-small", "au-large", "cdse"} <= set(available_recipes())
    large = load_recipe("au-large")
    assert large.simulation.energy_eV == 300e3
    assert large.simulation.sampling_A == 0.1 and large.imaging.pixel_size_A == 0.2
    assert large.structure.cell.extent_A == 128 and large.imaging.crop_px == 512
    assert large.simulation.n_phonons == 8 and large.simulation.phonon_sigma_A == 0.1
    assert large.structure.particle.lattice_A == pytest.approx(4.07825)
    assert bounds(large.structure.particle.radius_A) == (30, 50)
    assert bounds(large.structure.substrate.thickness_A) == (20, 80)
    assert large.imaging.aberrations["C30_A"] == pytest.approx(-19130)
    assert large.imaging.aberrations["C50_A"] == pytest.approx(1.048e7)
    assert large.imaging.median_filter_px == 3
    assert large.mask.phase_threshold_rad == pytest.approx(math.pi / 12)
    assert bounds(load_recipe("au-small").structure.particle.radius_A) == (7.5, 12.5)
    assert load_recipe("cdse").structure.particle.kind == "wurtzite_sphere"


def test_recipes_command_lists_every_preset():
    out = subprocess.run([sys.executable, "-m", "datagen", "recipes"], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(available_recipes())
    assert all(len(line.split()) > 3 for line in lines)  # each has a description


def test_hash_is_stable_and_sensitive_to_every_value():
    a, b = load_recipe("tiny"), load_recipe("tiny")
    assert a.hash() == b.hash()
    assert load_recipe("tiny", ["imaging.dose_e_per_A2=401"]).hash() != a.hash()


def test_overrides_take_numbers_and_distributions():
    r = load_recipe("tiny", ["imaging.dose_e_per_A2=800", "structure.particle.radius_A={dist: uniform, low: 7, high: 9}"])
    assert r.imaging.dose_e_per_A2 == 800
    assert isinstance(r.structure.particle.radius_A, Uniform)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("imaging.dose_e_per_A2=abc", "imaging.dose_e_per_A2"),
        ("imaging.bogus=1", "imaging.bogus: unknown key"),
        ("imaging.aberrations.C31_A=3", "unknown aberration 'C31_A'"),
        ("imaging.median_filter_px=2", "imaging.median_filter_px"),
        ("imaging.dose_e_per_A2={dist: gamma, k: 2}", "'gamma'"),
        ("imaging.dose_e_per_A2={dist: uniform, low: 5, high: 1}", "high > low"),
        ("structure.particle.element=Xx", "'Xx' is not a chemical element"),
        ("structure.particle.radius_A={dist: normal, mean: 8, std: 1}", "radius_A must be bounded"),
        ("structure.particle.radius_A=40", "does not fit"),
        ("imaging.crop_px=4000", "imaging.crop_px"),
        ("simulation.backend=multem", "simulation.backend"),
        ("nokey", "expected dotted.key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny", [override])
    assert fragment in str(err.value)


def test_unknown_recipe_is_refused():
    with pytest.raises(RecipeError, match="neither a preset"):
        load_recipe("no-such-recipe")


def test_cli_bad_override_exits_nonzero_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    res = subprocess.run([sys.executable, "-m", "datagen", "generate", "--recipe", "tiny", "--n", "2", "--seed", "0",
                          "--out", str(out), "--set", "imaging.dose_e_per_A2=-5"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "imaging.dose_e_per_A2" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()
    res = subprocess.run([sys.executable, "-m", "datagen", "generate", "--recipe", "tiny", "--n", "0", "--seed", "0",
                          "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 2 and "--n" in res.stderr and not out.exists()


def _draws(dist, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([sample(dist, rng) for _ in range(n)])


def test_distributions_sample_what_they_say():
    x = _draws(TruncNormal(dist="truncnormal", mean=40, std=5, low=30, high=50))
    assert x.min() >= 30 and x.max() <= 50 and abs(x.mean() - 40) < 0.3
    x = _draws(LogUniform(dist="loguniform", low=100, high=1200))
    assert x.min() >= 100 and x.max() <= 1200 and abs(np.log(x).mean() - (np.log(100) + np.log(1200)) / 2) < 0.05
    c = Choice(dist="choice", values=[-500, 0, 500], jitter_std=20)
    x = _draws(c)
    nearest = np.array([-500, 0, 500])[np.argmin(np.abs(x[:, None] - np.array([-500, 0, 500])), axis=1)]
    assert abs((x - nearest).std() - 20) < 1.5
    assert sample(3.5, np.random.default_rng(0)) == 3.5


def test_streams_are_keyed_by_name_and_independent_of_order():
    s = Streams(7, 3)
    a = s.rng("imaging.dose_e_per_A2").uniform()
    s.rng("something.else").uniform(size=100)
    assert Streams(7, 3).rng("imaging.dose_e_per_A2").uniform() == a
    assert Streams(7, 4).rng("imaging.dose_e_per_A2").uniform() != a
    assert Streams(7, 3, 0).rng("imaging.dose_e_per_A2").uniform() != a
