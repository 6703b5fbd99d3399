"""The MLflow tracking store: where it is, opening it, and this process's MLflow settings while using it.

Local default: a SQLite store ``mlruns/mlflow.db`` with artifacts in ``mlruns/artifacts`` (MLflow >= 3 refuses the
plain file store). At scale, point ``tracking_uri`` / ``MLFLOW_TRACKING_URI`` at a tracking server; nothing else
changes. This module is the bottom of the MLflow side of the platform: it imports no other mlplatform module.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import mlflow
from mlflow import MlflowClient

URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # two+ letters so a Windows drive letter is not a scheme


def has_scheme(uri: str) -> bool:
    """A URI (sqlite:, http:, runs:, databricks...) rather than a local path."""
    return bool(URI_SCHEME.match(uri)) or uri.startswith("databricks")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The argument, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db (created).

    A plain path is taken as a local store: ``x.db`` is the database itself, anything else a folder for mlflow.db.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and has_scheme(uri):
        return uri
    db = Path(uri or "mlruns").expanduser().absolute()
    if db.suffix != ".db":
        db = db / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


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
    def touch():
        MlflowClient(uri).search_experiments(max_results=1)

    if uri.startswith("sqlite:///"):
        import fcntl

        db = Path(uri[len("sqlite:///"):].split("?")[0])
        with open(db.parent / (db.name + ".init-lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
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


__all__ = ["URI_SCHEME", "has_scheme", "resolve_tracking_uri", "artifact_location", "ensure_store",
           "quiet_mlflow", "process_tracking_uri"]
