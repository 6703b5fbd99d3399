"""What a newcomer met setting up the services of README "From laptop to cluster" (issue 31), each now one ``error:``
line with exit status 2 naming the cause and the fix:

* a tracking server started with ``--allowed-hosts`` that leaves out the host name the client uses (HTTP 403);
* a tracking server whose artifact bucket does not exist (HTTP 500 on every upload), before any work, and a server
  error during a run, reported as that and not as a lost server;
* a Dask worker started without the database password, whose reason reaches the sweep's console with its address.

One extra MLflow server (SQLite, allowed hosts 127.0.0.1:PORT only, artifacts in a bucket of the session's moto S3
that the tests create and remove) serves the first two.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from benchmarks.services import free_loopback_port, stop_process_group
from cli_forkserver import _env
from conftest import _wait_http
from hrtem_core.errors import ServiceError

GONE = "hrtem-gone"  # the guarded server's artifact bucket: absent unless a test makes it


@pytest.fixture(scope="module")
def guarded_server(s3_server, tmp_path_factory):
    """``(uri, s3 client)``: an MLflow server that allows only the Host header 127.0.0.1:PORT, its artifacts in
    s3://GONE/mlflow on the session's moto server; its store a copy of the migrated empty SQLite template."""
    import boto3

    from mlplatform.store import schema_template

    folder, port = tmp_path_factory.mktemp("guarded-server"), free_loopback_port()
    shutil.copy(schema_template(), folder / "mlflow.db")
    log = folder / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", f"s3://{GONE}/mlflow",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--allowed-hosts", f"127.0.0.1:{port}"],
                                stdout=out, stderr=out, start_new_session=True,
                                env={**_env(), **s3_server, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}", s3
    finally:
        stop_process_group(proc)


def _drop_bucket(s3) -> None:
    if GONE in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        for item in s3.list_objects_v2(Bucket=GONE).get("Contents", []):
            s3.delete_object(Bucket=GONE, Key=item["Key"])
        s3.delete_bucket(Bucket=GONE)


def _one_error(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def test_a_host_name_the_server_does_not_allow_is_one_error_naming_allowed_hosts(guarded_server, workspace, tmp_path,
                                                                                  cli):
    uri, _ = guarded_server
    port = uri.rsplit(":", 1)[1]
    res = cli.run(["experiments", "train", "--quiet", "--config", str(workspace / "base.yaml"), "--tracking-uri",
                   f"http://localhost:{port}"], tmp_path)
    line = _one_error(res)
    assert "HTTP 403" in line and f"'localhost:{port}'" in line and "--allowed-hosts" in line, line
    assert not list(tmp_path.iterdir())


def test_an_artifact_bucket_that_does_not_exist_is_refused_before_any_work(guarded_server, workspace, tmp_path, cli):
    uri, s3 = guarded_server
    _drop_bucket(s3)
    res = cli.run(["experiments", "train", "--quiet", "--config", str(workspace / "base.yaml"), "--tracking-uri", uri],
                  tmp_path)
    line = _one_error(res)
    assert f"s3://{GONE}/mlflow" in line and "bucket does not exist" in line, line
    assert "hrtem_core.buckets create" in line and "AWS_ACCESS_KEY_ID" in line, line
    assert MlflowClient(uri).get_experiment_by_name("exp-test") is None  # nothing was started


def test_a_server_error_during_a_run_is_reported_as_that_not_as_a_lost_server(guarded_server, monkeypatch):
    """The bucket goes away mid-run: every upload gets HTTP 500. After MLflow's retries (none here) the run ends
    FAILED with the server's words; the old message sent the user to restart a server that was up."""
    from mlplatform.tracking import TrackedRun

    uri, s3 = guarded_server
    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():
        monkeypatch.setenv(name, value)
    s3.create_bucket(Bucket=GONE)
    with pytest.raises(ServiceError) as caught:
        with TrackedRun(uri, "server-error", "run", {}, {}, system_metrics=False) as run:
            _drop_bucket(s3)
            run.log_text("x", "a.txt")
    message = str(caught.value)
    assert "answered HTTP 500" in message and "the server is up" in message, message
    assert f"s3://{GONE}/mlflow" in message and "bucket does not exist" in message, message
    assert "lost" not in message and f"--resume {run.run_id}" in message, message
    after = MlflowClient(uri).get_run(run.run_id)
    assert after.info.status == "FAILED" and "HTTP 500" in after.data.tags["failure_reason"]


def test_a_dask_worker_without_the_database_password_is_named_with_its_reason(dask_cluster, postgres_server,
                                                                              monkeypatch):
    """This process has PGPASSWORD, the Dask workers (started without it) do not. What a sweep's or study's workers
    do first, opening the claims database (here alone: a whole sweep would spend its time importing torch in each
    worker), fails there; the one error line (an InputError: ``error: ...``, exit status 2 on the command line) names
    a worker, libpq's reason and the fix, where the sweep used to say only "worker process ended with exit code 1"."""
    import psycopg
    from psycopg import sql

    from experiments.workers import run_on_dask
    from hrtem_core.databases import check_database
    from hrtem_core.errors import InputError

    role = f"nopw{os.getpid()}"
    postgres_server.require_password(role)
    with psycopg.connect(host=postgres_server.host, port=postgres_server.port, user=postgres_server.user,
                         dbname="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'secret-pw'").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(role), sql.Identifier(role)))
    url = f"postgresql://{role}@{postgres_server.host}:{postgres_server.port}/{role}"
    monkeypatch.setenv("PGPASSWORD", "secret-pw")
    check_database(url, "--storage")  # here, with the password, it opens
    with pytest.raises(InputError) as caught:
        run_on_dask(check_database, lambda slot, share: (url, "--storage"), "sweep nopw", dask_cluster.address)
    line = str(caught.value)
    assert line.startswith("sweep nopw: no Dask worker could start its work; worker tcp://127.0.0.1:"), line
    assert f"--storage {url}: cannot connect" in line and "fe_sendauth: no password supplied" in line, line
    assert "PGPASSWORD" in line and "Dask worker" in line, line


def test_a_child_process_failure_comes_back_with_its_first_error_line(capfd):
    """What run_on_dask reports for a worker: bad input in the child is its ``error:`` line and exit status 2, a bug
    the last line of its traceback and exit status 1; both still reach our stderr (the Dask worker's log)."""
    from hrtem_core.buckets import bucket_name
    from hrtem_core.processes import run_in_child

    assert run_in_child(bucket_name, "nowhere") == (2, "bucket 'nowhere': not an S3 URL; give s3://BUCKET")
    assert run_in_child(int, "x") == (1, "ValueError: invalid literal for int() with base 10: 'x'")
    assert run_in_child(bucket_name, "s3://fine") == (0, None)
    err = capfd.readouterr().err
    assert "error: bucket 'nowhere'" in err and "Traceback (most recent call last)" in err


@pytest.mark.parametrize("text, status, unreachable", [
    ("API request to http://h:5000/api/2.0/mlflow-artifacts/artifacts/1/x/a.txt failed with exception "
     "HTTPConnectionPool(host='h', port=5000): Max retries exceeded with url: /api/2.0/mlflow-artifacts/artifacts/1/x/"
     "a.txt (Caused by ResponseError('too many 500 error responses'))", 500, False),
    ("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 503 != 200. Response body: ''",
     503, False),
    ("API request to http://h:5000/api/2.0/mlflow/runs/get failed with exception HTTPConnectionPool(host='h', "
     "port=5000): Max retries exceeded with url: /x (Caused by NewConnectionError('Connection refused'))", None, True),
])
def test_a_server_error_is_told_from_a_server_that_cannot_be_reached(text, status, unreachable):
    from mlplatform.store import is_unreachable, server_error

    assert server_error(RuntimeError(text)) == status
    assert is_unreachable(RuntimeError(text)) is unreachable
