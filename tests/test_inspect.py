"""The contact sheet and dataset_info, on a tiny dataset generated once for the module."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from datagen.inspect import contact_sheet, dataset_info
from hrtem_core.dataset import iter_dataset, read_manifest
from hrtem_core.errors import DatasetError


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    # tiny's 96 px crop is kept: 64 px (16 Å) is refused by the recipe check, its particles need up to 22 Å
    return tiny_dataset(6, 0, base=["output.structures_per_shard=2"])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "datagen", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_contact_sheet_is_a_sensible_png(dataset, tmp_path):
    out = contact_sheet(dataset, tmp_path / "new" / "folder" / "sheet.png", n=4)
    assert out == tmp_path / "new" / "folder" / "sheet.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        width, height = im.size
        pixels = np.asarray(im.convert("L"))
    assert 800 <= width <= 4000 and 600 <= height <= 4000
    assert pixels.std() > 10
    assert [p.name for p in out.parent.iterdir()] == ["sheet.png"]  # no temporary file left behind


def test_contact_sheet_refuses_other_formats(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        contact_sheet(dataset, tmp_path / "sheet.jpg", n=2)
    assert not any(tmp_path.iterdir())


def test_contact_sheet_of_a_non_dataset(tmp_path):
    with pytest.raises(DatasetError, match="not a finished dataset"):
        contact_sheet(tmp_path, tmp_path / "sheet.png", n=2)


def test_show_cli(dataset, tmp_path):
    out = tmp_path / "sheet.png"
    result = run_cli("show", dataset, "--out", out, "--n", 6)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_show_cli_on_a_non_dataset_fails_cleanly(tmp_path):
    folder = tmp_path / "not-a-dataset"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    result = run_cli("show", folder, "--out", folder / "sheet.png")
    assert result.returncode != 0
    assert str(folder) in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_info_counts_match_the_manifest(dataset):
    info = dataset_info(dataset)
    manifest = read_manifest(dataset)
    assert info["counts"]["samples"] == manifest["n_samples"] == 6
    assert info["counts"]["structures"] == manifest["n_structures"]
    assert info["counts"]["shards"] == len(manifest["shards"]) == 2
    assert info["counts"]["splits"] == {"train": 6}
    assert info["content_hash"] == manifest["content_hash"]
    assert info["recipe"] == {"name": "tiny", "hash": manifest["recipe_hash"]}


def test_info_stats_match_the_samples(dataset):
    info = dataset_info(dataset)
    samples = list(iter_dataset(dataset))
    expected = {
        "structure.radius_A": [m["structure"]["radius_A"] for _, _, m in samples],
        "structure.n_defects": [m["structure"]["n_defects"] for _, _, m in samples],
        "structure.substrate_thickness_A": [m["structure"]["substrate_thickness_A"] for _, _, m in samples],
        "imaging.defocus_A": [m["imaging"]["defocus_A"] for _, _, m in samples],
        "imaging.dose_e_per_A2": [m["imaging"]["dose_e_per_A2"] for _, _, m in samples],
        "imaging.focal_spread_A": [m["imaging"]["focal_spread_A"] for _, _, m in samples],
        "mask.area_fraction": [float(a["mask.npy"].mean()) for _, a, _ in samples],
        "image mean counts": [float(a["image.npy"].mean(dtype=np.float64)) for _, a, _ in samples],
    }
    for name, values in expected.items():
        stats = info["numeric"][name]
        assert stats["n"] == len(values), name
        for key, reduce in (("min", np.min), ("mean", np.mean), ("median", np.median), ("max", np.max)):
            assert stats[key] == pytest.approx(float(reduce(values)), rel=1e-9, abs=1e-12), (name, key)
        if "hist" in stats:
            assert sum(stats["hist"]["counts"]) == len(values)
    kinds = Counter(m["structure"]["kind"] for _, _, m in samples)
    twins = Counter(str(m["structure"]["has_twin"]).lower() for _, _, m in samples)
    faults = Counter(str(m["structure"]["has_stacking_fault"]).lower() for _, _, m in samples)
    assert info["categorical"]["structure.kind"] == dict(kinds)
    assert info["categorical"]["structure.has_twin"] == dict(twins)
    assert info["categorical"]["structure.has_stacking_fault"] == dict(faults)
    assert info["categorical"]["structure.material"] == {"Au": 6}
    for name in expected:
        assert name in info["text"]


def test_info_cli_json(dataset):
    result = run_cli("info", dataset, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["counts"]["samples"] == 6
    assert info["text"] == dataset_info(dataset)["text"]
