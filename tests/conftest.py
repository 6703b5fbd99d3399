"""Shared fixtures: a real, throwaway PostgreSQL server for tests that must also run against PostgreSQL, a real Dask
scheduler with two worker processes (``dask_cluster``), the tiny simulated datasets (``tiny_dataset``), and the
workspace of the sweep and study tests (``workspace``).

``postgres_server`` (session) starts one private cluster from Debian's server binaries (package ``postgresql``),
listening on 127.0.0.1 and a socket directory inside its own temporary directory, and stops and deletes it at the end
of the session. ``postgres_url`` (function) gives each test a fresh, empty database on it.

Without the binaries the tests that use these fixtures are skipped on a developer machine, but fail when ``CI=true``:
CI must run them (``.ci/run`` installs the package).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PG_SUPERUSER = "postgres"  # the database superuser the cluster is created with, whoever runs it
PG_SYSTEM_USER = "postgres"  # the OS user Debian's package creates; the server runs as it when the tests run as root
START_TIMEOUT_S = 60


def _unavailable(reason: str):
    """Skip on a developer machine, fail in CI (where these tests must run)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL test server unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL test server unavailable: {reason}")


def _version_key(bindir: str):
    version = Path(bindir).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(p) for p in re.findall(r"\d+", version)) or (0,)


def _find_bindir() -> Path | None:
    candidates = [os.path.dirname(p) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    candidates = [d for d in candidates
                  if all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl", "postgres"))]
    return Path(max(candidates, key=_version_key)) if candidates else None


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A running throwaway cluster. ``new_database(name)`` creates an empty database and returns its URL."""

    def __init__(self, bindir: Path, base: Path, as_user: str | None):
        self.bindir = bindir
        self.base = base
        self.datadir = base / "data"
        self.socket_dir = base / "socket"
        self.logfile = base / "server.log"
        self.as_user = as_user  # OS user to run the server as (None: the current user)
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.user = PG_SUPERUSER
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._names: set[str] = set()

    # -- process plumbing -------------------------------------------------------------------------------------
    def _cmd(self, *args) -> list[str]:
        cmd = [str(a) for a in args]
        if self.as_user is None:
            return cmd
        if shutil.which("runuser"):
            return ["runuser", "-u", self.as_user, "--", *cmd]
        return ["setpriv", f"--reuid={self.as_user}", f"--regid={self.as_user}", "--init-groups", "--", *cmd]

    @staticmethod
    def _env() -> dict:
        # LC_ALL=C: initdb and the server must not depend on whatever locale the caller has (or lacks).
        env = dict(os.environ, LC_ALL="C", LANG="C")
        for var in ("PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE", "PGOPTIONS"):
            env.pop(var, None)
        return env

    def _run(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._cmd(*args), cwd=self.base, env=self._env(), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                               f"{self._log_tail()}")
        return proc

    def _log_tail(self) -> str:
        try:
            return "\n--- server log ---\n" + "\n".join(self.logfile.read_text().splitlines()[-30:])
        except OSError:
            return ""

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self):
        t0 = time.monotonic()
        self.socket_dir.mkdir()
        if self.as_user is not None:
            pw = pwd.getpwnam(self.as_user)
            for path in (self.base, self.socket_dir):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self._run(self.bindir / "initdb", "-D", self.datadir, "-U", PG_SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")
        # Trust, but only on the socket (inside our private directory) and the IPv4 loopback address.
        (self.datadir / "pg_hba.conf").write_text(
            "# throwaway test cluster (tests/conftest.py): local and loopback only\n"
            "local all all trust\n"
            "host  all all 127.0.0.1/32 trust\n")
        for attempt in range(5):  # the free port can be taken between our probe and the server's bind: retry
            self.port = _free_loopback_port()
            self.logfile.unlink(missing_ok=True)  # so that the checks below read this attempt's log only
            with open(self.datadir / "postgresql.auto.conf", "w") as f:
                f.write(f"listen_addresses = '127.0.0.1'\n"
                        f"port = {self.port}\n"
                        f"unix_socket_directories = '{self.socket_dir}'\n"
                        "unix_socket_permissions = 0700\n"
                        "max_connections = 200\n"
                        "fsync = off\n"
                        "synchronous_commit = off\n"
                        "full_page_writes = off\n"
                        "shared_buffers = 32MB\n"
                        "ssl = off\n"
                        "logging_collector = off\n")
            if self._launch():
                break
            if "already in use" not in self._log_tail() or attempt == 4:
                raise RuntimeError(f"the PostgreSQL server did not start:{self._log_tail()}")
        self.start_seconds = time.monotonic() - t0

    def _launch(self) -> bool:
        """Start the server as our child process (so that we, not init, reap it); True once it accepts connections."""
        with open(self.logfile, "w") as log:
            if self.as_user is not None:
                pw = pwd.getpwnam(self.as_user)
                os.chown(self.logfile, pw.pw_uid, pw.pw_gid)
            self._proc = subprocess.Popen(self._cmd(self.bindir / "postgres", "-D", self.datadir), cwd=self.base,
                                          env=self._env(), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            try:  # what pg_ctl -w waits for: the postmaster reports 'ready' in line 8 of postmaster.pid
                lines = (self.datadir / "postmaster.pid").read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the PostgreSQL server was not ready after {START_TIMEOUT_S} s:{self._log_tail()}")

    def stop(self):
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "-t", "30", "stop",
                      check=False, timeout=60)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-m", "immediate", "-w", "-t", "30", "stop",
                          check=False, timeout=60)
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._proc.kill()  # runuser (or the server itself, when not root)
                    self._proc.wait(timeout=30)
        self._proc = None

    # -- API for tests --------------------------------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this server (psycopg 3, SQLAlchemy's default for ``postgresql://``)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def new_database(self, name: str = "test") -> str:
        """Create a fresh, empty database named after ``name`` (made unique and valid) and return its URL."""
        import psycopg
        from psycopg import sql

        base = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:50] or "test"
        unique, n = base, 1
        while unique in self._names:
            n += 1
            unique = f"{base}_{n}"
        self._names.add(unique)
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(unique)))
        return self.url(unique)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """One throwaway PostgreSQL server for the session (see the module docstring); stopped and deleted at the end."""
    bindir = _find_bindir()
    if bindir is None:
        _unavailable("no /usr/lib/postgresql/*/bin/{initdb,pg_ctl,postgres} (install the Debian package 'postgresql')")
    if os.geteuid() == 0:
        # initdb refuses to run as root: the server runs as Debian's 'postgres' user. pytest keeps its own temporary
        # root private (0700, owner only), which that user cannot enter, so the cluster gets a private directory of
        # its own in the system temporary directory, owned by 'postgres'.
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            _unavailable(f"running as root, and there is no '{PG_SYSTEM_USER}' system user to run the server as")
        if not (shutil.which("runuser") or shutil.which("setpriv")):
            _unavailable("running as root, and neither runuser nor setpriv is available to drop privileges")
        base = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))
        as_user = PG_SYSTEM_USER
    else:
        base = tmp_path_factory.mktemp("postgres")
        as_user = None
    # the socket path must fit in sun_path (107 bytes): '<base>/socket/.s.PGSQL.<port>'
    if len(str(base)) > 80:
        shutil.rmtree(base, ignore_errors=True)
        base = Path(tempfile.mkdtemp(prefix="pytest-postgres-", dir="/tmp"))
        if as_user is None:
            os.chmod(base, 0o700)
    server = PostgresServer(bindir, base, as_user)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """URL of a fresh, empty database on the session's PostgreSQL server, named after the test."""
    return postgres_server.new_database(request.node.name)


# -- a real Dask scheduler and two worker processes on loopback ---------------------------------------------------


class DaskCluster:
    """``dask scheduler`` and ``dask worker --nworkers N`` as the command-line tools start them (processes, nanny,
    loopback TCP): what ``--scheduler`` meets on a real cluster."""

    def __init__(self, base: Path, n_workers: int = 2):
        import sys

        self.base, self.n_workers = base, n_workers
        self.file = base / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self._log = open(base / "dask.log", "ab")
        self._py = sys.executable

    def _spawn(self, module: str, *args: str) -> None:
        self.procs.append(subprocess.Popen([self._py, "-m", module, *args], stdout=self._log, stderr=self._log,
                                           cwd=self.base, start_new_session=True))

    def start(self, timeout_s: float = 120) -> "DaskCluster":
        from distributed import Client

        self._spawn("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                    "--scheduler-file", str(self.file))
        deadline = time.monotonic() + timeout_s
        while not self.file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not self.file.is_file():
            raise RuntimeError(f"dask scheduler did not start: {(self.base / 'dask.log').read_text()[-2000:]}")
        self._spawn("distributed.cli.dask_worker", "--scheduler-file", str(self.file), "--nworkers",
                    str(self.n_workers), "--nthreads", "1", "--no-dashboard", "--memory-limit", "0",
                    "--local-directory", str(self.base / "workers"), "--host", "127.0.0.1")
        with Client(scheduler_file=str(self.file), timeout=60) as client:
            client.wait_for_workers(self.n_workers, timeout=timeout_s)
            self.address = client.scheduler.address
        return self

    def worker_pids(self) -> dict[str, int]:
        from distributed import Client

        with Client(scheduler_file=str(self.file), timeout=60) as client:
            return client.run(os.getpid)

    def stop(self) -> None:
        import signal

        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._log.close()


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

    port, log = _free_loopback_port(), tmp_path_factory.mktemp("moto") / "moto.log"
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

    port, log = _free_loopback_port(), tmp_path_factory.mktemp("mlflow-server") / "server.log"
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
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


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
