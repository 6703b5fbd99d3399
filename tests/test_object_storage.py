"""Datasets on object storage: generate --out s3://..., then verify, info, show and training read them there (S3 is
moto's server on loopback; credentials and endpoint come from the usual AWS variables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import boto3
import pytest
import yaml
from mlflow import MlflowClient

from conftest import S3_BUCKET, TINY
from datagen.pipeline import generate
from datagen.recipe import load_recipe

pytestmark = pytest.mark.slow
SHARDED = (*TINY[:-1], "output.structures_per_shard=1")


def _cli(module, *args, env, cwd=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **env}, cwd=cwd)


def test_a_dataset_written_to_s3_is_verified_inspected_and_trained_on_there(s3_server, tmp_path, monkeypatch):
    url = f"s3://{S3_BUCKET}/datasets/{tmp_path.name}/tiny"
    local = generate(load_recipe("tiny", SHARDED), n=6, seed=21, out=tmp_path / "local", workers=1, progress=False)
    env = {**s3_server, "HRTEM_STAGING_DIR": str(tmp_path / "staging")}
    res = _cli("datagen", "generate", "--recipe", "tiny", "--n", 6, "--seed", 21, "--out", url, "--workers", 1,
               "--quiet", *[a for s in SHARDED for a in ("--set", s)], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"content_hash {local['content_hash']}" in res.stdout
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    keys = sorted(o["Key"].rsplit("/", 1)[-1] for o in s3.list_objects_v2(
        Bucket=S3_BUCKET, Prefix=f"datasets/{tmp_path.name}/tiny/")["Contents"])
    assert keys == ["manifest.json", *[shard["name"] for shard in local["shards"]]]
    assert not list((tmp_path / "staging").iterdir())  # staged locally, uploaded, cleaned up

    verify = _cli("datagen", "verify", url, env=env)
    assert verify.returncode == 0 and local["content_hash"] in verify.stdout, verify.stderr
    info = _cli("datagen", "info", url, "--json", env=env)
    assert info.returncode == 0 and json.loads(info.stdout)["counts"]["samples"] == 6, info.stderr
    show = _cli("datagen", "show", url, "--out", tmp_path / "sheet.png", "--n", 4, env=env)
    assert show.returncode == 0 and (tmp_path / "sheet.png").stat().st_size > 0, show.stderr
    again = _cli("datagen", "generate", "--recipe", "tiny", "--n", 6, "--seed", 21, "--out", url, "--quiet",
                 *[a for s in SHARDED for a in ("--set", s)], env=env)
    assert again.returncode == 0 and local["content_hash"] in again.stdout  # finished: returned, not redone

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {"seed": 0, "epochs": 1,
              "data": {"train": [{"path": url}], "val_fraction": 0.34, "crop_px": 32, "batch_size": 2,
                       "steps_per_epoch": 2},
              "benchmarks": [{"name": "on-s3", "path": url}],
              "tracking": {"experiment": "s3", "n_prediction_images": 0, "system_metrics": False}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    train = _cli("experiments", "train", "--config", tmp_path / "train.yaml", "--tracking-uri", store, "--quiet",
                 env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    run = MlflowClient(store).get_run(train.stdout.strip().splitlines()[-1])
    assert run.info.status == "FINISHED" and "ood/on-s3/dice" in run.data.metrics
    assert run.data.tags["dataset.train.tiny-seed21.content_hash"] == local["content_hash"]


def test_a_prefix_holding_something_else_is_refused(s3_server, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.put_object(Bucket=S3_BUCKET, Key=f"other/{tmp_path.name}/notes.txt", Body=b"not a dataset")
    res = _cli("datagen", "generate", "--recipe", "tiny", "--n", 2, "--seed", 1, "--out",
               f"s3://{S3_BUCKET}/other/{tmp_path.name}", "--quiet", env={**s3_server,
                                                                          "HRTEM_STAGING_DIR": str(tmp_path / "st")})
    assert res.returncode == 2 and "holds other objects (notes.txt)" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "st").exists()
    no_keys = _cli("datagen", "verify", f"s3://{S3_BUCKET}/other/{tmp_path.name}",
                   env={**s3_server, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")})
    assert no_keys.returncode == 2 and "check the AWS_* variables" in no_keys.stderr
    assert "Traceback" not in no_keys.stderr
