"""Shared fixtures: a real, throwaway PostgreSQL server for tests that must also run against PostgreSQL, a real Dask
scheduler with two worker processes (``dask_cluster``), the tiny simulated datasets (``tiny_dataset``), and the
workspace of the sweep and study tests (``workspace``).

``postgres_server`` (session) starts one private cluster from Debian's server binaries (package ``postgresql``,
see ``benchmarks.services``), listening on 127.0.0.1 and a socket directory inside its own temporary directory, and
stops and deletes it at the end of the session. ``postgres_url`` (function) gives each test a fresh, empty database on it.

Without the binaries the tests that use these fixtures are skipped on a developer machine, but fail when ``CI=true``:
CI must run them (``.ci/run`` installs the package).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.services import (DaskCluster, ServiceUnavailable, free_loopback_port, stop_process_group,
                                 throwaway_postgres)


# Two xdist workers share the two cores, and each starts training processes of its own: torch's default of one
# thread per core in every process oversubscribes the machine, and OpenMP's waiting threads spin on the cores the
# others need (two concurrent tiny trainings: 20-29 s of CPU with the default, 14-15 s with one thread each). Every
# process the tests start inherits this; experiments.workers.share_cores takes it as a ceiling.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A test session started in the background by a non-interactive shell (`make test &`, nohup) ignores Ctrl-C (SIGINT),
# and every command the tests start inherits that; our commands rightly keep an ignored Ctrl-C ignored, so the tests
# that press Ctrl-C would wait for a command that never stops. The tests stand for a terminal, where Ctrl-C is on:
# with a handler here (handlers, unlike SIG_IGN, are reset by exec) the commands start with SIGINT at its default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- how the suite runs in parallel (make test: pytest-xdist, -n 2 --dist loadgroup) -----------------------------------

# tests that share a session service run on one worker, which starts it once: the key is a fixture, the value the
# group (xdist_group) of every test that uses it
SHARED_SERVICES = {"dask_cluster": "dask", "s3_server": "s3-and-mlflow-server", "mlflow_server": "s3-and-mlflow-server"}
# a test that needs one of these servers is slow (make test-fast leaves it out; CI runs it)
SERVERS = {"postgres_server", "postgres_url", "dask_cluster", "s3_server", "mlflow_server"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Groups the tests of each shared service (SHARED_SERVICES), marks slow those that need a server (SERVERS),
    and puts the slow tests first (a stable sort, the
    same order in every worker), so that the long ones start at once and the short ones fill the gaps instead of a
    long test starting last on one worker while the other waits."""
    for item in items:
        groups = {SHARED_SERVICES[f] for f in item.fixturenames if f in SHARED_SERVICES}
        for group in sorted(groups):
            item.add_marker(pytest.mark.xdist_group(group))
        if SERVERS & set(item.fixturenames):  # before -m selects: make test-fast needs no server
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def in_ci() -> bool:
    """Whether this is a CI run: ``CI`` set to any value CI services use for "on" (true, 1, yes; any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes", "on")


def unavailable(what: str, reason: str):
    """Skip on a developer machine, fail in CI, where every test must run (a skipped test is evidence lost)."""
    if in_ci():
        pytest.fail(f"{what} unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"{what} unavailable: {reason}")


@pytest.fixture(scope="session", autouse=True)
def shard_hash_cache(tmp_path_factory):
    """The cache of verified shard digests (hrtem_core.shard_hashes) in a folder of the session, not in ~/.cache:
    tests start with none and leave none (subprocesses inherit the variable)."""
    old = os.environ.get("HRTEM_CACHE_DIR")
    os.environ["HRTEM_CACHE_DIR"] = str(tmp_path_factory.mktemp("hrtem-cache"))
    yield
    if old is None:
        os.environ.pop("HRTEM_CACHE_DIR", None)
    else:
        os.environ["HRTEM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """One throwaway PostgreSQL server for the session (see the module docstring); stopped and deleted at the end."""
    try:
        with throwaway_postgres(tmp_path_factory.mktemp("postgres")) as server:
            yield server
    except ServiceUnavailable as exc:
        unavailable("PostgreSQL test server", str(exc))


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """URL of a fresh, empty database on the session's PostgreSQL server, named after the test."""
    return postgres_server.new_database(request.node.name)


# -- command lines, each in a process of its own, without an interpreter start each --------------------------------


@pytest.fixture(scope="session")
def cli(shard_hash_cache):
    """A :class:`cli_forkserver.ForkServer`: ``cli.run(argv, cwd)`` runs ``python -m <argv>``'s ``main`` in a forked
    process of its own (exit status, stdout and stderr as a subprocess gives them), for the tests of refusals and exit
    statuses. Started after the session's environment is set (``shard_hash_cache``): its children inherit it."""
    from cli_forkserver import ForkServer

    server = ForkServer()
    yield server
    server.close()


# -- a real Dask scheduler and two worker processes on loopback ---------------------------------------------------


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A Dask scheduler with two single-threaded worker processes on 127.0.0.1, for the session."""
    cluster = DaskCluster(tmp_path_factory.mktemp("dask"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


# -- an MLflow tracking server on PostgreSQL with artifacts on S3 (moto's server on loopback) ------------------------

S3_BUCKET = "hrtem-test"


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url}: no answer within {timeout_s} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible endpoint on loopback (moto in server mode; the compose file uses MinIO) with one bucket.
    Yields the environment a client needs (endpoint and dummy credentials, as the usual AWS variables)."""
    import sys

    import boto3

    port, log = free_loopback_port(), tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=out, start_new_session=True)
    env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        _wait_http(env["AWS_ENDPOINT_URL"], proc, log)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=S3_BUCKET)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(postgres_server, s3_server, tmp_path_factory):
    """A real ``mlflow server`` process: PostgreSQL backend store, artifacts proxied to s3://S3_BUCKET/mlflow.
    Yields its http:// URI."""
    import sys

    port, log = free_loopback_port(), tmp_path_factory.mktemp("mlflow-server") / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 postgres_server.new_database("mlflow_server"), "--artifacts-destination",
                                 f"s3://{S3_BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"],
                                stdout=out, stderr=out, env={**os.environ, **s3_server}, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", proc, log)
        yield uri
    finally:
        stop_process_group(proc)


# -- the tiny simulated datasets shared by the tests ---------------------------------------------------------------

# the "tiny" preset made smaller still: 64 px images of 10-13 Å particles, one phonon configuration
TINY = ("imaging.crop_px=64", "structure.particle.radius_A={dist: uniform, low: 5, high: 6.5}",
        "simulation.n_phonons=1", "output.structures_per_shard=2")


def generate_tiny(out: Path, n: int, seed: int, *overrides: str, base=TINY) -> Path:
    """A tiny simulated dataset at ``out`` (the tiny preset, ``base`` overrides, then ``overrides``)."""
    from datagen.pipeline import generate
    from datagen.recipe import load_recipe

    generate(load_recipe("tiny", [*base, *overrides]), n=n, seed=seed, out=out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """``make(n, seed, *overrides, base=TINY)``: the path of a tiny simulated dataset, generated once per session for
    each distinct set of arguments (tests only read it)."""
    root, made = tmp_path_factory.mktemp("tiny"), {}

    def make(n: int, seed: int, *overrides: str, base=TINY) -> Path:
        key = (n, seed, tuple(base), overrides)
        if key not in made:
            made[key] = generate_tiny(root / f"ds{len(made)}-seed{seed}", n, seed, *overrides, base=base)
        return made[key]

    return make


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """Tiny train/bench/target datasets and ``base.yaml`` (experiment ``exp-test``) that sweep and study definitions
    written next to it (``sweep_helpers.write_spec``) override."""
    import yaml

    root = tmp_path_factory.mktemp("exp")
    for name, n, seed, extra in (("train", 12, 1, []), ("bench", 4, 2, []),
                                 ("target", 8, 3, ["imaging.dose_e_per_A2=150"])):
        generate_tiny(root / name, n, seed, *extra)
    base = {
        "seed": 0, "epochs": 1,
        "data": {"train": [{"path": str(root / "train")}], "val_fraction": 0.34, "crop_px": 32, "batch_size": 4,
                 "steps_per_epoch": 3},
        "benchmarks": [{"name": "bench", "path": str(root / "bench")}],
        "tracking": {"experiment": "exp-test", "n_prediction_images": 0, "system_metrics": False},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request, tmp_path):
    """(claims URL, tracking URI) on a fresh SQLite file pair, or on two fresh PostgreSQL databases (the claims
    database is also a study's Optuna storage: its claims tables sit beside Optuna's)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sweeps.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = request.getfixturevalue("postgres_server")
    tag = f"t{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    return server.new_database(f"claims_{tag}"), server.new_database(f"mlflow_{tag}")
