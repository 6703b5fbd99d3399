"""Files that microscopes write (../shared/fixtures/microscope-files/, real files from openNCEM's test data):
each one read with its shape and pixel size in Å, or refused naming what it holds; the pixel size rules of
``--pixel-size``; ``datagen import`` and ``experiments predict`` on them, with predict's calibrated outputs, particle
table and tracked run.

The commands run through conftest's ``cli`` (their ``main`` in a process of its own); everything else in process.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import unavailable
from hrtem_core import micrographs
from hrtem_core.errors import InputError
from hrtem_core.micrographs import read_pages, resolve_pixel_size

FILES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "microscope-files"
SER = "16_STOimage_1.ser"
SER_PIXEL_A = 0.10012704  # 0.01001 nm in the file
# a model whose probability is 0.98 everywhere, at 1 Å pixels: every image is one particle, the whole field
META = {"preset": "compact", "pixel_size_A": 1.0, "normalization": {"kind": "per_image_zscore"}}


@pytest.fixture(scope="module")
def files() -> Path:
    if not (FILES / SER).is_file():
        unavailable("the microscope fixture files", f"{FILES} holds no {SER}")
    return FILES


def _everything_model():
    from mlplatform.models import build_model

    model = build_model("compact")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.net.model[2][1].conv.unit0.conv.bias.fill_(4.0)  # the last convolution: logit 4 everywhere
    return model


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """(tracking uri, run id) of the everything-is-particle model, logged by a run as training logs models."""
    from mlplatform.tracking import TrackedRun

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    with TrackedRun(uri, "train", "everything", {}, {}, system_metrics=False) as run:
        run.log_model(_everything_model(), META)
    return uri, run.run_id


def run_cli(cli, tmp_path, package, *args):
    return cli.run([package, *map(str, args)], tmp_path, timeout_s=300)


def refused(res, *words) -> str:
    assert res.returncode == 2 and "Traceback" not in res.stderr, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# -- reading ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, n_frames, shape, pixel_A", [
    (SER, 1, (1024, 1024), SER_PIXEL_A),  # FEI TIA, SrTiO3 HRTEM image
    ("Camera Ceta Imaging Micro.emd", 1, (512, 512), 31.388371),  # Thermo Fisher Velox, 3.139 nm
    ("temp.mrc", 3, (128, 128), 2.0),  # a stack of 3 frames, 0.2 nm
])
def test_images_are_read_with_their_pixel_size_in_angstrom(files, name, n_frames, shape, pixel_A):
    read = read_pages(files / name, name)
    assert len(read.pages) == n_frames and read.stack == (n_frames > 1)
    assert all(p.shape == shape for p in read.pages)
    assert read.pixel_size_A == pytest.approx(pixel_A, rel=1e-6)


@pytest.mark.parametrize("name, words", [
    ("dmTest_float32_nonSquare_diffPixelSize.dm3", ["unequal pixel sizes", "y 2 Å", "x 10 Å"]),  # y 2.0 Å, x 1.0 nm
    ("dmTest_float32_nonSquare_diffPixelSize.dm4", ["unequal pixel sizes", "y 2 Å", "x 10 Å"]),
    ("08_carbon.dm3", ["not a micrograph", "spectrum", "EELS", "2048 channels in eV"]),
])
def test_what_is_not_a_square_pixel_micrograph_is_refused_by_name(files, name, words):
    with pytest.raises(InputError) as exc:
        read_pages(files / name, name)
    for word in (name, *words):
        assert word in str(exc.value)


def test_berkeley_emd_images_stacks_diffraction_patterns_and_4d_data(tmp_path):
    """Written by rosettasciio's own Berkeley EMD writer, which, read back, marks no axis as navigation."""
    from rsciio.emd import file_writer

    def write(name, shape, units):
        axes = [{"name": f"dim{i}", "size": n, "scale": 0.5, "offset": 0.0, "units": u, "navigate": False}
                for i, (n, u) in enumerate(zip(shape, units))]
        file_writer(str(tmp_path / name), {"data": np.zeros(shape, np.float32), "axes": axes, "original_metadata": {},
                                           "metadata": {"General": {"title": name}, "Signal": {"signal_type": ""}}})
        return tmp_path / name

    image = read_pages(write("image.emd", (16, 20), ["nm", "nm"]))
    assert not image.stack and image.pages[0].shape == (16, 20) and image.pixel_size_A == pytest.approx(5.0)
    stack = read_pages(write("series.emd", (3, 16, 16), ["s", "nm", "nm"]))
    assert stack.stack and len(stack.pages) == 3 and stack.pixel_size_A == pytest.approx(5.0)
    with pytest.raises(InputError, match=r"dp\.emd: not a micrograph: it holds a diffraction pattern \(16 x 16, axes "
                                         r"in 1 / nm\)"):
        read_pages(write("dp.emd", (16, 16), ["1/nm", "1/nm"]), "dp.emd")
    with pytest.raises(InputError, match=r"4d\.emd: not a micrograph: it holds a 4-D dataset \(2 x 3 x 16 x 16: a scan "
                                         "or series of diffraction patterns"):
        read_pages(write("4d.emd", (2, 3, 16, 16), ["nm", "nm", "1/nm", "1/nm"]), "4d.emd")


def test_a_header_over_the_size_limit_is_refused_before_decoding(files, monkeypatch):
    import dask.array

    def decoded(*args, **kwargs):
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(micrographs, "MAX_PIXELS", 2**19)
    monkeypatch.setattr(dask.array.Array, "compute", decoded)
    with pytest.raises(InputError, match=r"16_STOimage_1\.ser: image of 1024 x 1024 pixels.*refused before decoding"):
        read_pages(files / SER, SER)


def test_an_imagej_tiff_gives_its_calibration_and_a_plain_one_none(tmp_path):
    image = np.zeros((8, 10), np.float32)
    tifffile.imwrite(tmp_path / "nm.tif", image, imagej=True, resolution=(20, 20), metadata={"unit": "nm"})
    tifffile.imwrite(tmp_path / "plain.tif", image)
    assert read_pages(tmp_path / "nm.tif").pixel_size_A == pytest.approx(0.5)  # 20 px per nm
    assert read_pages(tmp_path / "plain.tif").pixel_size_A is None


def test_pixel_size_flag_against_the_file():
    assert resolve_pixel_size("f", 0.10013, None) == 0.10013  # the file's
    assert resolve_pixel_size("f", None, 0.2) == 0.2  # no calibration: the flag's
    assert resolve_pixel_size("f", None, None) is None
    assert resolve_pixel_size("f", 0.10013, 0.1001) == 0.10013  # the same, as typed: the file's
    assert resolve_pixel_size("f", 0.10013, 0.2, override=True) == 0.2
    with pytest.raises(InputError, match=r"f: --pixel-size 0\.2 Å differs from the file's calibration, 0\.10013 Å"
                                         r".*--override-pixel-size"):
        resolve_pixel_size("f", 0.10013, 0.2)


def test_import_needs_a_pixel_size_only_for_a_file_without_one(tmp_path):
    from datagen.importer import import_dataset

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a_mask.png")
    with pytest.raises(InputError, match=r"a\.png: the file has no pixel size calibration; give --pixel-size"):
        import_dataset(tmp_path / "a.png", tmp_path / "a_mask.png", None, tmp_path / "out")
    with pytest.raises(InputError, match="--override-pixel-size needs --pixel-size"):
        import_dataset(tmp_path / "a.png", tmp_path / "a_mask.png", None, tmp_path / "out", override_pixel_size=True)
    assert not (tmp_path / "out").exists()


# -- the commands ----------------------------------------------------------------------------------------------------

def test_import_takes_the_files_pixel_size_and_refuses_a_contradicting_flag(files, cli, tmp_path):
    from hrtem_core.dataset import iter_dataset

    mask = np.zeros((1024, 1024), np.uint8)
    mask[100:200, 300:420] = 255
    Image.fromarray(mask).save(tmp_path / "sto_mask.png")
    args = ["import", "--images", files / SER, "--masks", tmp_path / "sto_mask.png"]
    refused(run_cli(cli, tmp_path, "datagen", *args, "--out", tmp_path / "no", "--pixel-size", "0.2"),
            SER, "--pixel-size 0.2 Å", "0.100127 Å", "--override-pixel-size")
    assert not (tmp_path / "no").exists()
    for out, extra, pixel in (("ds", [], SER_PIXEL_A), ("forced", ["--pixel-size", "0.2", "--override-pixel-size"], 0.2)):
        res = run_cli(cli, tmp_path, "datagen", *args, "--out", tmp_path / out, *extra)
        assert res.returncode == 0, res.stderr
        ((_, arrays, meta),) = iter_dataset(tmp_path / out)
        assert arrays["image.npy"].shape == (1024, 1024) and arrays["mask.npy"].sum() == 100 * 120
        assert meta["source"]["pixel_size_A"] == pytest.approx(pixel, rel=1e-6)


def test_predict_on_a_ser_file_writes_calibrated_outputs_a_table_and_a_tracked_run(files, logged, cli, tmp_path):
    """The SrTiO3 image (0.1001 Å pixels) through a model of 1 Å pixels: outputs at the image's own size and pixel
    size; the model says particle everywhere, so the table holds one particle, the whole field, touching the edge."""
    from mlflow import MlflowClient

    from mlplatform.particles import COLUMNS

    uri, run_id = logged
    out = tmp_path / "out"
    res = run_cli(cli, tmp_path, "experiments", "predict", "--model", run_id, "--tracking-uri", uri, "--input",
                  files / SER, "--out", out, "--track")
    assert res.returncode == 0, res.stderr
    field_nm = 1024 * SER_PIXEL_A / 10
    assert "1 particle(s) in 1 image(s); equivalent diameter median" in res.stdout
    assert "1 touch the image edge" in res.stdout and "(file)" in res.stdout
    stem = out / "16_STOimage_1"
    for suffix, dtype in (("_mask.tif", np.uint8), ("_prob.tif", np.float32)):
        with tifffile.TiffFile(f"{stem}{suffix}") as tif:  # what Fiji reads: ImageJ unit and pixels per unit
            assert tif.is_imagej and tif.imagej_metadata["unit"] == "nm"
            num, den = tif.pages[0].tags["XResolution"].value
            assert den / num == pytest.approx(SER_PIXEL_A / 10, rel=1e-6)
            data = tif.asarray()
        assert data.shape == (1024, 1024) and data.dtype == dtype
        assert read_pages(Path(f"{stem}{suffix}")).pixel_size_A == pytest.approx(SER_PIXEL_A, rel=1e-6)
    assert set(np.unique(tifffile.imread(f"{stem}_mask.tif"))) == {255}
    assert np.asarray(Image.open(f"{stem}_overlay.png")).shape == (1024, 1024, 3)
    with open(out / "particles.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 1
    row = rows[0]
    assert row["image"] == "16_STOimage_1" and row["particle"] == "1" and row["touches_edge"] == "True"
    assert float(row["area_nm2"]) == pytest.approx(field_nm**2, rel=1e-5)
    assert float(row["centroid_row_px"]) == pytest.approx(511.5) and float(row["centroid_col_nm"]) == pytest.approx(
        511.5 * SER_PIXEL_A / 10, rel=1e-5)
    assert (out / "particles.parquet").is_file() and (out / "particle_sizes.png").is_file()

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("predict").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["training_run"] == run_id
    assert run.data.tags["predict.model_uri"].startswith("models:/")
    assert run.data.metrics["particles"] == 1
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    inputs = json.loads((local / "inputs.json").read_text())
    assert inputs == {str((files / SER).resolve()): hashlib.sha256((files / SER).read_bytes()).hexdigest()}
    assert {"particles.csv", "16_STOimage_1_mask.tif", "16_STOimage_1_overlay.png"} <= {
        p.name for p in (local / "outputs").iterdir()}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_predict_names_the_frames_of_a_stack_and_refuses_a_spectrum(files, cli, tmp_path, monkeypatch):
    from mlplatform.predict import predict_path

    model = tmp_path / "model"
    model.mkdir()
    torch.save(_everything_model().state_dict(), model / "weights.pt")
    (model / "metadata.json").write_text(json.dumps(META))
    monkeypatch.setattr(sys, "stderr", Terminal())  # the progress bars show on a terminal only
    records = predict_path(str(model), files / "temp.mrc", tmp_path / "out", None, progress=True)
    assert "predict: 100%" in sys.stderr.getvalue() and "3/3" in sys.stderr.getvalue()
    monkeypatch.undo()
    assert [r["name"] for r in records] == ["temp_frame000", "temp_frame001", "temp_frame002"]
    assert all(r["pixel_size_A"] == pytest.approx(2.0) and r["pixel_size_from"] == "file" for r in records)
    assert np.load(tmp_path / "out" / "temp_frame002_prob.npy").shape == (128, 128)
    refused(run_cli(cli, tmp_path, "experiments", "predict", "--model", model, "--input", files / "08_carbon.dm3",
                    "--out", tmp_path / "no"), "08_carbon.dm3: not a micrograph", "spectrum")
    with pytest.raises(InputError, match="nowhere"):  # --track to a store that cannot be: refused before any work
        predict_path(str(model), files / "temp.mrc", tmp_path / "no", None, tracking_uri="nowhere://x", track=True)
    assert not (tmp_path / "no").exists()
