"""The MLflow tracking store: where it is, opening it, and this process's MLflow settings while using it.

Local default: a SQLite store ``mlruns/mlflow.db`` with artifacts in ``mlruns/artifacts`` (MLflow >= 3 refuses the
plain file store). At scale, point ``tracking_uri`` / ``MLFLOW_TRACKING_URI`` at a tracking server; nothing else
changes. This module is the bottom of the MLflow side of the platform: it imports no other mlplatform module.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
from mlflow import MlflowClient

from hrtem_core.databases import CONNECT_TIMEOUT_S, CONNECT_TRIES, check_database, connect_args, redact
from hrtem_core.errors import InputError
from hrtem_core.files import atomic_writer, cache_dir, write_atomic

URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # two+ letters so a Windows drive letter is not a scheme


def has_scheme(uri: str) -> bool:
    """A URI (sqlite:, http:, runs:, databricks...) rather than a local path."""
    return bool(URI_SCHEME.match(uri)) or uri.startswith("databricks")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The argument, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db (created).

    A plain path is taken as a local store: ``x.db`` is the database itself, anything else a folder for mlflow.db.
    """
    given = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if given and has_scheme(given):
        return given
    db = Path(given or "mlruns").expanduser().absolute()
    if db.suffix != ".db" or db.is_dir():
        if db.exists() and not db.is_dir():
            raise InputError(f"tracking URI {given}: {db} is a file, not a folder: give a folder (its mlflow.db "
                             "holds the runs), an existing MLflow .db file, or a URI (sqlite:///, http://...)")
        db = db / "mlflow.db"
    _store_folder(db.parent, given)
    return f"sqlite:///{db}"


def _store_folder(folder: Path, uri: str) -> None:
    """The folder of a new local store, created (as MLflow does); InputError naming the URI if it cannot be."""
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"tracking URI {uri}: cannot create the folder {folder}: {exc.strerror}") from None


# what MLflow's HTTP client may spend on one request to a tracking server once the server has answered our check:
# 4 retries with exponential back-off (about 30 s for a refused connection), each try bounded by 30 s; MLflow's own
# defaults (7 retries, 120 s) let a run hang for minutes when its server goes away. Set only where the user has not.
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
ALLOWED = ("a folder or an MLflow .db file, sqlite:///PATH.db, postgresql://USER@HOST/DB, mysql://USER@HOST/DB, "
           "or a tracking server http(s)://HOST:PORT")


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking URI that cannot work, before anything uses it: an unknown scheme, a database that is not
    there or whose driver is missing (:mod:`hrtem_core.databases`), a server that does not answer within a bounded
    time. Each is one InputError naming the URI and what is allowed."""
    scheme = uri.split(":", 1)[0].lower()
    kind = scheme.split("+", 1)[0]
    if kind in DATABASE_SCHEMES:
        if kind == "sqlite":
            db = Path(uri[len("sqlite:///"):].split("?")[0]) if uri.startswith("sqlite:///") else None
            if db is not None and db.name:
                _store_folder(db.parent, redact(uri))  # a new local store, as for a plain path
        check_database(uri, "tracking URI", supported=DATABASE_SCHEMES, allowed=ALLOWED,
                       connect_args={} if kind == "sqlite" else connect_args(uri))
    elif kind in SERVER_SCHEMES:
        check_server(uri)
    elif kind == "file":
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise InputError(f"tracking URI {uri}: MLflow 3 keeps runs in a database, not in plain files: give the "
                             "folder as a path (its mlflow.db holds the runs) or sqlite:///PATH.db")
    elif not kind.startswith(("databricks", "uc")):
        raise InputError(f"tracking URI {redact(uri)!r}: unknown scheme {scheme!r}; allowed: {ALLOWED}")


def check_server(uri: str) -> None:
    """The tracking server answers within CONNECT_TRIES bounded attempts, accepts the host name ``uri`` uses, and its
    artifact store works; each failure is one InputError naming the cause and the fix.

    The probe is an API call, not ``/health``: MLflow >= 3.5 checks the Host header of every request but that one, so
    a server started with ``--allowed-hosts`` that omits the name in ``uri`` answers /health and refuses the rest."""
    import time

    import requests

    base, start, last = uri.rstrip("/"), time.monotonic(), None
    for attempt in range(CONNECT_TRIES):
        try:
            answer = requests.get(base + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                                  timeout=CONNECT_TIMEOUT_S)
            break
        except requests.exceptions.RequestException as exc:
            last = exc
        if attempt < CONNECT_TRIES - 1:
            time.sleep(1.0 + attempt)
    else:
        cause = "no answer" if isinstance(last, requests.exceptions.Timeout) else "connection refused" if \
            "refused" in str(last).lower() else type(last).__name__
        raise InputError(f"tracking URI {redact(uri)}: the tracking server does not answer ({cause}) after "
                         f"{CONNECT_TRIES} tries in {time.monotonic() - start:.0f} s: start it (mlflow server ...), "
                         "or give another --tracking-uri")
    if answer.status_code == 403 and "Host header" in answer.text:
        host = urlsplit(base).netloc
        raise InputError(f"tracking URI {redact(uri)}: the tracking server refuses the host name {host!r} (HTTP 403, "
                         f"{answer.text.strip()!r}): its --allowed-hosts replaces MLflow's defaults (localhost and "
                         f"private addresses) and must list every HOST:PORT clients use: restart it with "
                         f"--allowed-hosts including {host}, or give --tracking-uri with a host name it allows")
    problem = artifact_store_problem(base)
    if problem:
        raise InputError(f"tracking URI {redact(uri)}: the tracking server's artifact store fails: {problem}")


# what a tracking server needs for S3 artifacts: said in every error about its artifact store
ARTIFACT_STORE_FIX = ("the server needs its --artifacts-destination bucket to exist (python -m hrtem_core.buckets "
                      "create s3://BUCKET) and S3 credentials in its own environment (AWS_ACCESS_KEY_ID, "
                      "AWS_SECRET_ACCESS_KEY, and MLFLOW_S3_ENDPOINT_URL for MinIO or another S3-compatible store); "
                      "its log has the details")


def artifact_store_problem(base: str) -> str | None:
    """What is wrong with the artifact store of the tracking server at ``base``, in the server's words, with the fix;
    None when it lists its artifact root (or does not proxy artifacts, which is then no concern of the server's).
    One request, no retries: MLflow's client retries a server error for minutes and then reports only its status."""
    import requests

    try:
        answer = requests.get(base + "/api/2.0/mlflow-artifacts/artifacts", params={"path": ""},
                              timeout=CONNECT_TIMEOUT_S)
    except requests.exceptions.RequestException:
        return None  # the caller reports the server itself
    try:
        message = str(answer.json().get("message", ""))
    except ValueError:
        message = ""
    if "Failed to list artifacts" in message or answer.status_code >= 500:
        said = message or f"HTTP {answer.status_code} {answer.reason}".strip()
        return f"{said}: {ARTIFACT_STORE_FIX}"
    return None


def artifact_location(tracking_uri: str) -> str | None:
    """<folder of the SQLite file>/artifacts for a local store; a server or database chooses its own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):].split("?")[0])
    return (db.absolute().parent / "artifacts").as_uri()


@lru_cache(maxsize=8)
def ensure_store(uri: str) -> None:
    """Open the tracking store once per process, creating its schema under a lock when it is new.

    MLflow creates a fresh database's tables on first use, without a lock: processes that start at the same instant
    (a sweep launched on three machines) crash inside its migrations ("table ... already exists"). An SQLite store is
    opened under an exclusive lock on a file beside it; a PostgreSQL store under an advisory lock; a tracking server
    initialises its own database once.
    """
    check_tracking_uri(uri)
    if uri.split(":", 1)[0].lower() in SERVER_SCHEMES:
        for name, value in HTTP_RETRY_ENV.items():
            os.environ.setdefault(name, value)

    def touch():
        MlflowClient(uri).search_experiments(max_results=1)

    if uri.startswith("sqlite:///"):
        import fcntl

        db = Path(uri[len("sqlite:///"):].split("?")[0])
        with open(db.parent / (db.name + ".init-lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not db.exists() or db.stat().st_size == 0:
                _new_sqlite_store(db, schema_template())
            touch()
    elif uri.startswith(("postgresql:", "postgresql+")):
        import sqlalchemy as sa

        engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:  # held until the schema exists; released with the session
            conn.execute(sa.text("SELECT pg_advisory_lock(7342001)"))
            try:
                touch()
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(7342001)"))
        engine.dispose()
    else:
        touch()
    for line in replay_pending_ends(uri):
        print(line, file=sys.stderr)


def _new_sqlite_store(db: Path, template: Path | None) -> None:
    """Create a new SQLite store's schema in a file beside it and rename it into place; the caller holds the lock.

    MLflow's migrations on SQLite are not one transaction (alembic commits each DDL statement there), so a process
    killed while they run would leave a half-made schema at ``db`` on which every later process fails ("table ...
    already exists"). Built aside (:func:`hrtem_core.files.atomic_writer`), a kill leaves only a stray
    ``<name>.<pid>.partial``, removed by the next process to take the lock; ``db`` is either absent (or the empty file
    a connection check left) or complete.

    ``template`` (:func:`schema_template`): a copy of it replaces the migrations (~440 statements, about a second);
    MLflow then finds its tables and adds its Default experiment itself, as it does after migrating.
    """
    import shutil

    for stale in db.parent.glob(f"{db.name}.*.partial"):  # from a process killed here: we hold the lock, it does not
        stale.unlink(missing_ok=True)
    with atomic_writer(db) as fh:  # SQLite fills the empty file; it is fsynced and renamed when this block ends
        if template is not None:
            with open(template, "rb") as src:
                shutil.copyfileobj(src, fh)
            fh.flush()
        _open_with_mlflow(Path(fh.name))


def _open_with_mlflow(db: Path) -> None:
    """Let MLflow open the SQLite file ``db`` as a tracking store, as a client does: it migrates an empty file and adds
    its Default experiment (with the artifact root MlflowClient would give it) where there is none; then let go."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    uri = f"sqlite:///{db}"
    store = _get_sqlalchemy_store(uri, None)
    store.engine.dispose()  # no connection may outlive a rename (its journal is named after the old path)
    SqlAlchemyStore._engine_map.pop(uri, None)


def schema_template() -> Path | None:
    """An empty SQLite store of this MLflow version, migrated, without MLflow's Default experiment (which each new
    store gets from MLflow with its own artifact root and time): ``<cache>/mlflow-sqlite-schema/mlflow-<version>.db``,
    made on first use. None where there is no cache folder to keep it in (stores are then migrated one by one)."""
    import sqlite3

    folder = cache_dir()
    if folder is None:
        return None
    template = folder / "mlflow-sqlite-schema" / f"mlflow-{mlflow.__version__}.db"
    if template.is_file() and template.stat().st_size > 0:
        return template
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(template) as fh:  # complete or absent; processes making it together each rename a whole one
            _open_with_mlflow(Path(fh.name))
            con = sqlite3.connect(fh.name)
            try:
                with con:
                    con.execute("DELETE FROM experiments WHERE experiment_id = 0")
            finally:
                con.close()
    except OSError:
        return None
    return template


# -- a store that goes away mid-run -----------------------------------------------------------------------------------

# MLflow's client retries a 5xx answer (urllib3: "too many 500 error responses") or reports it after
# raise_for_status ("500 Server Error"): either way the server answered
SERVER_ERROR = re.compile(r"too many (5\d\d) error responses|\b(5\d\d) Server Error|error code (5\d\d)")


def server_error(exc: BaseException | None) -> int | None:
    """The HTTP status when ``exc`` (or what it was raised from) says a tracking server answered with a server error
    (5xx): the server is up, and something behind it (its database, its artifact store) failed."""
    seen = 0
    while exc is not None and seen < 12:
        found = SERVER_ERROR.search(str(exc))
        if found:
            return int(next(g for g in found.groups() if g))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def is_unreachable(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what it was raised from) says the tracking store could not be reached — a refused or
    dropped connection, a timeout, MLflow's "Max retries exceeded" — rather than that it refused a request or
    answered with a server error (:func:`server_error`)."""
    import requests
    import sqlalchemy as sa

    if server_error(exc) is not None:
        return False
    seen = 0
    while exc is not None and seen < 12:
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                            TimeoutError, sa.exc.OperationalError, sa.exc.InterfaceError)):
            return True
        text = str(exc)
        if "Max retries exceeded" in text or "failed with timeout exception" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@contextmanager
def short_http_retries():
    """MLflow's HTTP client with one quick retry for the duration: for the calls that record why a run ended after
    its server stopped answering (each would otherwise wait out the full retry budget again)."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    old = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


PENDING_ENDS = "pending-run-ends.json"


def _pending_file() -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / PENDING_ENDS


@contextmanager
def _pending_locked():
    """(path, entries) of the pending-ends file under an exclusive lock; entries written back on exit."""
    import fcntl
    import json

    path = _pending_file()
    if path is None:
        raise OSError("no cache folder (set HRTEM_CACHE_DIR)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(PENDING_ENDS + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries = json.loads(path.read_text()) if path.exists() else []
        except (OSError, ValueError):
            entries = []
        entries = [e for e in entries if isinstance(e, dict) and {"uri", "run_id", "status", "reason", "time_ms"}
                   <= set(e)]
        before = list(entries)
        yield path, entries
        if entries != before:
            write_atomic(path, json.dumps(entries, indent=1).encode())


def record_pending_end(uri: str, run_id: str, status: str, reason: str) -> Path:
    """Keep, on this machine, that run ``run_id`` of the store ``uri`` ended with ``status`` for ``reason`` although
    the store could not be told; :func:`replay_pending_ends` tells it when a command next reaches that store."""
    import time

    with _pending_locked() as (path, entries):
        entries.append({"uri": uri, "run_id": run_id, "status": status, "reason": reason,
                        "time_ms": int(time.time() * 1000)})
    return path


def replay_pending_ends(uri: str) -> list[str]:
    """End, in the store ``uri``, the runs this machine could not end there (see :func:`record_pending_end`): a run
    still RUNNING gets the recorded status, reason (``failure_reason`` tag) and end time; a run that was resumed or
    ended since keeps what it has. Returns one line per run; never raises for the cache file."""
    lines = []
    try:
        with _pending_locked() as (_, entries):
            mine = [e for e in entries if e["uri"] == uri]
            if not mine:
                return lines
            client = MlflowClient(uri)
            for entry in mine:
                try:
                    run = client.get_run(entry["run_id"])
                except mlflow.exceptions.MlflowException as exc:
                    if is_unreachable(exc):
                        continue  # keep it for a later command
                    entries.remove(entry)  # the run is gone (deleted): nothing left to end
                    continue
                if run.info.status == "RUNNING":
                    client.set_tag(entry["run_id"], "failure_reason", entry["reason"])
                    client.set_terminated(entry["run_id"], entry["status"], end_time=entry["time_ms"])
                    lines.append(f"run {entry['run_id']}: ended {entry['status']} now that the store answers "
                                 f"({entry['reason']})")
                entries.remove(entry)
    except OSError:
        pass
    return lines


@contextmanager
def quiet_mlflow():
    """No per-file progress bars and no "cannot infer signature" warning (our pyfunc takes any H x W, on purpose)
    in every training run's log or every prediction; errors still show."""
    old_env, logger = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"), logging.getLogger("mlflow.pyfunc")
    old_level = logger.level
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old_level)
        if old_env is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old_env


@contextmanager
def process_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI set to ``uri`` for the duration, then put back (public API only).

    Needed because MLflow 3 resolves models:/ URIs (also behind runs:/<id>/model) with a client on the process-wide
    URI, ignoring the tracking_uri passed to download_artifacts, and attaches logged models to it.
    """
    was_set, old, old_env = mlflow.is_tracking_uri_set(), mlflow.get_tracking_uri(), os.environ.get(
        "MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old if was_set else None)
        if old_env is not None:  # set_tracking_uri also writes the environment variable: restore it exactly
            os.environ["MLFLOW_TRACKING_URI"] = old_env


__all__ = ["URI_SCHEME", "has_scheme", "resolve_tracking_uri", "check_tracking_uri", "check_server",
           "artifact_location", "artifact_store_problem", "ensure_store", "is_unreachable", "server_error",
           "short_http_retries", "record_pending_end", "replay_pending_ends",
           "quiet_mlflow", "process_tracking_uri"]
