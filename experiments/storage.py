"""Optuna storages for studies.

Studies default to Optuna's file-backed journal (several local workers may share it); any RDB URL (SQLite,
PostgreSQL shared by many machines) works too, with heartbeats: a trial whose worker has been silent for longer than
the grace period is stale (see :func:`experiments.study.align_study`). On every storage a RUNNING trial whose worker
process is gone (same host) is stale at once. Sweeps keep their claims elsewhere (:mod:`experiments.claims`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna

from hrtem_core import databases
from hrtem_core.errors import InputError

HEARTBEAT_S = 10
# how long a silent worker's trial stays RUNNING before it is failed as stale (longer on slow shared file systems or
# a loaded machine: a live worker whose trial was failed sees its run end KILLED as superseded)
GRACE_S = int(os.environ.get("STUDY_HEARTBEAT_GRACE_S", "60"))


def journal_path(url: str | None) -> Path | None:
    """The journal file a study storage argument names (the default when None); None for a database URL."""
    if url is None:
        return Path("mlruns").resolve() / "optuna-journal.log"
    if url.startswith("journal:") or url.endswith(".log"):
        return Path(url.removeprefix("journal:"))
    return None


def study_storage(url: str | None):
    """The Optuna storage ``url`` names (the default journal when None), checked before use: a journal's folder must
    exist (the default one is created) and the file, if any, be a journal; a database URL goes through
    :mod:`hrtem_core.databases` (backend, driver, SQLite file, a server that answers within a bounded time)."""
    path = journal_path(url)
    if path is not None:
        if url is None:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.parent.is_dir():
            raise InputError(f"--storage {url}: folder {path.parent} does not exist: create it, or give a journal "
                             "file in an existing folder")
        elif path.is_dir():
            raise InputError(f"--storage {url}: {path} is a folder: give a journal file (journal:PATH.log)")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    option, allowed = "--storage", "journal:PATH (a file), sqlite:///PATH.db or postgresql://USER@HOST/DB"
    if "://" not in url:
        raise InputError(f"--storage {url!r}: not a study storage; allowed: {allowed}")
    sqlite = databases.parse(url, option, allowed=allowed).get_backend_name() == "sqlite"
    connect_args = {"timeout": 60} if sqlite else databases.connect_args(url)
    databases.check_database(url, option, allowed=allowed, connect_args=connect_args)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            # several beats per grace period: a beat delayed by a loaded CPU or a busy SQLite lock must not make
            # a live worker's trial look stale
            url, heartbeat_interval=min(HEARTBEAT_S, max(GRACE_S // 6, 1)), grace_period=GRACE_S,
            engine_kwargs={"connect_args": connect_args})


# the Optuna study name under which ``python -m experiments study`` keeps the study NAME (``experiments.study``)
STUDY_PREFIX = "study:"


def _sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:`` URL; None for an in-memory database."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def existing_study(name: str, url: str | None) -> tuple[optuna.storages.BaseStorage, str, int]:
    """(storage, Optuna study name, Optuna study id) of the study ``name`` — as ``study`` created it
    (``study:NAME``), or an Optuna study of exactly that name — in the storage ``url`` names (the default when None).
    Creates nothing: ValueError naming the study, and the studies the storage does hold, when it is not there (a
    journal file or SQLite database that does not exist is not created)."""
    path = journal_path(url)
    if path is None and url.startswith("sqlite:"):
        path = _sqlite_path(url)
    if path is not None and not path.is_file():
        raise InputError(f"no study {name!r}: {path} does not exist" + (" (give --storage)" if url is None else ""))
    storage = study_storage(url)
    names = sorted(s.study_name for s in storage.get_all_studies())
    for candidate in (f"{STUDY_PREFIX}{name}", name):
        if candidate in names:
            return storage, candidate, storage.get_study_id_from_name(candidate)
    there = ", ".join(n.removeprefix(STUDY_PREFIX) for n in names) or "none"
    raise InputError(f"no study {name!r} in {storage_url(storage)}; studies there: {there}")


def storage_url(storage) -> str:
    """The URL a storage object stands for (a study's ``_storage`` too: Optuna wraps an RDB storage in a cache)."""
    if isinstance(getattr(storage, "_backend", None), optuna.storages.RDBStorage):
        storage = storage._backend
    if isinstance(storage, optuna.storages.RDBStorage):
        return storage.url
    return f"journal:{storage._backend._file_path}" if hasattr(storage, "_backend") else str(storage)
