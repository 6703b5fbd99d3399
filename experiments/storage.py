"""Optuna storages for sweeps and studies.

Sweeps use an RDB storage (SQLite by default, PostgreSQL to share among machines) because its heartbeats let a
restarted sweep detect the cells a killed worker was running and hand them out again. Studies default to Optuna's
file-backed journal (several local workers may share it); any RDB URL works for them too.
"""

from __future__ import annotations

from pathlib import Path

import optuna

import os

HEARTBEAT_S = 10
# how long a silent worker's cell waits before it is handed out again (longer on slow shared file systems)
GRACE_S = int(os.environ.get("SWEEP_HEARTBEAT_GRACE_S", "30"))


def default_dir() -> Path:
    path = Path("mlruns").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sweep_storage(url: str | None) -> optuna.storages.RDBStorage:
    url = url or f"sqlite:///{default_dir() / 'optuna.db'}"
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise ValueError(f"--storage {url!r}: a sweep needs an RDB URL (sqlite:///path.db, postgresql://...), "
                         "whose heartbeats detect the cells of a killed worker")
    return optuna.storages.RDBStorage(
        # several beats per grace period: a beat delayed by a loaded CPU or a busy SQLite lock must not make a live
        # worker's cell look stale
        url, heartbeat_interval=min(HEARTBEAT_S, max(GRACE_S // 6, 1)), grace_period=GRACE_S,
        # a cell whose worker died is handed out again: that was no failure of the cell
        failed_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None),
        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None,
    )


def study_storage(url: str | None):
    if url is None or url.startswith("journal:") or url.endswith(".log"):
        path = Path(url.removeprefix("journal:")) if url else default_dir() / "optuna-journal.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        return optuna.storages.RDBStorage(url)
    raise ValueError(f"--storage {url!r}: use journal:PATH (a file), sqlite:///PATH or postgresql://...")


def storage_url(storage) -> str:
    if isinstance(storage, optuna.storages.RDBStorage):
        return storage.url
    return f"journal:{storage._backend._file_path}" if hasattr(storage, "_backend") else str(storage)
