"""The commands against a real MLflow tracking server (``mlflow server`` on PostgreSQL, artifacts on S3); a sweep, a
study and a report through one are the walkthrough's (tests/test_cluster_walkthrough.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from conftest import S3_BUCKET

pytestmark = pytest.mark.slow

CLIENT_ENV = {k: v for k, v in os.environ.items()
              if not k.startswith(("AWS_", "MLFLOW_S3_", "MLFLOW_TRACKING_"))}


def _run(*args, env=None, cwd=None):
    res = subprocess.run([sys.executable, "-m", "experiments", *args], capture_output=True, text=True, timeout=900,
                         env={**CLIENT_ENV, **(env or {})}, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_train_and_predict_through_the_server_with_artifacts_in_s3(mlflow_server, s3_server, tiny_dataset, tmp_path):
    import boto3

    config = {
        "seed": 0, "epochs": 2,
        "data": {"train": [{"path": str(tiny_dataset(12, 1))}], "val_fraction": 0.34, "crop_px": 32, "batch_size": 4,
                 "steps_per_epoch": 2},
        "benchmarks": [{"name": "bench", "path": str(tiny_dataset(4, 2))}],
        "tracking": {"experiment": "through-server", "n_prediction_images": 1, "system_metrics": False},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    # the clients hold no S3 credentials: the server proxies every artifact
    res = _run("train", "--config", str(tmp_path / "train.yaml"), "--tracking-uri", mlflow_server, "--quiet")
    run_id = res.stdout.strip().splitlines()[-1]
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED"
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "ood/bench/dice")
    assert sorted(m.step for m in history) == [0, 1]
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix="mlflow/")
            for o in page.get("Contents", [])]
    for name in ("weights.pt", "metadata.json", "config/resolved.yaml"):
        assert any(k.endswith(name) for k in keys), (name, keys)
    assert any("/images/predictions~bench+step+1+" in k for k in keys), keys  # the last epoch's prediction panel

    # predict, fine-tune and the report find the model and the runs through the server (URI from the environment)
    np.save(tmp_path / "micrograph.npy", np.random.default_rng(0).normal(100, 10, (48, 40)).astype(np.float32))
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    _run("predict", "--model", run_id, "--input", str(tmp_path / "micrograph.npy"), "--out", str(tmp_path / "pred"),
         "--pixel-size", "0.2", env=env)
    assert np.load(tmp_path / "pred" / "micrograph_mask.npy").shape == (48, 40)
    finetuned = _run("finetune", "--config", str(tmp_path / "train.yaml"), "--from", run_id, "--set", "epochs=1",
                     "--quiet", env=env).stdout.strip().splitlines()[-1]
    assert MlflowClient(mlflow_server).get_run(finetuned).data.tags["pretrain_run"] == run_id
