"""Training end to end on tiny data: pretrain, fine-tune, OOD metrics every epoch, lineage, predict, lifecycle."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from hrtem_core.config import set_dotted
from hrtem_core.dataset import file_sha256
from mlplatform.config import ConfigError, config_from_dict
from mlplatform.curation import CurationError, scan_dataset, select, selection_digest
from mlplatform.data import DataError
from mlplatform.metrics import SegmentationScores
from mlplatform.predict import predict_path
from mlplatform.train import train

import torch

EPOCHS = 2


@pytest.fixture(scope="module")
def datasets(tiny_dataset):
    return {name: tiny_dataset(n, seed, *extra) for name, n, seed, extra in (
        ("train", 16, 1, []), ("bench-a", 6, 2, []), ("bench-lowdose", 6, 3, ["imaging.dose_e_per_A2=100"]),
        ("target", 8, 4, ["imaging.defocus_A={dist: uniform, low: -100, high: 100}"]))}


def _config(datasets, **over):
    cfg = {
        "seed": 3, "epochs": EPOCHS,
        "data": {"train": [{"path": str(datasets["train"])}], "val_fraction": 0.25, "crop_px": 48, "batch_size": 4,
                 "steps_per_epoch": 4, "eval_batch_size": 4},
        "benchmarks": [{"name": "bench-a", "path": str(datasets["bench-a"])},
                       {"name": "lowdose", "path": str(datasets["bench-lowdose"]), "max_samples": 4}],
        "model": {"preset": "compact"},
        "tracking": {"experiment": "test", "n_prediction_images": 2, "system_metrics": False},
    }
    for key, value in over.items():
        set_dotted(cfg, key, value)
    return config_from_dict(cfg)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def pretrained(datasets, store):
    return train(_config(datasets), tracking_uri=store, progress=False)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_pretrain_run_records_everything(pretrained, datasets, store):
    client = MlflowClient(store)
    run = client.get_run(pretrained)
    assert run.info.status == "FINISHED"
    for name in ("bench-a", "lowdose"):
        for metric in ("dice", "dice_mean_image", "iou"):
            steps = [s for s, _ in _history(client, pretrained, f"ood/{name}/{metric}")]
            assert steps == list(range(EPOCHS)), (name, metric, steps)
    for key in ("val/dice", "train/loss", "train/lr"):
        assert [s for s, _ in _history(client, pretrained, key)] == list(range(EPOCHS))
    tags = run.data.tags
    assert tags["phase"] == "pretrain" and tags["seed"] == "3" and tags["git.commit"]
    assert tags["subset"] and "subset.filter" in tags
    hashes = {n: scan_dataset(p).content_hash for n, p in datasets.items()}
    train_name = scan_dataset(datasets["train"]).name  # a train dataset is named by its manifest unless configured
    assert tags[f"dataset.train.{train_name}.content_hash"] == hashes["train"]
    assert tags["dataset.benchmark.bench-a.content_hash"] == hashes["bench-a"]
    assert tags["dataset.benchmark.lowdose.content_hash"] == hashes["bench-lowdose"]
    inputs = {(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs}
    # a benchmark's input is its selection: all of bench-a, the capped 4 of lowdose
    bench_a = selection_digest(select(scan_dataset(datasets["bench-a"]), None, 64, None, seed=0))
    lowdose = selection_digest(select(scan_dataset(datasets["bench-lowdose"]), None, 4, None, seed=0))
    assert {("bench-a", bench_a[:36]), ("lowdose", lowdose[:36])} <= inputs
    assert run.data.params["data.crop_px"] == "48"
    assert run.info.run_name == f"{tags['subset']}-s3-pretrain" and tags["mlflow.note.content"].startswith(
        f"**Pretrain** of subset **{tags['subset']}**, seed 3")
    artifacts = {a.path for a in client.list_artifacts(pretrained)}
    assert {"checkpoints", "config"} <= artifacts
    # prediction panels at every epoch, per benchmark, as MLflow images (compared across steps and runs in the UI)
    images = {a.path for a in client.list_artifacts(pretrained, "images")}
    for name in ("bench-a", "lowdose"):
        steps = {int(p.split("+step+")[1].split("+")[0]) for p in images if p.startswith(f"images/predictions~{name}+")
                 and p.endswith(".png")}
        assert steps == set(range(EPOCHS)), images
    # the model carries the metrics of the epoch it holds (the last), and a name that says subset, seed and phase
    model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    # MLflow refuses '/', ':', '.', spaces and quotes in a model's name: each run of them in the subset becomes '_'
    assert model.name == re.sub(r"[^A-Za-z0-9_-]+", "_", f"{tags['subset']}-s3-pretrain").strip("_"), model.name
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*-s3-pretrain", model.name), model.name
    assert {m.key: m.value for m in model.metrics}["ood/mean/dice"] == _history(client, pretrained,
                                                                                "ood/mean/dice")[-1][1]


def test_predict_reproduces_the_logged_benchmark_dice(pretrained, datasets, store, tmp_path):
    client = MlflowClient(store)
    logged = _history(client, pretrained, "ood/lowdose/dice")[-1][1]
    # the same images the callback scored: the benchmark subset (cap 4, benchmark seed) in key order
    records = select(scan_dataset(datasets["bench-lowdose"]), None, 4, None, seed=0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    truths = {}
    for r in records:
        with tarfile.open(r.shard) as tar:
            image = np.load(io.BytesIO(tar.extractfile(f"{r.key}.image.npy").read()))
            truths[r.key] = np.load(io.BytesIO(tar.extractfile(f"{r.key}.mask.npy").read()))
        np.save(inputs / f"{r.key}.npy", image)
    out = tmp_path / "out"
    results = predict_path(pretrained, inputs, out, pixel_size_A=0.25, tracking_uri=store)
    assert len(results) == len(records)
    scores = SegmentationScores()
    for key, truth in sorted(truths.items()):
        pred = np.load(out / f"{key}_mask.npy")
        assert pred.shape == truth.shape and (out / f"{key}_mask.png").is_file()
        scores.update(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])
    assert scores.compute()["dice"] == pytest.approx(logged, abs=1e-6)


def test_finetune_records_its_parent_and_freezes_the_encoder(pretrained, datasets, store):
    cfg = _config(datasets, **{"data.train": [{"path": str(datasets["target"])}], "optim.lr": 1e-4,
                               "finetune.freeze_encoder": True, "epochs": 1})
    run_id = train(cfg, phase="finetune", init_from=pretrained, tracking_uri=store, progress=False)
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["phase"] == "finetune"
    assert run.data.tags["pretrain_run"] == pretrained and run.data.tags["mlflow.parentRunId"] == pretrained
    assert int(run.data.tags["model.trainable_parameters"]) < int(run.data.tags["model.parameters"])
    # its epochs continue the pretrain's count (EPOCHS of them), in the UI and in the report alike
    assert run.data.tags["epoch_offset"] == str(EPOCHS)
    assert [s for s, _ in _history(MlflowClient(store), run_id, "ood/bench-a/dice")] == [EPOCHS]
    pre = MlflowClient(store).get_run(pretrained).data.tags
    assert run.data.tags["subset"] == pre["subset"] and run.data.tags["subset.filter"] == pre["subset.filter"]
    assert run.data.tags["finetune.data"].endswith(": all") and "Fine-tuned from [" in run.data.tags[
        "mlflow.note.content"]


def test_same_config_and_seed_give_the_same_metrics(pretrained, datasets, store):
    again = train(_config(datasets), tracking_uri=store, progress=False)
    client = MlflowClient(store)
    first, second = client.get_run(pretrained).data.metrics, client.get_run(again).data.metrics
    for key in ("train/loss", "val/dice", "ood/bench-a/dice", "ood/lowdose/iou"):
        assert first[key] == second[key], key


def _rewrite_member(shard: Path, member: str, data: bytes):
    members = []
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            if m.name == member:
                payload, m.size = data, len(data)
            tar.addfile(m, io.BytesIO(payload))


def test_a_run_that_fails_ends_failed_with_the_reason(datasets, store, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(datasets["bench-a"], broken)
    index = scan_dataset(broken)
    victim = index.records[0]
    buf = io.BytesIO()
    np.save(buf, np.zeros((7, 7), np.uint8))  # a mask that no longer matches its image: found only when read
    _rewrite_member(Path(victim.shard), f"{victim.key}.mask.npy", buf.getvalue())
    # the manifest vouches for the new file, so that the shard passes the sha256 check and fails only when decoded
    manifest = json.loads((broken / "manifest.json").read_text())
    for shard in manifest["shards"]:
        if shard["name"] == Path(victim.shard).name:
            shard["sha256"] = file_sha256(Path(victim.shard))
    (broken / "manifest.json").write_text(json.dumps(manifest))
    # no prediction panels: their samples are read (and this one refused) before the run exists
    cfg = _config(datasets, benchmarks=[{"name": "broken", "path": str(broken)}], epochs=1,
                  **{"tracking.n_prediction_images": 0})
    with pytest.raises(DataError, match=rf"sample {victim.key}: mask shape \(7, 7\) differs") as failed:
        train(cfg, tracking_uri=store, progress=False)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
    assert len(runs) == 1 and victim.key in runs[0].data.tags["failure_reason"], [r.data.tags for r in runs]
    assert str(failed.value) in runs[0].data.tags["failure_reason"]
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


def test_bad_inputs_fail_before_any_run(datasets, store):
    with pytest.raises(ConfigError, match="data.batch_size"):
        _config(datasets, **{"data.batch_size": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        _config(datasets, **{"optim.lr_max": 1})
    with pytest.raises(CurationError, match="selected none"):
        train(_config(datasets, **{"data.train": [{"path": str(datasets["train"]),
                                                   "filter": "structure.radius_A > 100"}]}),
              tracking_uri=store, progress=False)
    with pytest.raises(CurationError, match="imaging.defocus_A"):
        train(_config(datasets, **{"data.train": [{"path": str(datasets["train"]), "filter": "defocus_A > 0"}]}),
              tracking_uri=store, progress=False)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("test")
    names = [r.info.run_name for r in client.search_runs([exp.experiment_id])] if exp else []
    assert not any("radius" in n for n in names)


@pytest.mark.slow
def test_cli_reports_errors_and_an_interrupted_run_ends_killed(datasets, tmp_path):
    import yaml

    cfg = _config(datasets, epochs=200, **{"data.steps_per_epoch": 20}).resolved()
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bad = subprocess.run([sys.executable, "-m", "experiments", "train", "--config", str(path), "--tracking-uri",
                          store, "--set", "data.crop_px=4"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "data.crop_px" in bad.stderr and "Traceback" not in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "experiments", "train", "--config", str(path), "--quiet",
                             "--tracking-uri", store], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    client = MlflowClient(store)
    deadline = time.time() + 180
    run = None
    while time.time() < deadline and run is None:
        time.sleep(0.5)
        exp = client.get_experiment_by_name("test") if Path(store[10:]).exists() else None
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
            run = runs[0]
    assert run is not None, "the run never logged an epoch"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode == 130
    final = client.get_run(run.info.run_id)
    assert final.info.status == "KILLED" and "interrupted" in final.data.tags["failure_reason"]
