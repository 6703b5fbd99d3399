"""Importing experimental micrographs: pairing, validation, the shard contract, identity, and the platform reading it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from datagen import importer
from datagen.importer import import_dataset, pair_files
from hrtem_core.errors import InputError
from datagen.inspect import contact_sheet, dataset_info
from hrtem_core.dataset import iter_dataset, sample_hash, verify_dataset
from hrtem_core.errors import DatasetError
from mlplatform.config import config_from_dict
from mlplatform.curation import compile_filter, known_fields, scan_dataset, select
from mlplatform.data import EvalStream, TrainStream, curate

PIXEL = 0.42


def _cli(*args):
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "datagen", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _square(shape, r0, scale=255):
    m = np.zeros(shape, np.uint8)
    m[..., r0:r0 + 20, 10:40] = scale
    return m


def _write_inputs(root):
    """Three 64 px uint16 TIFFs with 0/255 PNG masks (three naming styles) and a 2-page stack with a bool mask stack."""
    rng = np.random.default_rng(0)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    arrays = {}
    for i, (stem, mask_name) in enumerate((("a", "a.png"), ("b", "b_mask.png"), ("c", "c-mask.png"))):
        arrays[stem] = rng.poisson(40 + 10 * i, (64, 64)).astype(np.uint16)
        tifffile.imwrite(images / f"{stem}.tif", arrays[stem])
        Image.fromarray(_square((64, 64), 5 + 10 * i)).save(masks / mask_name)
    arrays["d"] = rng.normal(100, 5, (2, 64, 64)).astype(np.float32)
    tifffile.imwrite(images / "d.tif", arrays["d"])
    np.save(masks / "d_label.npy", _square((2, 64, 64), 30, scale=1).astype(bool))
    return images, masks, arrays


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    images, masks, arrays = _write_inputs(root)
    manifest, done = import_dataset(images, masks, PIXEL, root / "ds", name="exp", dose_e_per_A2=30)
    assert not done
    return root / "ds", manifest, images, masks, arrays


def test_folder_of_tiffs_and_png_masks_imports_by_the_contract(imported):
    out, manifest, _, _, arrays = imported
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    for key in ("name", "content_hash", "n_samples", "shards", "software", "created_utc", "source", "recipe",
                "recipe_hash"):
        assert key in manifest
    assert manifest["recipe"] is None and manifest["name"] == "exp" and manifest["n_samples"] == 5
    assert [f["image"] for f in manifest["source"]["files"]] == ["a.tif", "b.tif", "c.tif", "d.tif"]
    assert [f["mask"] for f in manifest["source"]["files"]] == ["a.png", "b_mask.png", "c-mask.png", "d_label.npy"]
    samples = list(iter_dataset(out))
    assert [k for k, _, _ in samples] == ["img-000000", "img-000001", "img-000002", "img-000003_p0000",
                                          "img-000003_p0001"]
    expected = [arrays["a"], arrays["b"], arrays["c"], *arrays["d"]]
    for (key, a, meta), original in zip(samples, expected):
        image, mask = a["image.npy"], a["mask.npy"]
        assert image.dtype == np.float32 and np.array_equal(image, original.astype(np.float32))  # not normalised
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert meta["id"] == f"exp/{key}" and meta["dataset"] == "exp" and meta["split"] == "test"
        assert meta["mask"]["area_fraction"] == pytest.approx(mask.mean())
        assert meta["provenance"]["parameters"] == {"pixel_size_A": PIXEL, "dose_e_per_A2": 30.0, "split": "test"}
        assert "tifffile" in meta["provenance"]["versions"]
        src = meta["source"]
        assert src["pixel_size_A"] == PIXEL and src["dose_e_per_A2"] == 30.0 and src["import_time_utc"]
        assert "structure" not in meta and "imaging" not in meta
    first, page1 = samples[0][2]["source"], samples[4][2]["source"]
    assert (first["file"], first["page"], first["n_pages"], first["dtype"], first["shape"], first["mask_file"]) == \
        ("a.tif", None, None, "uint16", [64, 64], "a.png")
    assert (page1["file"], page1["page"], page1["n_pages"], page1["dtype"], page1["mask_file"]) == \
        ("d.tif", 1, 2, "float32", "d_label.npy")
    assert np.array_equal(samples[1][1]["mask.npy"], _square((64, 64), 15, scale=1))


def test_verify_accepts_it(imported):
    out, manifest, *_ = imported
    assert verify_dataset(out)["content_hash"] == manifest["content_hash"]
    res = _cli("verify", out)
    assert res.returncode == 0 and manifest["content_hash"] in res.stdout


def test_content_hash_ignores_import_time_and_output_folder(imported, tmp_path):
    out, manifest, images, masks, _ = imported
    key, arrays, meta = next(iter_dataset(out))
    later = json.loads(json.dumps(meta))
    later["source"]["import_time_utc"] = "2099-01-01T00:00:00+00:00"
    assert sample_hash(key, arrays, later) == sample_hash(key, arrays, meta)
    later["source"]["pixel_size_A"] = 1.0
    assert sample_hash(key, arrays, later) != sample_hash(key, arrays, meta)
    again, done = import_dataset(images, masks, PIXEL, tmp_path / "elsewhere", name="exp", dose_e_per_A2=30)
    assert not done and again["content_hash"] == manifest["content_hash"]


def test_existing_output_is_reused_or_refused(imported, tmp_path):
    out, manifest, images, masks, _ = imported
    res = _cli("import", "--images", images, "--masks", masks, "--pixel-size", PIXEL, "--dose", 30, "--name", "exp",
               "--out", out)
    assert res.returncode == 0 and "already imported" in res.stdout
    assert json.loads((out / "manifest.json").read_text()) == manifest
    with pytest.raises(DatasetError, match="pixel_size_A: existing 0.42, requested 0.5"):
        import_dataset(images, masks, 0.5, out, name="exp", dose_e_per_A2=30)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        import_dataset(images, masks, PIXEL, junk)
    assert [p.name for p in junk.iterdir()] == ["notes.txt"]


def test_curation_scans_and_selects_it(imported):
    out, manifest, *_ = imported
    index = scan_dataset(out)
    assert index.n_samples == 5 and index.content_hash == manifest["content_hash"]
    # each image file is its own structure; the pages of the stack share one
    assert len({r.structure_id for r in index.records}) == 4
    assert index.records[3].structure_id == index.records[4].structure_id
    f = compile_filter("source.pixel_size_A == 0.42 and source.page != 1 and mask.area_fraction > 0",
                       known_fields(index.records))
    assert [r.key for r in select(index, f.text)] == ["img-000000", "img-000001", "img-000002", "img-000003_p0000"]


def test_platform_uses_it_as_benchmark_and_finetuning_data(imported):
    out, *_ = imported
    config = config_from_dict({
        "data": {"train": [{"path": str(out)}], "val_fraction": 0.25, "crop_px": 32, "batch_size": 2},
        "benchmarks": [{"name": "experimental", "path": str(out)}],
    })
    curated = curate(config)
    assert curated.pixel_size_A == pytest.approx(PIXEL)  # from source.pixel_size_A
    assert len(curated.train) + len(curated.val) == 5 and curated.val
    assert {r.structure_id for r in curated.train}.isdisjoint({r.structure_id for r in curated.val})
    assert len(curated.benchmarks["experimental"]) == 5
    assert {u.role for u in curated.uses} == {"train", "validation", "benchmark"}
    keys = [k for batch in EvalStream(curated.benchmarks["experimental"], config.data) for k in batch["key"]]
    assert sorted(keys) == [r.key for r in curated.benchmarks["experimental"]]
    item = next(iter(TrainStream(curated.train, curated.train_weights, config.data, seed=0, epoch=0)))
    assert item["image"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_info_and_show_handle_it(imported, tmp_path):
    out, *_ = imported
    info = dataset_info(out)
    assert info["counts"]["samples"] == 5 and info["counts"]["structures"] == 4
    assert info["counts"]["splits"] == {"test": 5} and "imported from" in info["text"]
    assert contact_sheet(out, tmp_path / "sheet.png", n=5).read_bytes()[:4] == b"\x89PNG"
    assert _cli("info", out).returncode == 0


# ------------------------------------------------------------------------------------------------------ pairing


def test_pairing_rule():
    assert pair_files(["x/a.tif", "b.png"], ["b-Label.npy", "x/a_mask.png"]) == [("b.png", "b-Label.npy"),
                                                                                 ("x/a.tif", "x/a_mask.png")]
    cases = [
        (["a.tif", "b.tif"], ["a.png"], r"images without a mask: b\.tif"),
        (["a.tif"], ["a.png", "z.png"], r"masks without an image: z\.png"),
        (["a.tif"], ["a.png", "a_mask.png"], r"images claimed by several masks: a\.tif \(a\.png, a_mask\.png\)"),
        (["a.tif", "a.png"], ["a_mask.png"], r"images sharing a stem: a\.png and a\.tif"),
        (["a.tif", "a_mask.tif"], ["a_mask.png"], r"masks fitting more than one image: a_mask\.png"),
        (["x/a.tif"], ["a.png"], r"masks without an image: a\.png"),  # same relative folder only
    ]
    for images, masks, message in cases:
        with pytest.raises(InputError, match=message):
            pair_files(images, masks)


def test_mismatch_fails_before_writing(tmp_path):
    images, masks, _ = _write_inputs(tmp_path)
    (masks / "b_mask.png").rename(masks / "q_mask.png")
    with pytest.raises(InputError, match=r"images without a mask: b\.tif.*masks without an image: q_mask\.png"):
        import_dataset(images, masks, PIXEL, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    res = _cli("import", "--images", images, "--masks", masks, "--pixel-size", PIXEL, "--out", tmp_path / "out")
    assert res.returncode == 2 and "b.tif" in res.stderr and "q_mask.png" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def test_one_folder_holding_images_and_masks(tmp_path):
    images, masks, _ = _write_inputs(tmp_path)
    for mask in masks.iterdir():
        mask.rename(images / (mask.stem + ("_mask" if mask.stem in ("a",) else "") + mask.suffix))
    manifest, _ = import_dataset(images, images, PIXEL, tmp_path / "out")
    assert [f["mask"] for f in manifest["source"]["files"]] == ["a_mask.png", "b_mask.png", "c-mask.png",
                                                                "d_label.npy"]


def test_single_files_pair_as_given(tmp_path):
    tifffile.imwrite(tmp_path / "frame.tif", np.ones((8, 8), np.int16))
    Image.fromarray(_square((8, 8), 2)).save(tmp_path / "labels.png")
    manifest, _ = import_dataset(tmp_path / "frame.tif", tmp_path / "labels.png", 1.0, tmp_path / "out")
    assert manifest["name"] == "frame" and manifest["n_samples"] == 1 and verify_dataset(tmp_path / "out")


# --------------------------------------------------------------------------------------------------- validation


def _bad_input(tmp_path, case):
    images, masks, _ = _write_inputs(tmp_path)
    if case == "unreadable":
        (images / "b.tif").write_bytes(b"not a tiff at all")
    elif case == "unsupported":
        (images / "notes.jpg").write_bytes(b"x")
    elif case == "not 2-D":
        (images / "b.tif").unlink()
        np.save(images / "b.npy", np.zeros((2, 3, 64, 64), np.float32))
    elif case == "non-finite":
        a = np.ones((64, 64), np.float32)
        a[3, 4] = np.nan
        tifffile.imwrite(images / "b.tif", a)
    elif case == "shapes":
        tifffile.imwrite(images / "b.tif", np.ones((64, 48), np.uint16))
    elif case == "mask values":
        Image.fromarray(_square((64, 64), 5, scale=2)).save(masks / "b_mask.png")
    elif case == "colour":
        rgb = np.zeros((64, 64, 3), np.uint8)
        rgb[..., 0] = 9
        Image.fromarray(rgb).save(masks / "b_mask.png")
    elif case == "stack vs single":
        tifffile.imwrite(masks / "d_label.tif", _square((64, 64), 5, scale=1))
        (masks / "d_label.npy").unlink()
    elif case == "empty":
        for p in images.iterdir():
            p.unlink()
    return images, masks


@pytest.mark.parametrize("case, message", [
    ("unreadable", r"b\.tif: unreadable"),
    ("unsupported", r"unsupported file.*notes\.jpg"),
    ("not 2-D", r"b\.npy: a \.npy must be 2-D .*\(2, 3, 64, 64\)"),
    ("non-finite", r"b\.tif: has non-finite values"),
    ("shapes", r"b\.tif: image shape \(64, 48\) differs from its mask b_mask\.png \(64, 64\)"),
    ("mask values", r"b_mask\.png: mask values must be 0/1, 0/255 or bool, found 0, 2"),
    ("colour", r"b_mask\.png: is a colour image"),
    ("stack vs single", r"d\.tif is a stack of 2 page\(s\) but its mask d_label\.tif is a single image"),
    ("empty", r"--images .*images: no files found"),
])
def test_validation_errors_name_the_file_and_leave_nothing(tmp_path, case, message):
    images, masks = _bad_input(tmp_path, case)
    with pytest.raises(InputError, match=message):
        import_dataset(images, masks, PIXEL, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()  # an empty --out that was there stays, empty
    with pytest.raises(InputError):
        import_dataset(images, masks, PIXEL, tmp_path / "empty")
    assert not any((tmp_path / "empty").iterdir())


def test_every_bad_pair_is_reported_at_once(tmp_path):
    images, masks, _ = _write_inputs(tmp_path)
    (images / "a.tif").write_bytes(b"junk")
    Image.fromarray(_square((64, 64), 5, scale=7)).save(masks / "c-mask.png")
    with pytest.raises(InputError, match=r"2 of 4 pair\(s\) cannot be imported: a\.tif: unreadable.*c-mask\.png"):
        import_dataset(images, masks, PIXEL, tmp_path / "out")


def test_gray_rgb_and_bool_are_accepted(tmp_path):
    images, masks = tmp_path / "i", tmp_path / "m"
    images.mkdir()
    masks.mkdir()
    gray = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], -1)).save(images / "rgba.png")
    Image.fromarray(_square((64, 64), 3) > 0).save(masks / "rgba.png")  # mode "1"
    manifest, _ = import_dataset(images, masks, PIXEL, tmp_path / "out")
    (_, arrays, meta), = iter_dataset(tmp_path / "out")
    assert np.array_equal(arrays["image.npy"], gray.astype(np.float32)) and meta["source"]["shape"] == [64, 64, 4]
    assert arrays["mask.npy"].sum() == 20 * 30


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    images, masks, _ = _write_inputs(tmp_path)
    monkeypatch.setattr(importer, "SHARD_BYTES", 1)  # one sample a shard
    calls = []
    real = importer.write_shard

    def failing(path, samples):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real(path, samples)

    monkeypatch.setattr(importer, "write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        import_dataset(images, masks, PIXEL, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(importer, "write_shard", real)
    manifest, _ = import_dataset(images, masks, PIXEL, tmp_path / "out")
    assert len(manifest["shards"]) == 5 and verify_dataset(tmp_path / "out")["n_samples"] == 5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "abc"])
def test_pixel_size_must_be_positive(tmp_path, value):
    res = _cli("import", "--images", tmp_path, "--masks", tmp_path, "--pixel-size", value, "--out", tmp_path / "o")
    assert res.returncode == 2 and "--pixel-size" in res.stderr and not (tmp_path / "o").exists()
