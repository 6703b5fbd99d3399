"""Refused input leaves nothing behind: ``predict`` (bad images, bad models, bad --out, bad pixel sizes), model files
for ``finetune --from``, and the micrograph readers' size limits (decompression bombs) and damaged files.

The command-line cases run the real command (its ``main`` in a process of its own: conftest's ``cli``) and check the
error convention (docs/architecture.md): exit 2, one stderr line ``error: <what>: <value>: <what is allowed>``, no
traceback, and the folder that would have received the outputs listed identically before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hrtem_core import micrographs
from hrtem_core.errors import InputError
from hrtem_core.micrographs import MAX_FILE_PIXELS, MAX_PIXELS, read_pages

META = {"preset": "compact", "pixel_size_A": 0.2, "normalization": {"kind": "per_image_zscore"}}


_FORKS = {}


@pytest.fixture(autouse=True)
def _commands(cli, tmp_path_factory):
    """Where run_cli runs its commands: conftest's ``cli`` (each command's ``main`` in a process of its own)."""
    _FORKS.update(server=cli, folders=tmp_path_factory)


def run_cli(package: str, *args) -> subprocess.CompletedProcess:
    """``python -m <package> <args>`` in a fresh working folder of its own."""
    return _FORKS["server"].run([package, *map(str, args)], _FORKS["folders"].mktemp("cli"), timeout_s=300)


def listing(folder: Path) -> list[tuple[str, int]]:
    """Every path below ``folder`` (hidden ones included) with its size: what a command must leave as it was."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


def refused(res: subprocess.CompletedProcess, *words: str) -> str:
    """The one error line of a refused command (exit 2, no traceback), which must contain ``words``."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# -- crafted files ---------------------------------------------------------------------------------------------------

def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid PNG whose header claims ``width`` x ``height`` 8-bit gray pixels, with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def npy_bomb(path: Path, shape: tuple[int, ...], descr: str = "<f4") -> Path:
    """A .npy whose header claims ``shape`` and that holds 16 bytes of data."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": shape})
        fh.write(b"\0" * 16)
    return path


def tiff_bomb(path: Path, side: int = 65535) -> Path:
    """A 16 x 16 TIFF whose ImageWidth and ImageLength tags are patched to claim ``side`` x ``side``."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8))
    with tifffile.TiffFile(path) as tif:
        assert tif.byteorder == "<"
        tags = tif.pages[0].tags
        patches = [(tags[name].valueoffset, "<H" if tags[name].dtype == 3 else "<I")
                   for name in ("ImageWidth", "ImageLength")]
    with open(path, "r+b") as fh:
        for offset, fmt in patches:
            fh.seek(offset)
            fh.write(struct.pack(fmt, side))
    return path


def truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


class MakesAFolder:
    """Pickled, it makes a folder when unpickled: weights-only loading must never run it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


# -- fixtures --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model folder as ``predict --model PATH`` takes it: compact weights (random) and their metadata."""
    from mlplatform.models import build_model

    folder = tmp_path_factory.mktemp("model") / "compact"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(build_model("compact").state_dict(), folder / "weights.pt")
    (folder / "metadata.json").write_text(json.dumps(META))
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """An existing, empty MLflow tracking store (sqlite)."""
    from mlplatform.store import ensure_store

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    ensure_store(uri)
    return uri


def good_input(folder: Path, n: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(folder / f"good{i}.npy", rng.normal(100, 10, (40, 44)).astype(np.float32))
    return folder


def predict_refused(tmp_path: Path, model, inputs: Path, *words: str, out: Path | None = None,
                    pixel_size: str = "0.2") -> str:
    """Run predict, check it is refused with ``words`` and leaves the output's parent folder as it was."""
    out = out or tmp_path / "results" / "masks"
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    before = listing(parent)
    line = refused(run_cli("experiments", "predict", "--model", model, "--input", inputs, "--out", out,
                           "--pixel-size", pixel_size), *words)
    assert listing(parent) == before
    return line


# -- predict: inputs -------------------------------------------------------------------------------------------------

def test_bad_images_among_good_ones_are_all_reported_and_nothing_is_written(model_dir, tmp_path):
    inputs = good_input(tmp_path / "in", n=2)
    Image.fromarray(np.zeros((40, 44), np.uint8)).save(inputs / "b.png")
    truncated(inputs / "b.png")
    np.save(inputs / "c.npy", np.ones((40, 44), np.float32))
    truncated(inputs / "c.npy", 0.8)
    line = predict_refused(tmp_path, model_dir, inputs, "2 of 4 micrograph file(s) cannot be used", "b.png: unreadable",
                           "c.npy: truncated")
    assert "good0" not in line and "good1" not in line


def test_a_decompression_bomb_is_refused_before_decoding(model_dir, tmp_path):
    inputs = good_input(tmp_path / "in")
    npy_bomb(inputs / "bomb.npy", (200_000, 200_000))  # 160 GB as float32, in a 144-byte file
    predict_refused(tmp_path, model_dir, inputs, "bomb.npy: image of 200000 x 200000 pixels", f"{MAX_PIXELS:,}")


def test_out_is_a_file(model_dir, tmp_path):
    inputs = good_input(tmp_path / "in")
    out = tmp_path / "results" / "masks.txt"
    out.parent.mkdir()
    out.write_text("keep me")
    predict_refused(tmp_path, model_dir, inputs, f"predict --out: {out}: is a file; give a folder", out=out)
    assert out.read_text() == "keep me"


def test_a_pixel_size_that_would_resample_beyond_the_limit(model_dir, tmp_path):
    inputs = good_input(tmp_path / "in")
    predict_refused(tmp_path, model_dir, inputs, "good0.npy: 40 x 44 pixels of 1000 Å become", "check --pixel-size",
                    pixel_size="1000")


def test_a_negative_pixel_size_is_refused_by_the_parser(model_dir, tmp_path):
    inputs = good_input(tmp_path / "in")
    (tmp_path / "results").mkdir()
    res = run_cli("experiments", "predict", "--model", model_dir, "--input", inputs, "--out",
                  tmp_path / "results" / "m", "--pixel-size", "-1")
    # argparse's own convention (usage, then the error naming the option), not a one-line InputError
    assert res.returncode == 2 and "--pixel-size" in res.stderr and "Traceback" not in res.stderr
    assert not any((tmp_path / "results").iterdir())


def test_an_existing_folder_is_left_as_it_was_on_refusal(model_dir, tmp_path):
    inputs = good_input(tmp_path / "in")
    np.save(inputs / "nan.npy", np.full((8, 8), np.nan, np.float32))
    out = tmp_path / "results" / "masks"
    out.mkdir(parents=True)
    (out / "earlier_mask.png").write_bytes(b"earlier")
    predict_refused(tmp_path, model_dir, inputs, "nan.npy: has non-finite values", out=out)


# -- predict: models -------------------------------------------------------------------------------------------------

def _break_model(folder: Path, case: str, tmp_path: Path) -> None:
    weights, meta = folder / "weights.pt", folder / "metadata.json"
    if case == "truncated weights":
        truncated(weights)
    elif case == "not a torch file":
        weights.write_text("these are not weights")
    elif case == "pickled code":
        torch.save({"x": MakesAFolder(tmp_path / "pwned")}, weights)
    elif case == "weights of another architecture":
        state = torch.load(weights, weights_only=True)
        first, second = list(state)[:2]
        del state[first]
        state[second] = torch.zeros(3, 3)
        torch.save(state, weights)
    elif case == "no metadata":
        meta.unlink()
    elif case == "corrupt metadata":
        meta.write_text('{"preset": "compact", ')
    elif case == "unknown preset":
        meta.write_text(json.dumps({**META, "preset": "vit-huge"}))
    else:
        raise AssertionError(case)


MODEL_CASES = [
    ("truncated weights", ["weights.pt: truncated, corrupt or not a PyTorch weights file"]),
    ("not a torch file", ["weights.pt", "not a PyTorch weights file"]),
    ("pickled code", ["weights.pt: holds Python objects other than tensors", "nothing was run"]),
    ("weights of another architecture", ["weights.pt: the weights do not fit preset 'compact'", "1 missing",
                                         "1 of another shape"]),
    ("no metadata", ["metadata.json: no such file"]),
    ("corrupt metadata", ["metadata.json: not valid JSON"]),
    ("unknown preset", ["metadata.json: preset 'vit-huge' is unknown; known presets: compact"]),
]


@pytest.mark.parametrize("case, words", MODEL_CASES, ids=[c for c, _ in MODEL_CASES])
def test_a_broken_model_folder_is_named_and_refused(model_dir, tmp_path, case, words):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    _break_model(model, case, tmp_path)
    predict_refused(tmp_path, model, good_input(tmp_path / "in"), *words)
    assert not (tmp_path / "pwned").exists()


def test_a_run_id_that_is_not_in_the_store(model_dir, store, tmp_path):
    res = run_cli("experiments", "predict", "--model", "0123456789abcdef0123456789abcdef", "--input",
                  good_input(tmp_path / "in"), "--out", tmp_path / "out", "--tracking-uri", store)
    refused(res, "model '0123456789abcdef0123456789abcdef': run 0123456789abcdef0123456789abcdef could not be read")
    assert not (tmp_path / "out").exists()


def test_a_model_uri_that_is_not_in_the_store(model_dir, store, tmp_path):
    res = run_cli("experiments", "predict", "--model", "models:/no-such-model/3", "--input",
                  good_input(tmp_path / "in"), "--out", tmp_path / "out", "--tracking-uri", store)
    refused(res, "model 'models:/no-such-model/3'", "could not be fetched")
    assert not (tmp_path / "out").exists()


def test_a_run_id_with_a_store_that_does_not_exist_creates_none(tmp_path):
    (tmp_path / "store").mkdir()
    res = run_cli("experiments", "predict", "--model", "0123456789abcdef0123456789abcdef", "--input",
                  good_input(tmp_path / "in"), "--out", tmp_path / "out", "--tracking-uri",
                  f"sqlite:///{tmp_path}/store/mlflow.db")
    refused(res, "the tracking store", "does not exist")
    assert not any((tmp_path / "store").iterdir()) and not (tmp_path / "out").exists()


# -- predict: what is written ----------------------------------------------------------------------------------------

def test_outputs_appear_whole_in_a_new_or_an_existing_folder(model_dir, tmp_path):
    from mlplatform.predict import predict_path

    inputs = good_input(tmp_path / "in", n=2)
    new = tmp_path / "a" / "b" / "new"  # parents created only when the outputs are moved into place
    records = predict_path(str(model_dir), inputs, new, 0.2)
    assert [Path(r["outputs"]["mask_png"]).parent for r in records] == [new, new]
    per_image = ("mask.tif", "prob.tif", "overlay.png", "mask.npy", "mask.png", "prob.npy")
    assert sorted(p.name for p in new.iterdir()) == sorted([*(f"good{i}_{k}" for i in range(2) for k in per_image),
                                                            "particles.csv", "particles.parquet", "particle_sizes.png"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "good0_mask.png").write_bytes(b"stale")
    (existing / "notes.txt").write_text("mine")
    predict_path(str(model_dir), inputs, existing, 0.2)
    names = sorted(p.name for p in existing.iterdir())
    assert names == sorted(["notes.txt", *(p.name for p in new.iterdir())])  # no staging folder left
    assert (existing / "notes.txt").read_text() == "mine"
    assert np.asarray(Image.open(existing / "good0_mask.png")).shape == (40, 44)  # replaced


def test_a_failure_while_predicting_leaves_nothing(model_dir, tmp_path, monkeypatch):
    from mlplatform import predict

    inputs = good_input(tmp_path / "in", n=3)
    calls = []
    real = predict.predict_array

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "predict_array", failing)
    before = listing(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        predict.predict_path(str(model_dir), inputs, tmp_path / "x" / "out", 0.2)
    assert listing(tmp_path) == before
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        predict.predict_path(str(model_dir), inputs, existing, 0.2)
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


# -- finetune --from -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_from_a_broken_model_is_refused_before_any_run(model_dir, store, tmp_path):
    from mlflow import MlflowClient

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    _break_model(model, "weights of another architecture", tmp_path)
    config = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "au-small-finetune.yaml"
    res = run_cli("experiments", "finetune", "--config", config, "--from", model, "--tracking-uri", store, "--quiet")
    refused(res, "weights.pt: the weights do not fit preset 'compact'")
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []


# -- the readers: limits and damaged files (in process: the same function serves import and predict) --------------

def test_the_limit_is_ours_for_every_format():
    assert MAX_PIXELS < 2 * Image.MAX_IMAGE_PIXELS  # below Pillow's own refusal: one limit, one message
    assert MAX_PIXELS <= MAX_FILE_PIXELS


@pytest.mark.parametrize("make", [
    lambda p: png_bomb(p / "x.png", 100_000, 100_000),  # Pillow refuses it first: our message all the same
    lambda p: png_bomb(p / "x.png", 12_000, 12_000),  # above our limit, below Pillow's refusal (only its warning)
    lambda p: npy_bomb(p / "x.npy", (100_000, 100_000)),
    lambda p: tiff_bomb(p / "x.tif"),
], ids=["png-huge", "png-between-limits", "npy", "tiff"])
def test_readers_refuse_images_over_the_limit_before_decoding(tmp_path, make):
    path = make(tmp_path)
    assert path.stat().st_size < 4096
    with pytest.raises(InputError, match=rf"^{path.name}: image of \d+ x \d+ pixels \([\d,]+\): more than the "
                                         rf"{MAX_PIXELS:,} pixels .*MAX_PIXELS"):
        read_pages(path, path.name)


def test_a_stack_over_the_file_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(micrographs, "MAX_FILE_PIXELS", 3 * 16 * 16)
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((4, 16, 16), np.uint16), photometric="minisblack")
    npy_bomb(tmp_path / "s.npy", (4, 16, 16))
    for name in ("s.tif", "s.npy"):
        with pytest.raises(InputError, match=rf"{name}: stack of 4 pages \(1,024 pixels in all\).*MAX_FILE_PIXELS"):
            read_pages(tmp_path / name, name)


def test_damaged_and_unsafe_files_are_named(tmp_path):
    def fails(name: str, pattern: str) -> None:
        with pytest.raises(InputError, match=pattern):
            read_pages(tmp_path / name, name)

    np.save(tmp_path / "objects.npy", np.array([MakesAFolder(tmp_path / "pwned")], dtype=object), allow_pickle=True)
    fails("objects.npy", r"^objects\.npy: unsupported value type object")
    assert not (tmp_path / "pwned").exists()
    np.save(tmp_path / "short.npy", np.ones((64, 64), np.float32))
    truncated(tmp_path / "short.npy")
    fails("short.npy", r"^short\.npy: truncated: its header promises \(64, 64\) float32 \(16,384 bytes")
    (tmp_path / "text.npy").write_text("not numpy")
    fails("text.npy", r"^text\.npy: not a \.npy file")
    tifffile.imwrite(tmp_path / "t.tif", np.ones((64, 64), np.float32))
    truncated(tmp_path / "t.tif", 0.6)
    fails("t.tif", r"^t\.tif: unreadable: truncated, corrupt or not a TIF file")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 251).save(tmp_path / "p.png")
    truncated(tmp_path / "p.png", 0.7)
    fails("p.png", r"^p\.png: unreadable: truncated, corrupt or not a PNG file")


# -- datagen import --------------------------------------------------------------------------------------------------

def test_import_refuses_a_bomb_and_writes_nothing(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    tifffile.imwrite(images / "a.tif", np.ones((32, 32), np.uint16))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "a.png")
    png_bomb(images / "b.png", 100_000, 100_000)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "b_mask.png")
    before = listing(tmp_path)
    res = run_cli("datagen", "import", "--images", images, "--masks", masks, "--pixel-size", "0.4", "--out",
                  tmp_path / "ds")
    refused(res, "b.png: image of 100000 x 100000 pixels", "MAX_PIXELS")
    assert listing(tmp_path) == before
