"""Tracked runs against a real MLflow SQLite store: lifecycle, params/tags/metrics, dataset inputs, model round trip."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mlplatform.models import build_model
from mlplatform.predict import predict_array
from mlplatform.serving import ModelRefError, load_model
from mlplatform.store import process_tracking_uri, resolve_tracking_uri
from mlplatform.tracking import Superseded, TrackedRun, find_runs

META = {"preset": "compact", "pixel_size_A": 0.2, "normalization": {"kind": "per_image_zscore", "clip_sigma": 5.0}}


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def run(uri, name="r", **kw):
    kw.setdefault("params", {"seed": 0})
    kw.setdefault("tags", {"phase": "pretrain"})
    return TrackedRun(uri, "exp", name, kw.pop("params"), kw.pop("tags"), system_metrics=kw.pop("system", False), **kw)


def get(uri, run_id):
    return MlflowClient(uri).get_run(run_id)


def test_default_uri_is_sqlite_under_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert (tmp_path / "mlruns").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(None) == "http://tracking:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_finished_run_records_params_tags_metrics_and_artifacts_next_to_the_db(uri, tmp_path):
    long = "x" * 7000  # over MLflow's 6000-character param limit: truncated, full value in params.json
    with run(uri, params={"seed": 3, "optim.lr": 1e-3, "long": long}, tags={"phase": "pretrain"},
             system=True) as r:
        r.log_metrics({"train/loss": 1.0, "val/dice": 0.5}, step=0)
        r.log_metrics({"train/loss": 0.5}, step=1)
        r.set_tags({"subset": "defocus-narrow"})
        r.log_dict({"a": 1}, "config.json")
    data = get(uri, r.run_id)
    assert data.info.status == "FINISHED"
    assert data.data.params["seed"] == "3" and data.data.params["optim.lr"] == "0.001"
    assert len(data.data.params["long"]) <= 6000 and "truncated" in data.data.params["long"]
    tags = data.data.tags
    assert tags["phase"] == "pretrain" and tags["subset"] == "defocus-narrow" and tags["mlflow.runName"] == "r"
    assert tags["platform.version"] and "failure_reason" not in tags
    # the tests run from a git checkout (CI clones the repository): the run names the commit that computed it
    checkout = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert tags["git.commit"] == head and tags["git.dirty"] == str(bool(dirty)).lower(), tags
    history = MlflowClient(uri).get_metric_history(r.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]
    files = {f.path for f in MlflowClient(uri).list_artifacts(r.run_id)}
    assert {"config.json", "params.json"} <= files
    assert (tmp_path / "artifacts" / r.run_id / "artifacts" / "config.json").is_file()
    assert [x.info.run_id for x in find_runs(uri, "exp", "tags.phase = 'pretrain'")] == [r.run_id]
    assert find_runs(uri, "no-such-experiment", "") == []


def test_the_process_tracking_uri_is_the_runs_only_inside(uri, tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/elsewhere.db")
    with run(uri):
        assert mlflow.get_tracking_uri() == uri
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/elsewhere.db"


def test_failed_run_records_reason_and_traceback_and_reraises(uri, tmp_path):
    with pytest.raises(ValueError, match="bad batch"):
        with run(uri) as r:
            raise ValueError("bad batch\nsecond line")
    data = get(uri, r.run_id)
    assert data.info.status == "FAILED"
    assert data.data.tags["failure_reason"].startswith("ValueError: bad batch")
    trace = (tmp_path / "artifacts" / r.run_id / "artifacts" / "failure" / "traceback.txt").read_text()
    assert "Traceback" in trace and "bad batch" in trace
    assert mlflow.active_run() is None


def test_keyboard_interrupt_ends_killed(uri):
    with pytest.raises(KeyboardInterrupt):
        with run(uri) as r:
            raise KeyboardInterrupt
    data = get(uri, r.run_id)
    assert data.info.status == "KILLED"
    assert data.data.tags["failure_reason"] == "interrupted (KeyboardInterrupt)"


def test_real_sigterm_ends_killed_and_restores_the_handler(uri):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with run(uri) as r:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # interrupted by the handler
    assert signal.getsignal(signal.SIGTERM) is before
    data = get(uri, r.run_id)
    assert data.info.status == "KILLED" and data.data.tags["failure_reason"] == "interrupted (SIGTERM)"


def test_sigterm_turned_into_sys_exit_by_lightning_still_ends_killed(uri):
    # Lightning catches KeyboardInterrupt in fit() and calls sys.exit(1)
    with pytest.raises(SystemExit):
        with run(uri) as r:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
            except KeyboardInterrupt:
                sys.exit(1)
    assert get(uri, r.run_id).info.status == "KILLED"


def test_a_refused_commit_ends_the_run_killed_as_superseded(uri):
    """The work-queue hooks: on_start sees the run id at once; a run whose commit is refused must not end FINISHED."""
    seen, asked = [], []
    with pytest.raises(Superseded):
        with run(uri, "lost", on_start=seen.append, commit=lambda rid: asked.append(rid) or False) as r:
            assert seen == [r.run_id]
            r.log_metrics({"m": 1.0}, step=0)
    ended = get(uri, r.run_id)
    assert asked == [r.run_id] and ended.info.status == "KILLED"
    assert ended.data.tags["superseded"] == "true" and "superseded" in ended.data.tags["failure_reason"]
    with run(uri, "kept", commit=lambda rid: True) as r:
        pass
    assert get(uri, r.run_id).info.status == "FINISHED"
    with pytest.raises(ValueError, match="boom"):  # a failing run is not offered for commit
        with run(uri, "failed", commit=asked.append) as r:
            raise ValueError("boom")
    assert get(uri, r.run_id).info.status == "FAILED" and len(asked) == 1


def test_parent_tag_for_fine_tuning_and_nesting(uri):
    with run(uri, "pretrain") as parent:
        pass
    with run(uri, "finetune", parent_run_id=parent.run_id, tags={"parent_run": parent.run_id}) as child:
        pass
    tags = get(uri, child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id and tags["parent_run"] == parent.run_id
    with run(uri, "outer") as outer:  # a run opened inside another is nested under it
        with run(uri, "inner") as inner:
            pass
    assert get(uri, inner.run_id).data.tags["mlflow.parentRunId"] == outer.run_id
    assert get(uri, outer.run_id).info.status == "FINISHED"


def test_dataset_inputs_carry_the_full_content_hash(uri):
    h = "ab" * 32
    with run(uri) as r:
        r.log_dataset("train", "au-small", "/data/au-small", h, 120, "imaging.defocus_A >= -200")
        r.log_dataset("validation", "au-small", "/data/au-small", h, 30, None)  # same data, second role
    data = get(uri, r.run_id)
    inputs = {[t.value for t in i.tags if t.key == "mlflow.data.context"][0]: i for i in data.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation"}
    train = inputs["train"]
    assert train.dataset.name == "au-small" and train.dataset.digest == h[:36]
    tags = {t.key: t.value for t in train.tags}
    assert tags["content_hash"] == h and tags["filter"] == "imaging.defocus_A >= -200" and tags["n_samples"] == "120"
    assert data.data.tags["dataset.train.au-small.content_hash"] == h
    assert data.data.tags["dataset.validation.au-small.content_hash"] == h
    assert not any(k.endswith((".filter", ".n_samples")) for k in data.data.tags)  # in the inputs, not 30 more tags


def test_dataset_input_of_a_selection_has_its_own_digest_profile_and_schema(uri):
    import json

    h = "cd" * 32
    with run(uri) as r:
        r.log_dataset("train", "pool", "/data/pool", h, 40, "structure.n_defects >= 1", digest="1" * 64,
                      profile={"n_structures": 10, "defocus_A": {"min": -200.0, "median": 0.0, "max": 200.0}},
                      image_shape=(64, 64), subset="defected")
    with run(uri) as other:
        r2 = other
        other.log_dataset("train", "pool", "/data/pool", h, 90, None, digest="2" * 64, subset="all")
    first, second = get(uri, r.run_id).inputs.dataset_inputs[0], get(uri, r2.run_id).inputs.dataset_inputs[0]
    assert (first.dataset.digest, second.dataset.digest) == ("1" * 36, "2" * 36)  # one input per subset
    profile = json.loads(first.dataset.profile)
    assert profile["filter"] == "structure.n_defects >= 1" and profile["n_samples"] == 40
    assert profile["defocus_A"]["max"] == 200.0 and profile["dataset_content_hash"] == h
    assert "subset" not in profile  # shared by every run that logs the same selection: the subset is the run's tag
    assert {t.key: t.value for t in first.tags}["subset"] == "defected"
    schema = json.loads(first.dataset.schema)["mlflow_colspec"]
    assert [c["name"] for c in schema] == ["image", "mask"]
    assert schema[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 64, 64]}


def test_model_round_trip_by_run_id_uri_and_path(uri, tmp_path):
    torch.manual_seed(0)
    net = build_model("compact").eval()
    with run(uri) as r:
        model_uri = r.log_model(net, {**META, "config_hash": "c" * 64})
    x = torch.randn(1, 1, 45, 61)
    with torch.no_grad():
        expected = net(x)
    mlflow.set_tracking_uri(uri)  # MLflow resolves models:/ with the process-wide URI, whatever tracking_uri says
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl"))
    assert {p.name for p in Path(local).glob("*.py")} == {"pyfunc_model.py"}  # the model's code, nothing else
    other = f"sqlite:///{tmp_path}/other.db"
    mlflow.set_tracking_uri(other)  # the store we pass must win over the process-wide one, which is left as it was
    for ref in (r.run_id, f"runs:/{r.run_id}/model", model_uri, local):
        model, meta = load_model(ref, uri)
        assert mlflow.get_tracking_uri() == other
        assert meta["preset"] == "compact" and meta["threshold"] == 0.5 and meta["config_hash"] == "c" * 64
        assert "torch" in meta["versions"] and not model.training
        with torch.no_grad():
            assert torch.equal(model(x), expected), ref
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    img = np.random.default_rng(0).normal(size=(3, 40, 52)).astype(np.float32)
    out = pyfunc.predict(img)
    assert out.shape == img.shape and out.dtype == np.float32 and ((out >= 0) & (out <= 1)).all()
    np.testing.assert_allclose(out[1], predict_array(net, META, img[1], None), atol=1e-6)
    assert pyfunc.predict(img[0]).shape == (40, 52)


def test_log_model_checks_metadata_and_weights(uri):
    with run(uri) as r:
        with pytest.raises(ValueError, match="pixel_size_A"):
            r.log_model(build_model("compact"), {"preset": "compact", "normalization": {"kind": "per_image_zscore"}})
        with pytest.raises(RuntimeError):  # weights of another architecture
            r.log_model(build_model("compact"), {**META, "preset": "resnet18-unet"})


def test_unresolvable_model_references_say_what_is_accepted(uri, tmp_path):
    with pytest.raises(ModelRefError, match="no such file or folder.*run id"):
        load_model("nonexistent-model", uri)
    with pytest.raises(ModelRefError, match="0123456789abcdef0123456789abcdef.*accepted"):
        load_model("0123456789abcdef0123456789abcdef", uri)
    with pytest.raises(ModelRefError, match="weights.pt"):
        load_model(str(tmp_path), uri)


LEGACY_SERVING = Path(__file__).parent / "data" / "legacy_serving_v1.py"


def test_a_model_logged_with_the_old_serving_file_still_loads(uri, tmp_path):
    """Models logged before pyfunc_model.py existed carry a copy of the old serving.py as their code (the fixture is
    that file, unchanged). MLflow runs it to load the pyfunc; it imports mlplatform.models.build_model,
    mlplatform.predict.predict_array and mlplatform.tracking.resolve_tracking_uri, which must stay importable."""
    torch.manual_seed(2)
    net = build_model("compact").eval()
    files = tmp_path / "files"
    files.mkdir()
    torch.save(net.state_dict(), files / "weights.pt")  # as TrackedRun.log_model writes them
    (files / "metadata.json").write_text(json.dumps({**META, "threshold": 0.5}))
    with run(uri) as r:  # the process-wide URI is the run's inside: MLflow attaches the model to it
        info = mlflow.pyfunc.log_model(name="model", python_model=str(LEGACY_SERVING), pip_requirements=["mlflow"],
                                       artifacts={"weights": str(files / "weights.pt"),
                                                  "metadata": str(files / "metadata.json")})
    img = np.random.default_rng(1).normal(size=(2, 36, 44)).astype(np.float32)
    with process_tracking_uri(uri):
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
        pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    assert {p.name for p in local.glob("*.py")} == {LEGACY_SERVING.name}  # the old code is what MLflow runs
    out = pyfunc.predict(img)
    np.testing.assert_allclose(out, np.stack([predict_array(net, META, i, None) for i in img]), atol=1e-6)

    x = torch.randn(1, 1, 40, 48)
    with torch.no_grad():
        expected = net(x)
    for ref in (r.run_id, info.model_uri, local):  # our loader reads only weights.pt + metadata.json
        model, meta = load_model(ref, uri)
        assert meta["preset"] == "compact" and meta["threshold"] == 0.5
        with torch.no_grad():
            assert torch.equal(model(x), expected), ref


def test_importing_the_platform_registers_no_mlflow_model():
    """Only MLflow executes pyfunc_model.py: importing tracking, serving or predict must not call set_model (which
    would make this process's next models-from-code load or log pick up our model)."""
    code = ("import mlplatform.tracking, mlplatform.serving, mlplatform.predict\n"
            "import mlflow.models.model\n"
            "print(repr(mlflow.models.model.__mlflow_model__))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "None"


def test_a_store_made_from_the_schema_template_equals_a_migrated_one(tmp_path, monkeypatch):
    """A new SQLite store is a copy of the cached schema template (mlplatform.store.schema_template) instead of ~440
    migration statements: the same tables, indexes, alembic version and rows as a migrated store, and the Default
    experiment MLflow itself gives a new store (its artifact root, from the working folder, and its time)."""
    import sqlite3

    from mlplatform.store import _new_sqlite_store, schema_template

    monkeypatch.chdir(tmp_path)
    template = schema_template()
    assert template is not None and template.parent.parent == Path(os.environ["HRTEM_CACHE_DIR"])

    def normal(sql):
        """A table's SQL with its constraints in one order: alembic's batch migrations rebuild tables with their
        constraints in set order, which differs from process to process (two migrated stores differ the same way)."""
        if not sql or "\n" not in sql:
            return sql
        lines = [line.strip().rstrip(",").strip() for line in sql.splitlines()]
        head, body, tail = lines[0], lines[1:-1], lines[-1]
        constraint = ("CONSTRAINT", "CHECK", "FOREIGN", "PRIMARY", "UNIQUE")
        return (head, [b for b in body if not b.startswith(constraint)],
                sorted(b for b in body if b.startswith(constraint)), tail)

    def contents(db):
        con = sqlite3.connect(db)
        try:
            schema = sorted((kind, name, table, repr(normal(sql))) for kind, name, table, sql
                            in con.execute("select type, name, tbl_name, sql from sqlite_master"))
            rows = {name: sorted(map(repr, con.execute(f'select * from "{name}"')))
                    for (kind, name, _, _) in schema if kind == "table" and name != "experiments"}
            experiments = list(con.execute("select experiment_id, name, artifact_location, lifecycle_stage, "
                                           "creation_time from experiments"))
        finally:
            con.close()
        return schema, rows, experiments

    before = int(time.time() * 1000)
    _new_sqlite_store(tmp_path / "migrated.db", None)
    _new_sqlite_store(tmp_path / "copied.db", template)
    migrated, copied = contents(tmp_path / "migrated.db"), contents(tmp_path / "copied.db")
    assert len(migrated[0]) > 50 and copied[:2] == migrated[:2]
    (eid, name, location, stage, created), = copied[2]
    assert [row[:4] for row in migrated[2]] == [(eid, name, location, stage)] == [
        (0, "Default", (tmp_path / "mlruns" / "0").as_posix(), "active")]
    assert before <= created <= int(time.time() * 1000)  # made now, not when the template was
