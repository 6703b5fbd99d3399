"""Verified reads: training checks every shard against its manifest's sha256 before any run exists (hashed while
scanned, cached by path, size and mtime), manifests are validated when read, and what the loaders decode is checked.
Errors name the dataset or manifest, the shard or key, and what differs; the command lines print one ``error:`` line
and exit 2."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

import hrtem_core.dataset as dataset
from hrtem_core.config import set_dotted
from hrtem_core.dataset import (DatasetError, content_hash, file_sha256, load_npy, npy_bytes, sample_hash,
                                verify_dataset, write_shard)
from hrtem_core.errors import InputError
from hrtem_core.shard_hashes import ShardHashCache
from mlplatform.config import config_from_dict
from mlplatform.curation import scan_dataset
from mlplatform.data import DataError, read_samples
from mlplatform.train import train


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test gets its own shard-hash cache (never the user's ~/.cache)."""
    folder = tmp_path / "hash-cache"
    monkeypatch.setenv("HRTEM_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def sources(tiny_dataset):
    return {"train": tiny_dataset(8, 31), "bench": tiny_dataset(4, 32)}  # 2 + 1 shards of 4 samples, 64 px


@pytest.fixture
def data(sources, tmp_path) -> dict[str, Path]:
    """Private copies of the datasets, free to corrupt."""
    out = {}
    for name, src in sources.items():
        out[name] = tmp_path / name
        shutil.copytree(src, out[name])
    return out


def _config(data, **over):
    cfg = {"seed": 0, "epochs": 1,
           "data": {"train": [{"path": str(data["train"])}], "val_fraction": 0.5, "crop_px": 32, "batch_size": 2,
                    "steps_per_epoch": 1, "eval_batch_size": 4},
           "benchmarks": [{"name": "bench", "path": str(data["bench"])}],
           "model": {"preset": "compact"},
           "tracking": {"experiment": "verified", "n_prediction_images": 0, "system_metrics": False}}
    for key, value in over.items():
        set_dotted(cfg, key, value)
    return cfg


def _store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _runs(store: str) -> list:
    client = MlflowClient(store)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def _cli(cli, tmp_path: Path, module: str, *args) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` (its ``main`` in a process of its own: conftest's ``cli``), in ``tmp_path``, with
    this test's environment (its own shard-hash cache)."""
    return cli.run([module, *map(str, args)], tmp_path, timeout_s=900)


def _train_cli(cli, cfg: dict, tmp_path: Path, store: str) -> subprocess.CompletedProcess:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return _cli(cli, tmp_path, "experiments", "train", "--config", path, "--tracking-uri", store, "--quiet")


def _refused(res: subprocess.CompletedProcess, *needles: str) -> str:
    """A command refused its input the way every command does: exit 2, one error line, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "error:" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr[-3000:])
    return res.stderr


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, manifest) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest))


def _flip_image_byte(shard: Path) -> str:
    """Flip one byte inside the pixels of the shard's first image (the tar stays readable); returns that key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".image.npy"))
    with open(shard, "r+b") as fh:
        fh.seek(member.offset_data + 200)  # past the 128-byte .npy header
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return member.name.split(".")[0]


def _rebuild_shard(root: Path, index: int, change) -> str:
    """Rewrite shard ``index`` with ``change(key, fields) -> fields`` applied to its first sample, and a manifest
    whose shard sha256 (and, where the arrays still decode, sample and content hashes) match: only the decode checks
    can find what changed. Returns the changed sample's key."""
    manifest = _manifest(root)
    entry = manifest["shards"][index]
    samples = list(dataset.iter_tar_samples(root / entry["name"]))
    key = samples[0][0]
    records = []
    for k, fields in samples:
        if k == key:
            fields = change(k, dict(fields))
        records.append({"__key__": k, **fields})
    write_shard(root / entry["name"], records)
    entry["sha256"] = file_sha256(root / entry["name"])
    try:
        arrays = {name: np.load(io.BytesIO(records[0][name])) for name in ("image.npy", "mask.npy")}
        digest = sample_hash(key, arrays, json.loads(records[0]["json"]))
        entry["samples"] = [[k, digest if k == key else h] for k, h in entry["samples"]]
        manifest["content_hash"] = content_hash(tuple(s) for shard in manifest["shards"] for s in shard["samples"])
    except (ValueError, KeyError):
        pass  # not decodable: the manifest's sample hash stays (verify refuses the sample either way)
    _write_manifest(root, manifest)
    return key


# -------------------------------------------------------------------------------------------- a shard that changed
def test_a_flipped_byte_fails_training_before_any_run(cli, data, tmp_path):
    shard = data["train"] / "shard-000001.tar"
    key = _flip_image_byte(shard)
    store = _store(tmp_path)
    with pytest.raises(InputError) as err:  # a DatasetError, which training reports under the config key
        train(config_from_dict(_config(data)), tracking_uri=store, progress=False)
    message = str(err.value)
    assert "data.train.0.path" in message
    assert str(data["train"]) in message and "shard-000001.tar" in message and "sha256" in message
    assert _manifest(data["train"])["shards"][1]["sha256"][:16] in message  # what differs: both digests
    assert _runs(store) == []  # refused before the MLflow run existed: no provenance to get wrong

    _refused(_train_cli(cli, _config(data), tmp_path, store), "shard-000001.tar", str(data["train"]))
    assert _runs(store) == []
    _refused(_cli(cli, tmp_path, "datagen", "verify", data["train"]), f"shard shard-000001.tar, sample {key}")


def test_a_changed_benchmark_shard_is_refused_too(data, tmp_path):
    _flip_image_byte(data["bench"] / "shard-000000.tar")
    store = _store(tmp_path)
    with pytest.raises(InputError, match=r"benchmarks\.0\.path.*bench.*shard-000000\.tar.*does not match the manifest"):
        train(config_from_dict(_config(data)), tracking_uri=store, progress=False)
    assert _runs(store) == []


# ---------------------------------------------------------------------------------------------------- the cache
class _CountingReader(dataset._HashingReader):
    opened: list = []

    def __init__(self, fh):
        super().__init__(fh)
        type(self).opened.append(getattr(fh, "name", "?"))


@pytest.fixture
def hashed(monkeypatch) -> list:
    """The files hashed from now on (every streamed, hashing read of a shard)."""
    _CountingReader.opened = []
    monkeypatch.setattr(dataset, "_HashingReader", _CountingReader)
    return _CountingReader.opened


def test_an_unchanged_dataset_is_hashed_once(data, hashed, cache_dir):
    root = data["train"]
    shards = sorted(str(p) for p in root.glob("shard-*.tar"))
    first = scan_dataset(root)
    assert sorted(hashed) == shards  # hashed while scanned: one pass per shard
    cached = json.loads((cache_dir / "shard-hashes.json").read_text())["files"]
    manifest = _manifest(root)
    assert {Path(p).name: e["sha256"] for p, e in cached.items()} == {s["name"]: s["sha256"]
                                                                      for s in manifest["shards"]}
    assert {p: e["size"] for p, e in cached.items()} == {p: os.path.getsize(p) for p in shards}

    hashed.clear()
    again = scan_dataset(root)  # a new process would read the same file: nothing is hashed again
    assert hashed == [] and [r.key for r in again.records] == [r.key for r in first.records]

    # a file whose mtime changed is hashed again (and, unchanged in content, still accepted)
    st = os.stat(shards[0])
    os.utime(shards[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    scan_dataset(root)
    assert hashed == [shards[0]]

    # a file whose content changed is hashed again and refused, though the cache held a good digest for it
    hashed.clear()
    _flip_image_byte(Path(shards[1]))
    with pytest.raises(DatasetError, match="shard-000001.tar"):
        scan_dataset(root)
    assert hashed == [shards[1]]
    hashed.clear()  # and the bad digest is remembered: refused again without hashing
    with pytest.raises(DatasetError, match="shard-000001.tar"):
        scan_dataset(root)
    assert hashed == []


def test_a_corrupt_cache_file_is_ignored_and_replaced(data, hashed, cache_dir):
    cache_dir.mkdir()
    (cache_dir / "shard-hashes.json").write_text('{"version": 1, "files": {"/x": {"size": "no"}} trailing')
    assert scan_dataset(data["train"]).n_samples == 8
    assert len(hashed) == 2
    assert len(json.loads((cache_dir / "shard-hashes.json").read_text())["files"]) == 2


def test_two_writers_of_the_cache_keep_each_others_entries(data, tmp_path):
    path = tmp_path / "c" / "shard-hashes.json"
    a, b = ShardHashCache(path), ShardHashCache(path)  # two processes, both loaded before either saved
    shards = sorted((data["train"]).glob("shard-*.tar")) + sorted((data["bench"]).glob("shard-*.tar"))
    for cache, shard in ((a, shards[0]), (b, shards[1]), (b, shards[2])):
        cache.record(shard, os.stat(shard), file_sha256(shard))
    a.save()
    b.save()
    saved = json.loads(path.read_text())["files"]
    assert sorted(saved) == sorted(str(s.resolve()) for s in shards)
    assert ShardHashCache(path).lookup(shards[0], os.stat(shards[0])) == file_sha256(shards[0])
    shards[0].unlink()  # entries of files that are gone are dropped at the next save
    b.record(shards[1], os.stat(shards[1]), file_sha256(shards[1]))
    b.save()
    assert str(shards[0].resolve()) not in json.loads(path.read_text())["files"]


# ---------------------------------------------------------------------------------------------- manifest schema
BAD_MANIFESTS = {
    "a list": (lambda m: [m], "JSON object"),
    "empty": (lambda m: {}, "'shards' is missing"),
    "no shards": (lambda m: {k: v for k, v in m.items() if k != "shards"}, "'shards' is missing"),
    "traversal": (lambda m: {**m, "shards": [{**m["shards"][0], "name": "../outside.tar"}, *m["shards"][1:]]},
                  "'shards[0].name' '../outside.tar' is not allowed"),
    "short sha256": (lambda m: {**m, "shards": [{**m["shards"][0], "sha256": "abc"}, *m["shards"][1:]]},
                     "'shards[0].sha256'"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_manifest_of_the_wrong_shape_is_refused(cli, case, data, tmp_path):
    change, key = BAD_MANIFESTS[case]
    root = data["train"]
    if case == "traversal":  # a real file outside the dataset, which a reader must never reach
        shutil.copy(root / "shard-000000.tar", tmp_path / "outside.tar")
    _write_manifest(root, change(_manifest(root)))
    where = str(root / "manifest.json")
    with pytest.raises(DatasetError, match="must|is not allowed|missing") as err:
        verify_dataset(root)
    assert where in str(err.value) and key in str(err.value)
    _refused(_cli(cli, tmp_path, "datagen", "verify", root), where, key)
    store = _store(tmp_path)
    with pytest.raises(InputError) as err:
        train(config_from_dict(_config(data)), tracking_uri=store, progress=False)
    assert where in str(err.value) and key in str(err.value) and "data.train.0.path" in str(err.value)
    assert _runs(store) == []
    if case == "traversal":
        _refused(_train_cli(cli, _config(data), tmp_path, store), where, key)
        assert _runs(store) == []


# ----------------------------------------------------------------------------------------------- checked decode
def _mask_255(key, fields):
    mask = load_npy(fields["mask.npy"]) * np.uint8(255)
    return {**fields, "mask.npy": npy_bytes(mask)}


def test_a_mask_of_0_255_is_refused_naming_the_sample(cli, data, tmp_path):
    key = _rebuild_shard(data["bench"], 0, _mask_255)
    assert scan_dataset(data["bench"]).n_samples == 4  # every hash matches: only decoding can tell
    _refused(_cli(cli, tmp_path, "datagen", "verify", data["bench"]),
             f"sample {key}: mask values must be 0 or 1, found 255")
    store = _store(tmp_path)
    with pytest.raises(DataError, match=rf"bench/shard-000000\.tar, sample {key}: mask values must be 0 or 1"):
        train(config_from_dict(_config(data)), tracking_uri=store, progress=False)
    assert [r.info.status for r in _runs(store)] == ["FAILED"]  # read once training ran: the run says why
    assert f"sample {key}" in _runs(store)[0].data.tags["failure_reason"]
    # a loader worker's error too reaches the user as one line (torch re-raises it with the worker's traceback)
    cfg = _config(data, **{"data.num_workers": 1})
    res = _refused(_train_cli(cli, cfg, tmp_path, store), f"sample {key}: mask values must be 0 or 1",
                   "shard-000000.tar")
    assert str(data["bench"]) in res
    assert [r.info.status for r in _runs(store)] == ["FAILED", "FAILED"]


def _corrupt_mask_header(key, fields):
    data = bytearray(fields["mask.npy"])
    data[12:24] = b"%%%%garbage%"  # inside the header's dict
    return {**fields, "mask.npy": bytes(data)}


def test_a_corrupt_npy_header_is_refused_naming_the_sample(cli, data, tmp_path):
    key = _rebuild_shard(data["bench"], 0, _corrupt_mask_header)
    index = scan_dataset(data["bench"])
    cfg = config_from_dict(_config(data))
    with pytest.raises(DataError, match=rf"shard-000000\.tar, sample {key}, mask\.npy: not a valid \.npy array"):
        read_samples(index.records, cfg.data)
    _refused(_cli(cli, tmp_path, "datagen", "verify", data["bench"]),
             f"shard shard-000000.tar, sample {key}, mask.npy")
    store = _store(tmp_path)
    with pytest.raises(DataError, match=rf"sample {key}, mask\.npy"):
        train(config_from_dict(_config(data, **{"tracking.n_prediction_images": 4})), tracking_uri=store,
              progress=False)
    assert _runs(store) == []  # the prediction panels' samples are read before the run exists


def test_a_sample_without_its_mask_is_refused_naming_the_sample(cli, data, tmp_path):
    key = _rebuild_shard(data["bench"], 0, lambda k, f: {n: v for n, v in f.items() if n != "mask.npy"})
    index = scan_dataset(data["bench"])
    with pytest.raises(DataError, match=rf"shard-000000\.tar, sample {key}: has no mask\.npy member") as err:
        read_samples(index.records, config_from_dict(_config(data)).data)
    assert str(data["bench"]) in str(err.value) and isinstance(err.value, InputError)
    _refused(_cli(cli, tmp_path, "datagen", "verify", data["bench"]), f"sample {key}: missing mask.npy")


def test_decode_checks_shapes_and_dtypes():
    from mlplatform.data import _decode

    def sample(image, mask):
        return {"__url__": "/d/shard-000007.tar", "__key__": "0000003_01", "image.npy": npy_bytes(image),
                "mask.npy": npy_bytes(mask)}

    image = np.zeros((8, 8), np.float32)
    assert _decode(sample(image, np.ones((8, 8), bool)))[1].dtype == bool
    for mask, problem in ((np.zeros((8, 9), np.uint8), r"mask shape \(8, 9\) differs from the image's \(8, 8\)"),
                          (np.zeros((8, 8), np.float32), "mask must be uint8 .0/1. or bool, got float32"),
                          (np.full((8, 8), 2, np.uint8), "mask values must be 0 or 1, found 2")):
        with pytest.raises(DataError, match=rf"shard /d/shard-000007\.tar, sample 0000003_01: {problem}"):
            _decode(sample(image, mask))
    with pytest.raises(DataError, match=r"image must be 2-D \[H, W\], got shape \(1, 8, 8\)"):
        _decode(sample(image[None], np.zeros((1, 8, 8), np.uint8)))
    with pytest.raises(DataError, match=r"sample 0000003_01, image\.npy: not a \.npy array"):
        _decode({**sample(image, np.zeros((8, 8), np.uint8)), "image.npy": b"not an array"})
