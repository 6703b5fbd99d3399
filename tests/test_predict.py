"""predict: reading micrographs, rescaling to the model's pixel size, outputs on disk, and the errors a user sees."""

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mlplatform.models import build_model
from hrtem_core.errors import InputError
from mlplatform.predict import fourier_rescale, predict_array, predict_path
from mlplatform.tracking import TrackedRun

META = {"preset": "compact", "pixel_size_A": 0.2, "normalization": {"kind": "per_image_zscore"}}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """(tracking uri, run id) of a compact model with random weights."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    torch.manual_seed(1)
    with TrackedRun(uri, "predict", "m", {}, {}, system_metrics=False) as run:
        run.log_model(build_model("compact"), META)
    return uri, run.run_id


def micrographs(folder):
    rng = np.random.default_rng(0)
    folder.mkdir()
    np.save(folder / "a.npy", rng.normal(100, 10, (64, 48)).astype(np.float32))
    gray = rng.integers(0, 255, (40, 56, 1), dtype=np.uint8)
    Image.fromarray(np.repeat(gray, 3, axis=2)).save(folder / "b.png")  # gray stored as RGB: read as gray
    tifffile.imwrite(folder / "c.tif", rng.normal(size=(2, 32, 36)).astype(np.float32))  # two pages
    (folder / "notes.txt").write_text("not an image; skipped in a folder")
    return folder


def test_folder_of_npy_png_and_multipage_tif(logged, tmp_path):
    uri, run_id = logged
    records = predict_path(run_id, micrographs(tmp_path / "in"), tmp_path / "out", 0.2, tracking_uri=uri)
    shapes = {"a": (64, 48), "b": (40, 56), "c_frame000": (32, 36), "c_frame001": (32, 36)}
    assert [r["outputs"]["mask_png"].split("/")[-1] for r in records] == [f"{s}_mask.png" for s in shapes]
    for rec, (stem, shape) in zip(records, shapes.items()):
        out = tmp_path / "out"
        png = np.asarray(Image.open(out / f"{stem}_mask.png"))
        mask, prob = np.load(out / f"{stem}_mask.npy"), np.load(out / f"{stem}_prob.npy")
        assert png.shape == mask.shape == prob.shape == shape == tuple(rec["shape"])
        assert png.dtype == mask.dtype == np.uint8 and prob.dtype == np.float32
        assert set(np.unique(png)) <= {0, 255} and set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(png == 255, mask == 1) and np.array_equal(mask, (prob > 0.5).astype(np.uint8))
        assert rec["particle_fraction"] == pytest.approx(mask.mean()) and not rec["pixel_size_assumed"]
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left
    assert [r["page"] for r in records] == [None, None, 0, 1]


def test_rescaling_to_the_model_pixel_size_and_back(logged, tmp_path):
    uri, run_id = logged
    np.save(tmp_path / "fine.npy", np.random.default_rng(2).normal(size=(64, 80)).astype(np.float32))
    (rec,) = predict_path(run_id, tmp_path / "fine.npy", tmp_path / "out", 0.1, tracking_uri=uri, threshold=0.3)
    assert rec["model_shape"] == [32, 40] and rec["shape"] == [64, 80] and rec["threshold"] == 0.3
    assert np.load(tmp_path / "out" / "fine_prob.npy").shape == (64, 80)
    (rec,) = predict_path(run_id, tmp_path / "fine.npy", tmp_path / "out2", None, tracking_uri=uri)
    assert rec["pixel_size_assumed"] and rec["pixel_size_A"] == 0.2 and "assuming" in rec["note"]
    assert rec["model_shape"] == rec["shape"]


def test_fourier_rescale_keeps_the_mean_and_band_limited_fringes():
    y, x = np.mgrid[0:128, 0:128]
    fringes = 5 + np.cos(2 * np.pi * x / 16)  # period 16 px: 8 px after halving, below the new Nyquist
    small = fourier_rescale(fringes, (64, 64))
    assert small.mean() == pytest.approx(5, abs=1e-4)
    spectrum = np.abs(np.fft.rfft(small[32] - small[32].mean()))
    assert np.argmax(spectrum) == 64 // 8
    assert np.allclose(fourier_rescale(np.full((10, 7), 3.0), (23, 5)), 3.0, atol=1e-5)


def test_predict_array_keeps_the_callers_train_mode():
    net = build_model("compact").train()
    prob = predict_array(net, META, np.random.default_rng(3).normal(size=(30, 34)), 0.4)
    assert net.training and prob.shape == (30, 34) and prob.dtype == np.float32


def test_bad_inputs_give_clear_errors(logged, tmp_path):
    uri, run_id = logged

    def fails(path, match):
        with pytest.raises(InputError, match=match):
            predict_path(run_id, path, tmp_path / "out", 0.2, tracking_uri=uri)

    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 8, 8), np.float32))
    fails(tmp_path / "cube.npy", r"cube\.npy.*2-D \[H, W\] or a 3-D stack.*\(2, 3, 8, 8\)")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    fails(tmp_path / "rgb.png", r"rgb\.png: is a colour image")  # the same reader and rule as datagen import
    bad = np.ones((8, 8), np.float32)
    bad[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    fails(tmp_path / "nan.npy", r"nan\.npy.*non-finite")
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), np.float32))
    fails(tmp_path / "empty.npy", r"empty\.npy.*empty")
    (tmp_path / "notes.txt").write_text("hello")
    fails(tmp_path / "notes.txt", r"notes\.txt.*unsupported file type")
    (tmp_path / "fake.png").write_text("not a png")
    fails(tmp_path / "fake.png", r"fake\.png.*unreadable")
    fails(tmp_path / "missing", r"missing.*no such file or folder")
    (tmp_path / "nothing").mkdir()
    fails(tmp_path / "nothing", "no micrographs")
    with pytest.raises(InputError, match="pixel_size_A"):
        predict_path(run_id, tmp_path / "cube.npy", tmp_path / "out", -1.0, tracking_uri=uri)
