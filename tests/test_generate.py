"""Generation end to end: shards, manifest, reproducibility, verify, refusals (resume after SIGKILL at five points of a
run: tests/test_faults_generation.py)."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from datagen.pipeline import generate
from datagen.recipe import load_recipe
from hrtem_core.dataset import iter_dataset
from hrtem_core.errors import DatasetError

# a small, fast variant of the tiny preset: 64 px images, one structure a shard
FAST = ["imaging.crop_px=64", "output.structures_per_shard=1", "simulation.n_phonons=1",
        "structure.particle.radius_A={dist: uniform, low: 5, high: 6.5}"]


def _cli(*args, check=True):
    res = subprocess.run([sys.executable, "-W", "ignore", "-m", "datagen", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(res.stderr)
    return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ds"
    manifest = generate(load_recipe("tiny", FAST), n=6, seed=5, out=out, workers=1, progress=False)
    return out, manifest


def test_dataset_layout_and_sample_contract(reference):
    out, manifest = reference
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar",
                                                     "shard-000002.tar"]
    for key in ("content_hash", "n_samples", "recipe", "recipe_hash", "shards", "software"):
        assert key in manifest
    assert manifest["n_samples"] == 6 and sum(s["n_samples"] for s in manifest["shards"]) == 6
    samples = list(iter_dataset(out))
    assert [k for k, _, _ in samples] == sorted(k for k, _, _ in samples)
    for key, arrays, meta in samples:
        image, mask = arrays["image.npy"], arrays["mask.npy"]
        assert image.dtype == np.float32 and image.shape == (64, 64)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        for section in ("structure", "simulation", "imaging", "mask", "provenance"):
            assert section in meta
        assert meta["id"].endswith(key) and meta["split"] == "train"
        assert meta["provenance"]["recipe_hash"] == manifest["recipe_hash"]
        assert meta["imaging"]["pixel_size_A"] == pytest.approx(0.25)
        assert len(meta["structure"]["center_px"]) == 2
        assert meta["mask"]["area_fraction"] == pytest.approx(mask.mean())
    # the two imaging variants of a structure share it and differ in imaging
    (k0, a0, m0), (k1, a1, m1) = samples[:2]
    assert m0["structure"]["structure_index"] == m1["structure"]["structure_index"]
    assert m0["imaging"]["defocus_A"] != m1["imaging"]["defocus_A"]


def test_shards_read_back_through_webdataset(reference):
    out, manifest = reference
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    assert keys == [k for s in manifest["shards"] for k, _ in s["samples"]]


@pytest.mark.slow
def test_same_seed_same_hash_in_parallel(reference, tmp_path):
    _, manifest = reference
    again = generate(load_recipe("tiny", FAST), n=6, seed=5, out=tmp_path / "par", workers=2, progress=False)
    assert again["content_hash"] == manifest["content_hash"]
    other = generate(load_recipe("tiny", FAST), n=6, seed=6, out=tmp_path / "s6", workers=1, progress=False)
    assert other["content_hash"] != manifest["content_hash"]


def test_existing_output_is_refused_or_reused(reference, tmp_path):
    out, manifest = reference
    with pytest.raises(DatasetError, match="seed: existing 5, requested 6"):
        generate(load_recipe("tiny", FAST), n=6, seed=6, out=out, progress=False)
    with pytest.raises(DatasetError, match="recipe_hash"):
        generate(load_recipe("tiny", FAST + ["imaging.dose_e_per_A2=900"]), n=6, seed=5, out=out, progress=False)
    assert generate(load_recipe("tiny", FAST), n=6, seed=5, out=out, progress=False) == manifest
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    res = _cli("generate", "--recipe", "tiny", "--n", "2", "--seed", "0", "--out", str(junk), check=False)
    assert res.returncode == 2 and "not empty" in res.stderr
    assert sorted(p.name for p in junk.iterdir()) == ["notes.txt"]


def _rewrite_sample(shard: Path, key: str, change):
    """Rewrite one member of a shard in place (what a bit flip or a bad copy would do)."""
    members = []
    with tarfile.open(shard) as tar:
        for m in tar:
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == key:
                data = change(data)
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_verify_names_the_first_bad_shard_and_sample(reference, tmp_path):
    import shutil

    out, manifest = reference
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    assert _cli("verify", str(bad)).returncode == 0
    shard = manifest["shards"][1]
    key = shard["samples"][1][0]

    def brighten(data):
        a = np.load(io.BytesIO(data))
        a[0, 0] += 1
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    _rewrite_sample(bad / shard["name"], f"{key}.image.npy", brighten)
    res = _cli("verify", str(bad), check=False)
    assert res.returncode != 0
    assert f"shard {shard['name']}, sample {key}" in res.stderr
    (bad / manifest["shards"][0]["name"]).write_bytes(b"\0" * 100)
    res = _cli("verify", str(bad), check=False)
    assert res.returncode != 0 and manifest["shards"][0]["name"] in res.stderr
    res = _cli("verify", str(tmp_path), check=False)
    assert res.returncode != 0 and "manifest.json" in res.stderr


def test_keep_waves_writes_verified_wave_shards(tmp_path):
    out = tmp_path / "waves"
    res = _cli("generate", "--recipe", "tiny", "--n", "2", "--seed", "1", "--out", str(out), "--keep-waves",
               "--quiet", *[a for o in FAST for a in ("--set", o)])
    assert "content_hash" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [w["name"] for w in manifest["wave_shards"]] == ["waves-000000.tar"]
    sample = next(iter(wds.WebDataset(str(out / "waves-000000.tar"), shardshuffle=False).decode()))
    wave = sample["wave.npy"]
    assert wave.dtype == np.complex64 and wave.shape == (1, 320, 320)
    assert sample["particle_wave.npy"].shape == wave.shape
    assert sample["json"]["simulation"]["sampling_A"] == pytest.approx(0.1)
    assert _cli("verify", str(out)).returncode == 0
