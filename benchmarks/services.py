"""Throwaway services on loopback for the tests and the benchmarks: a private PostgreSQL cluster from Debian's server
binaries (package ``postgresql``) and a Dask scheduler with worker processes, started the way an operator would.

Nothing here is used by the platform itself; it stands up the real engines the platform is pointed at.
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
from contextlib import contextmanager
from pathlib import Path


class ServiceUnavailable(RuntimeError):
    """A service that cannot be started on this machine; the message says what is missing."""


PG_SUPERUSER = "postgres"  # the database superuser the cluster is created with, whoever runs it
PG_SYSTEM_USER = "postgres"  # the OS user Debian's package creates; the server runs as it when the tests run as root
START_TIMEOUT_S = 60


def _version_key(bindir: str):
    version = Path(bindir).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(p) for p in re.findall(r"\d+", version)) or (0,)


def find_bindir() -> Path | None:
    candidates = [os.path.dirname(p) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    candidates = [d for d in candidates
                  if all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl", "postgres"))]
    return Path(max(candidates, key=_version_key)) if candidates else None


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the process group a service was started in (``start_new_session=True``), SIGKILL if it is still
    there after ``timeout_s``."""
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


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
            self.port = free_loopback_port()
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

    def require_password(self, role: str) -> None:
        """Make ``role`` (which may not exist yet) log in over TCP with a password (scram-sha-256), as on a real
        server, while every other role keeps trust: a rule before the trust line of pg_hba.conf, then a reload."""
        import psycopg

        hba = self.datadir / "pg_hba.conf"
        rule = f"host  all {role} 127.0.0.1/32 scram-sha-256\n"
        lines = hba.read_text().splitlines(keepends=True)
        if rule not in lines:
            hba.write_text("".join([lines[0], rule, *lines[1:]]))
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")

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


@contextmanager
def throwaway_postgres(scratch: Path):
    """A running PostgresServer for the duration, deleted afterwards; ``scratch``: a private folder of the caller."""
    bindir = find_bindir()
    if bindir is None:
        raise ServiceUnavailable("no /usr/lib/postgresql/*/bin/{initdb,pg_ctl,postgres} (install the Debian package "
                                 "'postgresql')")
    if os.geteuid() == 0:
        # initdb refuses to run as root: the server runs as Debian's 'postgres' user. pytest keeps its own temporary
        # root private (0700, owner only), which that user cannot enter, so the cluster gets a private directory of
        # its own in the system temporary directory, owned by 'postgres'.
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise ServiceUnavailable(f"running as root, and there is no '{PG_SYSTEM_USER}' system user to run the "
                                     "server as")
        if not (shutil.which("runuser") or shutil.which("setpriv")):
            raise ServiceUnavailable("running as root, and neither runuser nor setpriv is available to drop privileges")
        base = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))
        as_user = PG_SYSTEM_USER
    else:
        base = Path(scratch)
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
