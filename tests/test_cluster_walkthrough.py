"""README "From laptop to cluster", followed as written: ``docs/cluster-walkthrough.sh`` (shown verbatim in the
README) run on loopback — PostgreSQL with a password, moto's S3 server and the bucket, an MLflow server on both, a
Dask scheduler and two workers — with tiny data, then every unit of its sweep and every trial of its study counted
once on the server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.services import free_loopback_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "cluster-walkthrough.sh"


def test_the_readme_shows_the_walkthrough_script_verbatim():
    """The README's block is the script, byte for byte: what a newcomer reads is what the test below runs."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- docs/cluster-walkthrough\.sh -->\n```bash\n(.*?)```\n", readme, re.S)
    assert blocks == [SCRIPT.read_text()], "README.md's copy of docs/cluster-walkthrough.sh differs from the file"


@pytest.mark.slow
def test_the_walkthrough_runs_on_loopback_and_records_each_unit_once(postgres_server, tmp_path):
    from mlflow import MlflowClient

    name = f"walk{os.getpid()}"
    postgres_server.require_password(name)  # as on a real server: PGPASSWORD is needed, not trusted away
    ports = {key: str(free_loopback_port())
             for key in ("S3_PORT", "MLFLOW_PORT", "DASK_PORT", "DASK_DASHBOARD_PORT")}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PG"))},
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "WORK": str(tmp_path / "work"),
           "PG_ADMIN": f"{postgres_server.bindir / 'psql'} -h {postgres_server.host} -p {postgres_server.port} "
                       f"-U {postgres_server.user} -d postgres",
           "PGPORT": str(postgres_server.port), "DB_USER": name, "DB_PASSWORD": "s3cret-walk",
           "EXPERIMENTS_DB": f"{name}_experiments", "MLFLOW_DB": f"{name}_mlflow", "BUCKET": name,
           # tiny: 2 subsets x 1 seed (one unit per Dask worker), 2 trials, one epoch of two steps each
           "N_TRAIN": "8", "N_BENCH": "4", "EPOCHS": "1", "STEPS": "2", "SEEDS": "[0]", "TRIALS": "2",
           "MLFLOW_WORKERS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONWARNINGS": "ignore", **ports}
    start = time.monotonic()
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=400)
        took = time.monotonic() - start
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in (tmp_path / "work").glob("*.log"))
        assert proc.returncode == 0, out[-4000:] + logs
        uri = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
        assert f"MLflow UI: {uri}" in out
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("walkthrough")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        cells = [(r.data.tags["sweep.subset"], r.data.tags["seed"]) for r in runs
                 if r.data.tags.get("kind") == "cell" and r.info.status == "FINISHED"]
        assert sorted(cells) == [("all", "0"), ("near-focus", "0")], cells  # each unit once
        trials = [r.data.tags["trial"] for r in runs if r.data.tags.get("kind") == "trial"
                  and r.info.status == "FINISHED"]
        assert sorted(trials) == ["0", "1"], trials
        assert not [r.info.run_id for r in runs if r.info.status == "RUNNING" and r.data.tags.get("kind")
                    in ("cell", "trial")]
        model = next(r for r in runs if r.data.tags.get("kind") == "cell")
        assert [a.path for a in client.list_artifacts(model.info.run_id)]  # artifacts reached the bucket
        assert (tmp_path / "work" / "reports" / "walkthrough" / "index.html").is_file()
        parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")  # the report reached the server too
        assert any(a.path.startswith("report") for a in client.list_artifacts(parent.info.run_id))
        print(f"walkthrough: {took:.0f} s")
    finally:
        try:  # the services it leaves running for a newcomer, and anything a failure left
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(2)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
