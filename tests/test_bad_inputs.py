"""The bad-input suite: every command, fed input it cannot use, says so in one line and changes nothing.

Each case runs the command line (its ``main``, in a process of its own: conftest's ``cli``, a
:class:`cli_forkserver.ForkServer`) in a fresh folder (its working directory) next to the shared tiny datasets, with
its own tracking store, sweep claims database and study journal there, and asserts the contract of
docs/architecture.md "Errors":

* exit status 2;
* exactly one stderr line that starts with ``error: `` and holds the case's words (what, the value, what is allowed);
* no Python traceback;
* nothing left behind: the case folder and the datasets hold exactly the files they held before (a refused
  ``--out`` is not created, no temporary or partial file survives, the data are not touched);
* no MLflow run (and no experiment beyond MLflow's Default) in the tracking store, no sweep claim, no study trial.

The cases are a table (``CASES``); with ``BAD_INPUT_TABLE=FILE`` each passing case appends its command, exit status and
error line to FILE (JSON lines), from which the table of a closing note is made.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from benchmarks.services import free_loopback_port
from cli_forkserver import _env

RUN_ID = "0123456789abcdef0123456789abcdef"


@dataclass
class Case:
    id: str
    argv: list[str]  # after `python -m`; {ws} the datasets, {tmp} the case folder, {store} its tracking URI
    words: list[str]  # in the error line (formatted like argv)
    setup: Callable[[Path, Path], None] | None = None  # (tmp, ws): the bad input, made before the snapshot
    tracking: bool = True  # append --tracking-uri {store}


# -- inputs the cases make -------------------------------------------------------------------------------------------

def _write(rel: str, text: str):
    def make(tmp: Path, ws: Path):
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return make


def _config(rel: str = "c.yaml", drop: tuple[str, ...] = (), **changes):
    """The workspace's base config with top-level ``changes`` (dotted keys go one level down) and ``drop``ped keys."""
    def make(tmp: Path, ws: Path):
        data = yaml.safe_load((ws / "base.yaml").read_text())
        for key, value in changes.items():
            if "__" in key:
                top, sub = key.split("__", 1)
                data[top][sub] = value
            else:
                data[key] = value
        for key in drop:
            data.pop(key, None)
        (tmp / rel).write_text(yaml.safe_dump(data))
    return make


def _copy_dataset(name: str = "train", rel: str = "data"):
    def make(tmp: Path, ws: Path):
        shutil.copytree(ws / name, tmp / rel)
    return make


def _both(*makers):
    def make(tmp: Path, ws: Path):
        for m in makers:
            m(tmp, ws)
    return make


def _manifest(edit: Callable[[dict], object], rel: str = "data"):
    """A copy of the train dataset whose manifest is ``edit(manifest)`` (JSON), or the text it returns."""
    def make(tmp: Path, ws: Path):
        _copy_dataset(rel=rel)(tmp, ws)
        path = tmp / rel / "manifest.json"
        out = edit(json.loads(path.read_text()))
        path.write_text(out if isinstance(out, str) else json.dumps(out))
    return make


def _flip_byte(rel: str = "data", shard: str = "shard-000001.tar", offset: int = 1200):
    def make(tmp: Path, ws: Path):
        if not (tmp / rel).exists():
            _copy_dataset(rel=rel)(tmp, ws)
        path = tmp / rel / shard
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    return make


def _damage_member(suffix: str, offset: int, value: int, vouch: bool = False, rel: str = "data",
                   shard: str = "shard-000001.tar"):
    """A copy of the train dataset whose first ``<key><suffix>`` member of ``shard`` has byte ``offset`` of its data
    set to ``value``. The manifest is left as it was (reading the sample finds it before the shard's sha256 does), or,
    with ``vouch``, gets the damaged shard's sha256 (so that only reading the sample can find it)."""
    def make(tmp: Path, ws: Path):
        import hashlib
        import tarfile

        _copy_dataset(rel=rel)(tmp, ws)
        path = tmp / rel / shard
        with tarfile.open(path) as tar:
            member = next(m for m in tar if m.name.endswith(suffix))
        data = bytearray(path.read_bytes())
        data[member.offset_data + offset] = value
        path.write_bytes(bytes(data))
        if vouch:
            manifest = json.loads((tmp / rel / "manifest.json").read_text())
            for entry in manifest["shards"]:
                if entry["name"] == shard:
                    entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
            (tmp / rel / "manifest.json").write_text(json.dumps(manifest))
    return make


# the '{' that opens an image's .npy header (10 bytes in) with its bits flipped: numpy's header reader fails in
# Python's tokenizer (TokenError), not with a ValueError
_NPY_HEADER_FLIPPED = _damage_member(".image.npy", 10, ord("{") ^ 0xFF)
# a byte that is never UTF-8 inside a sample's metadata
_JSON_NOT_UTF8 = _damage_member(".json", 1, 0xFF)


def _truncate(rel: str = "data", shard: str = "shard-000001.tar"):
    def make(tmp: Path, ws: Path):
        _copy_dataset(rel=rel)(tmp, ws)
        path = tmp / rel / shard
        path.write_bytes(path.read_bytes()[:3000])
    return make


def _bomb_member(rel: str = "data", shard: str = "shard-000001.tar"):
    """A copy of the train dataset whose shard holds an image .npy claiming 160 GB, with the shard's sha256 updated in
    the manifest (so that only decoding can find it)."""
    def make(tmp: Path, ws: Path):
        import hashlib
        import io
        import tarfile

        _copy_dataset(rel=rel)(tmp, ws)
        path, bomb = tmp / rel / shard, tmp / "bomb.npy"
        _npy_bomb(bomb)
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w") as tar:
            done = False
            for m, data in members:
                if not done and m.name.endswith(".image.npy"):
                    data, done = bomb.read_bytes(), True
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
        bomb.unlink()
        manifest = json.loads((tmp / rel / "manifest.json").read_text())
        for entry in manifest["shards"]:
            if entry["name"] == shard:
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (tmp / rel / "manifest.json").write_text(json.dumps(manifest))
    return make


def _shard_field(key, value, index=0):
    def edit(m):
        m["shards"][index][key] = value
        return m
    return edit


def _sweep(rel="s.yaml", **changes):
    def make(tmp: Path, ws: Path):
        spec = {"kind": "sweep", "name": "bad", "base": str(ws / "base.yaml"), "seeds": [0],
                "subsets": [{"name": "all", "set": {}}], **changes}
        (tmp / rel).write_text(yaml.safe_dump(spec))
    return make


def _study(rel="st.yaml", **changes):
    def make(tmp: Path, ws: Path):
        spec = {"kind": "study", "name": "bad", "base": str(ws / "base.yaml"), "n_trials": 1,
                "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
                "objective": {"metric": "ood/mean/dice", "aggregate": "final", "direction": "maximize"}, **changes}
        (tmp / rel).write_text(yaml.safe_dump(spec))
    return make


def _images(rel="imgs", n=2, shape=(64, 64), bad: Callable[[Path], None] | None = None):
    """A folder of ``n`` float .npy micrographs (then ``bad(folder)`` adds the bad one)."""
    def make(tmp: Path, ws: Path):
        folder = tmp / rel
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            np.save(folder / f"img{i}.npy", rng.random(shape, dtype=np.float32))
        if bad is not None:
            bad(folder)
    return make


def _npy_bomb(path: Path):
    """A .npy whose header claims 200000 x 200000 float32 (160 GB) over a few bytes."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (200000, 200000), }"
    header += " " * (118 - len(header)) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 64)


def _masks_for(images="imgs", masks="masks", values=(0, 1)):
    def make(tmp: Path, ws: Path):
        out = tmp / masks
        out.mkdir(parents=True, exist_ok=True)
        for img in sorted((tmp / images).glob("*.npy")):
            m = np.zeros(np.load(img).shape, np.uint8)
            m[10:20, 10:20] = values[1]
            np.save(out / img.name, m)
    return make


def _file(rel: str, data: bytes = b"not what you think\n"):
    def make(tmp: Path, ws: Path):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    return make


def _model_folder(rel="model", weights: bytes | Callable[[], bytes] | None = b"truncated", metadata: str | None = None):
    """A model folder (as `predict --model PATH` takes), with broken contents unless given real ``weights``."""
    def make(tmp: Path, ws: Path):
        folder = tmp / rel
        folder.mkdir(parents=True)
        if weights is not None:
            (folder / "weights.pt").write_bytes(weights() if callable(weights) else weights)
        meta = metadata if metadata is not None else json.dumps(
            {"preset": "compact", "pixel_size_A": 0.5, "threshold": 0.5,
             "normalization": {"kind": "per_image_zscore", "clip_sigma": 5.0}})
        (folder / "metadata.json").write_text(meta)
    return make


def _compact_weights() -> bytes:
    """A freshly initialised compact network's state dict, as weights.pt holds it."""
    import io

    import torch

    from mlplatform.models import build_model

    buf = io.BytesIO()
    torch.save(build_model("compact").state_dict(), buf)
    return buf.getvalue()


def _deleted_experiment(name: str):
    """The case's tracking store holds experiment ``name``, deleted (MLflow keeps its name until `mlflow gc`)."""
    def make(tmp: Path, ws: Path):
        from mlflow import MlflowClient

        from mlplatform.store import ensure_store

        store = f"sqlite:///{tmp}/mlflow.db"
        ensure_store(store)
        client = MlflowClient(store)
        client.delete_experiment(client.create_experiment(name))
    return make


# -- the cases -------------------------------------------------------------------------------------------------------

TRAIN = ["experiments", "train", "--quiet", "--config"]
GEN = ["datagen", "generate", "--recipe", "tiny", "--n", "2", "--seed", "1"]
SWEEP = ["experiments", "sweep", "--quiet", "--storage", "sqlite:///{tmp}/claims.db", "--config"]
STUDY = ["experiments", "study", "--quiet", "--storage", "journal:{tmp}/journal.log", "--config"]

CASES = [
    # datagen generate: recipes, overrides, output folders
    Case("generate-unknown-preset", ["datagen", "generate", "--recipe", "nope", "--n", "2", "--seed", "1", "--out",
                                     "{tmp}/out"], ["nope"], tracking=False),
    Case("generate-missing-recipe-file", ["datagen", "generate", "--recipe", "{tmp}/missing.yaml", "--n", "2",
                                          "--seed", "1", "--out", "{tmp}/out"], ["missing.yaml"], tracking=False),
    Case("generate-unknown-key", [*GEN, "--out", "{tmp}/out", "--set", "structure.particle.radiusX=5"],
         ["radiusX"], tracking=False),
    Case("generate-negative-crop", [*GEN, "--out", "{tmp}/out", "--set", "imaging.crop_px=-5"],
         ["imaging.crop_px", "-5"], tracking=False),
    Case("generate-set-without-equals", [*GEN, "--out", "{tmp}/out", "--set", "imaging.crop_px"],
         ["imaging.crop_px", "key=value"], tracking=False),
    Case("generate-n-zero", ["datagen", "generate", "--recipe", "tiny", "--n", "0", "--seed", "1", "--out",
                             "{tmp}/out"], ["--n", ">= 1"], tracking=False),
    Case("generate-negative-seed", ["datagen", "generate", "--recipe", "tiny", "--n", "2", "--seed", "-1", "--out",
                                    "{tmp}/out"], ["--seed"], tracking=False),
    Case("generate-out-is-a-file", [*GEN, "--out", "{tmp}/afile"], ["afile", "file"], _file("afile"),
         tracking=False),
    Case("generate-out-holds-other-files", [*GEN, "--out", "{tmp}/full"], ["full"],
         _file("full/notes.txt"), tracking=False),
    Case("generate-recipe-duplicate-key", ["datagen", "generate", "--recipe", "{tmp}/r.yaml", "--n", "2", "--seed",
                                           "1", "--out", "{tmp}/out"], ["given twice"],
         _write("r.yaml", "base: tiny\nimaging:\n  crop_px: 64\n  crop_px: 96\n"), tracking=False),
    Case("generate-recipe-not-a-mapping", ["datagen", "generate", "--recipe", "{tmp}/r.yaml", "--n", "2", "--seed",
                                           "1", "--out", "{tmp}/out"], ["r.yaml"],
         _write("r.yaml", "- just\n- a list\n"), tracking=False),
    Case("generate-zero-workers", [*GEN, "--out", "{tmp}/out", "--workers", "0"], ["--workers", ">= 1"],
         tracking=False),
    Case("generate-scheduler-refused", [*GEN, "--out", "{tmp}/out", "--scheduler", "tcp://127.0.0.1:9"],
         ["127.0.0.1:9", "connection refused"], tracking=False),
    # datagen import
    Case("import-missing-images", ["datagen", "import", "--images", "{tmp}/nothing", "--masks", "{tmp}/nothing",
                                   "--pixel-size", "0.5", "--out", "{tmp}/out"], ["nothing"], tracking=False),
    Case("import-mask-missing", ["datagen", "import", "--images", "{tmp}/imgs", "--masks", "{tmp}/masks",
                                 "--pixel-size", "0.5", "--out", "{tmp}/out"], ["img1"],
         _both(_images(n=2), _masks_for(), lambda tmp, ws: (tmp / "masks" / "img1.npy").unlink()), tracking=False),
    Case("import-mask-values", ["datagen", "import", "--images", "{tmp}/imgs", "--masks", "{tmp}/masks",
                                "--pixel-size", "0.5", "--out", "{tmp}/out"], ["img0", "7"],
         _both(_images(n=1), _masks_for(values=(0, 7))), tracking=False),
    Case("import-zero-pixel-size", ["datagen", "import", "--images", "{tmp}/imgs", "--masks", "{tmp}/masks",
                                    "--pixel-size", "0", "--out", "{tmp}/out"], ["--pixel-size", "> 0"],
         _both(_images(n=1), _masks_for()), tracking=False),
    Case("import-npy-bomb", ["datagen", "import", "--images", "{tmp}/imgs", "--masks", "{tmp}/masks",
                             "--pixel-size", "0.5", "--out", "{tmp}/out"], ["big.npy"],
         _both(_images(n=1), _masks_for(), lambda tmp, ws: _npy_bomb(tmp / "imgs" / "big.npy")), tracking=False),
    Case("import-out-is-a-file", ["datagen", "import", "--images", "{tmp}/imgs", "--masks", "{tmp}/masks",
                                  "--pixel-size", "0.5", "--out", "{tmp}/afile"], ["afile"],
         _both(_images(n=1), _masks_for(), _file("afile")), tracking=False),
    # datagen verify / info / show
    Case("verify-missing-folder", ["datagen", "verify", "{tmp}/nothing"], ["nothing"], tracking=False),
    Case("verify-no-manifest", ["datagen", "verify", "{tmp}/data"], ["manifest"],
         _both(_copy_dataset(), lambda tmp, ws: (tmp / "data" / "manifest.json").unlink()), tracking=False),
    Case("verify-manifest-not-json", ["datagen", "verify", "{tmp}/data"], ["manifest"],
         _manifest(lambda m: "{not json"), tracking=False),
    Case("verify-manifest-a-list", ["datagen", "verify", "{tmp}/data"], ["manifest"],
         _manifest(lambda m: "[1, 2]"), tracking=False),
    Case("verify-manifest-without-shards", ["datagen", "verify", "{tmp}/data"], ["shards"],
         _manifest(lambda m: {k: v for k, v in m.items() if k != "shards"}), tracking=False),
    Case("verify-shard-outside-dataset", ["datagen", "verify", "{tmp}/data"], ["../outside.tar"],
         _manifest(_shard_field("name", "../outside.tar")), tracking=False),
    Case("verify-bad-digest-format", ["datagen", "verify", "{tmp}/data"], ["sha256"],
         _manifest(_shard_field("sha256", "xyz")), tracking=False),
    Case("verify-flipped-byte", ["datagen", "verify", "{tmp}/data"], ["shard-000001.tar"],
         _both(_copy_dataset(), _flip_byte()), tracking=False),
    Case("verify-deleted-shard", ["datagen", "verify", "{tmp}/data"], ["shard-000002.tar"],
         _both(_copy_dataset(), lambda tmp, ws: (tmp / "data" / "shard-000002.tar").unlink()), tracking=False),
    Case("verify-npy-bomb-in-shard", ["datagen", "verify", "{tmp}/data"], ["shard-000001.tar", "header claims"],
         _bomb_member(), tracking=False),
    Case("verify-npy-header-flipped-byte", ["datagen", "verify", "{tmp}/data"],
         ["shard-000001.tar", "sample 0000002_00", "image.npy", "not a valid .npy"], _NPY_HEADER_FLIPPED,
         tracking=False),
    Case("info-npy-header-flipped-byte", ["datagen", "info", "{tmp}/data"],
         ["shard-000001.tar", "sample 0000002_00", "image.npy", "not a valid .npy"], _NPY_HEADER_FLIPPED,
         tracking=False),
    Case("show-npy-header-flipped-byte", ["datagen", "show", "{tmp}/data", "--out", "{tmp}/sheet.png", "--n", "12"],
         ["shard-000001.tar", "sample 0000002_00", "image.npy", "not a valid .npy"], _NPY_HEADER_FLIPPED,
         tracking=False),
    Case("verify-json-not-utf8", ["datagen", "verify", "{tmp}/data"],
         ["shard-000001.tar", "sample 0000002_00", "not valid UTF-8"], _JSON_NOT_UTF8, tracking=False),
    Case("info-json-not-utf8", ["datagen", "info", "{tmp}/data"],
         ["shard-000001.tar", "sample 0000002_00", "not valid UTF-8"], _JSON_NOT_UTF8, tracking=False),
    Case("train-json-not-utf8", [*TRAIN, "{ws}/base.yaml", "--set", "data.train.0.path={tmp}/data"],
         ["shard-000001.tar", "sample 0000002_00", "not valid UTF-8"], _damage_member(".json", 1, 0xFF, vouch=True)),
    Case("recipes-unexpected-argument", ["datagen", "recipes", "--nope"], ["--nope"], tracking=False),
    Case("info-truncated-shard", ["datagen", "info", "{tmp}/data"], ["shard-000001.tar"], _truncate(),
         tracking=False),
    Case("show-truncated-shard", ["datagen", "show", "{tmp}/data", "--out", "{tmp}/sheet.png"],
         ["shard-000001.tar"], _truncate(), tracking=False),
    Case("show-out-is-a-folder", ["datagen", "show", "{ws}/bench", "--out", "{tmp}/adir"], ["{tmp}/adir"],
         lambda tmp, ws: (tmp / "adir").mkdir(), tracking=False),
    Case("show-n-zero", ["datagen", "show", "{ws}/bench", "--out", "{tmp}/sheet.png", "--n", "0"], ["--n"],
         tracking=False),
    # experiments train: configs
    Case("train-missing-config", [*TRAIN, "{tmp}/missing.yaml"], ["missing.yaml"]),
    Case("train-config-not-yaml", [*TRAIN, "{tmp}/c.yaml"], ["c.yaml"], _write("c.yaml", "seed: [unclosed\n")),
    Case("train-config-not-a-mapping", [*TRAIN, "{tmp}/c.yaml"], ["c.yaml"], _write("c.yaml", "42\n")),
    Case("train-unknown-key", [*TRAIN, "{tmp}/c.yaml"], ["learning_rate"], _config(learning_rate=0.1)),
    Case("train-missing-data", [*TRAIN, "{tmp}/c.yaml"], ["data"], _config(drop=("data",))),
    Case("train-set-unknown-key", [*TRAIN, "{ws}/base.yaml", "--set", "optim.lrr=0.1"], ["optim.lrr"]),
    Case("train-set-bad-number", [*TRAIN, "{ws}/base.yaml", "--set", "optim.lr=fast"], ["optim.lr", "fast"]),
    Case("train-negative-epochs", [*TRAIN, "{ws}/base.yaml", "--set", "epochs=-1"], ["epochs", "-1"]),
    Case("train-lr-infinite", [*TRAIN, "{ws}/base.yaml", "--set", "optim.lr=.inf"], ["optim.lr", "finite"]),
    Case("train-epochs-boolean", [*TRAIN, "{ws}/base.yaml", "--set", "epochs=true"], ["epochs", "true/false"]),
    Case("train-data-path-missing", [*TRAIN, "{ws}/base.yaml", "--set", "data.train.0.path={tmp}/nothing"],
         ["{tmp}/nothing"]),
    Case("train-filter-syntax", [*TRAIN, "{ws}/base.yaml", "--set", "data.train.0.filter=imaging.defocus_A <<"],
         ["filter"]),
    Case("train-filter-nested-too-deeply", [*TRAIN, "{ws}/base.yaml", "--set",
                                             "data.train.0.filter=" + "not " * 400 + "imaging.defocus_A > 0"],
         ["data.train.0.filter", "nested", "at most 100"]),
    Case("train-filter-beyond-the-parser", [*TRAIN, "{ws}/base.yaml", "--set",
                                            "data.train.0.filter=" + "-" * 5000 + "imaging.defocus_A > 0"],
         ["data.train.0.filter", "nested too deeply"]),
    Case("train-empty-experiment-name", [*TRAIN, "{ws}/base.yaml", "--set", "tracking.experiment=''"],
         ["tracking.experiment", "non-empty"]),
    Case("train-deleted-experiment", [*TRAIN, "{ws}/base.yaml"], ["tracking.experiment", "exp-test", "deleted",
                                                                  "restore"], _deleted_experiment("exp-test")),
    Case("train-filter-unknown-field", [*TRAIN, "{ws}/base.yaml", "--set",
                                        "data.train.0.filter=imaging.no_such_field > 1"], ["no_such_field"]),
    Case("train-filter-selects-nothing", [*TRAIN, "{ws}/base.yaml", "--set",
                                          "data.train.0.filter=imaging.defocus_A > 1e9"], ["filter"]),
    Case("train-benchmark-missing", [*TRAIN, "{ws}/base.yaml", "--set", "benchmarks.0.path={tmp}/nothing"],
         ["{tmp}/nothing"]),
    Case("train-unknown-accelerator", [*TRAIN, "{ws}/base.yaml", "--set", "trainer.accelerator=tpu9"],
         ["trainer.accelerator", "tpu9"]),
    Case("train-unknown-precision", [*TRAIN, "{ws}/base.yaml", "--set", "trainer.precision=7"],
         ["trainer.precision", "7"]),
    Case("train-crop-larger-than-images", [*TRAIN, "{ws}/base.yaml", "--set", "data.crop_px=512"],
         ["crop_px", "512"]),
    Case("train-unknown-model-preset", [*TRAIN, "{ws}/base.yaml", "--set", "model.preset=huge9"],
         ["model.preset", "huge9"]),
    Case("train-corrupt-shard", [*TRAIN, "{ws}/base.yaml", "--set", "data.train.0.path={tmp}/data"],
         ["shard-000001.tar"], _flip_byte()),
    Case("train-manifest-outside-name", [*TRAIN, "{ws}/base.yaml", "--set", "data.train.0.path={tmp}/data"],
         ["../outside.tar"], _manifest(_shard_field("name", "../outside.tar"))),
    # experiments train: tracking stores
    Case("train-tracking-unknown-scheme", [*TRAIN, "{ws}/base.yaml", "--tracking-uri", "foo://bar"],
         ["tracking URI", "foo", "allowed"], tracking=False),
    Case("train-tracking-uri-is-a-file", [*TRAIN, "{ws}/base.yaml", "--tracking-uri", "{tmp}/afile"],
         ["tracking URI", "afile", "is a file"], _file("afile"), tracking=False),
    Case("train-tracking-not-sqlite", [*TRAIN, "{ws}/base.yaml", "--tracking-uri", "sqlite:///{tmp}/x.db"],
         ["x.db", "not an SQLite database"], _file("x.db"), tracking=False),
    Case("train-tracking-server-refused", [*TRAIN, "{ws}/base.yaml", "--tracking-uri", "http://127.0.0.1:{port}"],
         ["tracking server", "does not answer", "tries"], tracking=False),
    Case("train-tracking-postgres-refused", [*TRAIN, "{ws}/base.yaml", "--tracking-uri",
                                             "postgresql://u@127.0.0.1:{port}/db"], ["cannot connect", "tries"],
         tracking=False),
    Case("train-tracking-driver-missing", [*TRAIN, "{ws}/base.yaml", "--tracking-uri",
                                           "postgresql+pg8000://u@127.0.0.1:{port}/db"],
         ["pg8000", "not installed", "pip install"], tracking=False),
    Case("train-tracking-file-store", [*TRAIN, "{ws}/base.yaml", "--tracking-uri", "file:{tmp}/fs"],
         ["tracking URI", "database"], tracking=False),
    # experiments finetune
    Case("finetune-unknown-run", ["experiments", "finetune", "--quiet", "--config", "{ws}/base.yaml", "--from",
                                  RUN_ID], [RUN_ID]),
    Case("finetune-missing-model-folder", ["experiments", "finetune", "--quiet", "--config", "{ws}/base.yaml",
                                           "--from", "{tmp}/nothing"], ["nothing"]),
    Case("finetune-truncated-weights", ["experiments", "finetune", "--quiet", "--config", "{ws}/base.yaml",
                                        "--from", "{tmp}/model"], ["weights"], _model_folder()),
    # experiments sweep
    Case("sweep-storage-unknown-scheme", ["experiments", "sweep", "--quiet", "--storage", "foo://x", "--config",
                                          "{tmp}/s.yaml"], ["--storage", "foo"], _sweep()),
    Case("sweep-storage-missing-folder", ["experiments", "sweep", "--quiet", "--storage",
                                          "sqlite:///{tmp}/no/claims.db", "--config", "{tmp}/s.yaml"],
         ["--storage", "does not exist"], _sweep()),
    Case("sweep-storage-not-sqlite", ["experiments", "sweep", "--quiet", "--storage", "sqlite:///{tmp}/x.db",
                                      "--config", "{tmp}/s.yaml"], ["--storage", "not an SQLite database"],
         _both(_sweep(), _file("x.db"))),
    Case("sweep-storage-refused", ["experiments", "sweep", "--quiet", "--storage",
                                   "postgresql://u@127.0.0.1:{port}/db", "--config", "{tmp}/s.yaml"],
         ["--storage", "cannot connect"], _sweep()),
    Case("sweep-subset-selects-nothing", [*SWEEP, "{tmp}/s.yaml"], ["empty", "filter"],
         _sweep(subsets=[{"name": "all", "set": {}},
                         {"name": "empty", "set": {"data.train.0.filter": "imaging.defocus_A > 1e9"}}])),
    Case("sweep-no-seeds", [*SWEEP, "{tmp}/s.yaml"], ["seeds"], _sweep(seeds=[])),
    Case("sweep-duplicate-subset", [*SWEEP, "{tmp}/s.yaml"], ["all"],
         _sweep(subsets=[{"name": "all", "set": {}}, {"name": "all", "set": {}}])),
    Case("sweep-wrong-kind", [*SWEEP, "{tmp}/s.yaml"], ["kind"], _sweep(kind="study")),
    # experiments study
    Case("study-journal-missing-folder", ["experiments", "study", "--quiet", "--storage",
                                          "journal:{tmp}/no/journal.log", "--config", "{tmp}/st.yaml"],
         ["--storage", "does not exist"], _study()),
    Case("study-storage-refused", ["experiments", "study", "--quiet", "--storage",
                                   "postgresql://u@127.0.0.1:{port}/db", "--config", "{tmp}/st.yaml"],
         ["--storage", "cannot connect"], _study()),
    Case("study-storage-driver-missing", ["experiments", "study", "--quiet", "--storage", "mysql://u@127.0.0.1/db",
                                          "--config", "{tmp}/st.yaml"], ["MySQLdb", "not installed"], _study()),
    Case("study-objective-unknown-benchmark", [*STUDY, "{tmp}/st.yaml"], ["ood/nosuch/dice"],
         _study(objective={"metric": "ood/nosuch/dice", "aggregate": "final", "direction": "maximize"})),
    Case("study-bad-search-space", [*STUDY, "{tmp}/st.yaml"], ["optim.lr"],
         _study(search_space={"optim.lr": {"type": "float", "low": 1.0, "high": 0.1}})),
    # experiments report / doctor / ui / dashboard / demo
    Case("report-unknown-sweep", ["experiments", "report", "--sweep", "nosuch", "--out", "{tmp}/rep"], ["nosuch"]),
    Case("report-out-is-a-file", ["experiments", "report", "--sweep", "nosuch", "--out", "{tmp}/afile"], ["afile"],
         _file("afile")),
    Case("doctor-unknown-sweep", ["experiments", "doctor", "--sweep", "nosuch", "--storage",
                                  "sqlite:///{tmp}/claims.db"], ["nosuch"]),
    Case("doctor-unknown-study", ["experiments", "doctor", "--study", "nosuch", "--storage",
                                  "journal:{tmp}/journal.log"], ["nosuch"]),
    Case("ui-port-out-of-range", ["experiments", "ui", "--port", "70000"], ["port", "70000"]),
    Case("ui-port-taken", ["experiments", "ui", "--port", "{busy}"], ["{busy}", "in use"]),
    Case("dashboard-unknown-study", ["experiments", "dashboard", "--study", "nosuch", "--storage",
                                     "journal:{tmp}/journal.log"], ["nosuch"], tracking=False),
    Case("demo-out-is-a-file", ["experiments", "demo", "--out", "{tmp}/afile"], ["afile"], _file("afile")),
    # experiments predict
    Case("predict-missing-model", ["experiments", "predict", "--model", "{tmp}/nothing", "--input", "{tmp}/imgs",
                                   "--out", "{tmp}/pred"], ["nothing"], _images(n=1), tracking=False),
    Case("predict-missing-input", ["experiments", "predict", "--model", "{tmp}/model", "--input", "{tmp}/nothing",
                                   "--out", "{tmp}/pred"], ["nothing"], _model_folder(), tracking=False),
    Case("predict-model-metadata-not-json", ["experiments", "predict", "--model", "{tmp}/model", "--input",
                                             "{tmp}/imgs", "--out", "{tmp}/pred"], ["metadata"],
         _both(_images(n=1), _model_folder(metadata="{oops")), tracking=False),
    Case("predict-image-too-small", ["experiments", "predict", "--model", "{tmp}/model", "--input", "{tmp}/imgs",
                                     "--out", "{tmp}/pred"], ["tiny.npy", "2 x 2 pixels", "at least 16 x 16"],
         _both(_model_folder(weights=_compact_weights),
               _images(n=1, bad=lambda f: np.save(f / "tiny.npy", np.ones((2, 2), np.float32)))),
         tracking=False),
    Case("predict-unknown-run", ["experiments", "predict", "--model", RUN_ID, "--input", "{tmp}/imgs", "--out",
                                 "{tmp}/pred"], [RUN_ID], _images(n=1)),
    # benchmarks
    Case("benchmarks-unknown-section", ["benchmarks", "--only", "z"], ["z"], tracking=False),
]


# -- running a case --------------------------------------------------------------------------------------------------

def _listing(*roots: Path) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")}


def _rows(db: Path, table: str, where: str = "") -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        if not con.execute("select 1 from sqlite_master where name = ?", (table,)).fetchone():
            return 0
        return con.execute(f"select count(*) from {table} {where}").fetchone()[0]


def run_case(case: Case, tmp: Path, ws: Path, busy_port: int, cli) -> tuple[subprocess.CompletedProcess,
                                                                                        dict]:
    """Run ``case`` in ``tmp``; returns the process and what it left (new/removed files, runs, experiments...)."""
    fmt = {"ws": ws, "tmp": tmp, "store": f"sqlite:///{tmp}/mlflow.db", "port": free_loopback_port(), "busy": busy_port}
    if case.setup is not None:
        case.setup(tmp, ws)
    argv = [a.format(**fmt) for a in case.argv]
    if case.tracking:
        argv += ["--tracking-uri", fmt["store"]]
    store = tmp / "mlflow.db"
    before, made = _listing(tmp, ws), _rows(store, "experiments", "where name != 'Default'")  # made by the setup
    res = cli.run(argv, tmp)
    after = _listing(tmp, ws)
    left = {
        "new": sorted(after - before - {str(store), f"{store}.init-lock", str(tmp / "mlruns"),
                                        str(tmp / "mlruns" / "mlflow.db"), str(tmp / "mlruns" / "mlflow.db.init-lock"),
                                        str(tmp / "claims.db")}),
        "gone": sorted(before - after),
        "runs": _rows(store, "runs") + _rows(tmp / "mlruns" / "mlflow.db", "runs"),
        "experiments": _rows(store, "experiments", "where name != 'Default'") - made,
        "claims": _rows(tmp / "claims.db", "sweep_units"),
        "journal": (tmp / "journal.log").stat().st_size if (tmp / "journal.log").exists() else 0,
    }
    return res, left


def check(case: Case, res: subprocess.CompletedProcess, left: dict, fmt: dict) -> str:
    """The error line when the case kept the contract; AssertionError naming what broke it otherwise."""
    detail = f"{case.id}: rc={res.returncode}\nstderr: {res.stderr[-3000:]}\nstdout: {res.stdout[-1000:]}"
    assert res.returncode == 2, detail
    assert "Traceback" not in res.stderr, detail
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, detail
    for word in case.words:
        assert word.format(**fmt) in errors[0], (word.format(**fmt), errors[0])
    assert not left["new"] and not left["gone"], (case.id, left)
    assert left["runs"] == 0 and left["experiments"] == 0 and left["claims"] == 0 and left["journal"] == 0, \
        (case.id, left)
    return errors[0]




@pytest.fixture(scope="module")
def busy_port():
    """A port something listens on (for the "port taken" cases)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def test_every_command_has_bad_input_cases():
    """The table covers every subcommand of every command line (one added without a case fails here), with distinct
    ids, and stays large."""
    import argparse

    from datagen.cli import build_parser as datagen_parser
    from experiments.cli import build_parser as experiments_parser

    commands = {("benchmarks", None)}
    for package, build in (("datagen", datagen_parser), ("experiments", experiments_parser)):
        for action in build()._actions:
            if isinstance(action, argparse._SubParsersAction):
                commands |= {(package, name) for name in action.choices}
    covered = {(c.argv[0], None if c.argv[0] == "benchmarks" else c.argv[1]) for c in CASES}
    assert sorted(commands - covered, key=str) == [], "commands without a bad-input case"
    assert len(commands) >= 17 and len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, workspace, busy_port, cli):
    res, left = run_case(case, tmp_path, workspace, busy_port, cli)
    line = check(case, res, left, {"ws": workspace, "tmp": tmp_path, "busy": busy_port})
    if os.environ.get("BAD_INPUT_TABLE"):  # the outcomes, for the table in notes and reviews
        with open(os.environ["BAD_INPUT_TABLE"], "a") as fh:
            fh.write(json.dumps({"case": case.id, "command": " ".join(case.argv[:2]), "exit": res.returncode,
                                 "error": line.replace(str(tmp_path), "TMP").replace(str(workspace), "WS")}) + "\n")


def test_a_sample_that_only_decoding_finds_bad_fails_the_run_naming_it(tmp_path, workspace, busy_port, cli):
    """The one bad input found after the run exists, by design: a shard whose bytes match the manifest's sha256 but
    whose sample does not decode (here an image .npy whose header claims 160 GB). Finding it before the run would
    take a second, decoding pass over every shard (``--skip-bad-shards`` makes that pass). The command still says so
    in one line (exit 2, no traceback, no allocation of what the header claims), and its run ends FAILED with the
    shard and sample as the reason: nothing is left RUNNING and no model is logged."""
    from mlflow import MlflowClient

    case = Case("train-npy-bomb-in-shard", [*TRAIN, "{ws}/base.yaml", "--set", "data.train.0.path={tmp}/data"],
                ["shard-000001.tar", "header claims"], _bomb_member())
    res, left = run_case(case, tmp_path, workspace, busy_port, cli)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "shard-000001.tar" in errors[0] and "header claims" in errors[0], res.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("exp-test").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "shard-000001.tar" in runs[0].data.tags["failure_reason"]
    assert not client.search_logged_models([runs[0].info.experiment_id])


BUGGY_INFO = r"""
import sys
import datagen.inspect

def dataset_info(root):  # a bug deep in a command: not the user's fault, whatever exception it raises
    raise {exc}("an internal inconsistency")

datagen.inspect.dataset_info = dataset_info
from datagen.cli import main
sys.exit(main(["info", sys.argv[1]]))
"""


@pytest.mark.parametrize("exc", ["ValueError", "OSError"])
def test_a_bug_is_not_taken_for_bad_input(exc, workspace):
    """The error contract's other half: exit 2 with one line is for bad input (InputError) only. A bug, here an
    exception raised inside `datagen info` on a good dataset, prints its traceback and exits 1, so a test (or a user)
    sees a bug as a bug. ValueError and OSError were once taken for bad input."""
    res = subprocess.run([sys.executable, "-c", BUGGY_INFO.format(exc=exc), str(workspace / "bench")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "Traceback (most recent call last)" in res.stderr and f"{exc}: " in res.stderr, res.stderr[-2000:]
    assert "an internal inconsistency" in res.stderr and "in dataset_info" in res.stderr, res.stderr[-2000:]
    assert not [line for line in res.stderr.splitlines() if line.startswith("error: ")], res.stderr[-2000:]
