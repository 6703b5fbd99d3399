"""Claims: the record of which sweep unit is done, kept in a real database so that each is recorded exactly once.

A unit is one (sweep, cell, phase). Its row is inserted idempotently when the sweep is queued, then moves
``pending -> claimed -> done`` (or back to ``pending`` after a failure, ``failed`` once its retries are used up):

* **claim** — a conditional UPDATE that bumps the unit's ``epoch`` (a fencing token) and names the holder; it matches
  only the state the claimer read (``pending``; or ``claimed`` with an expired lease; or ``claimed`` by a process on
  this host that no longer exists), so of two workers that race for one unit exactly one gets it;
* **renew** — the holder extends its lease by a conditional UPDATE on (holder, epoch); no row means the claim was
  taken over and the holder must stop;
* **commit** — ``done`` with the result's run id, by a conditional UPDATE on (holder, epoch, state claimed): only the
  current holder can record a result, and only once.

A lease-based system cannot promise that a unit *executes* once (a stalled worker looks dead and its unit is handed
out again), but with these three statements a result is *recorded* once: the stalled worker's commit finds a newer
epoch and fails. The same SQL runs on SQLite (one machine) and PostgreSQL (many machines). Clocks: leases compare
wall-clock times of the workers, so machines sharing a PostgreSQL queue need synchronised clocks (NTP); a skew only
makes a lease expire early or late, it never lets two holders commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from hrtem_core import databases
from hrtem_core.errors import InputError

HEARTBEAT_S = 10
# how long a silent worker keeps its units (longer on slow shared file systems); short values cost only repeated
# work, never a second record
GRACE_S = float(os.environ.get("SWEEP_HEARTBEAT_GRACE_S", "30"))
# failures that are not the unit's fault (a tracking-store insert race, a lost database connection) before the
# unit is given up all the same
MAX_INFRA_FAILURES = 5

PENDING, CLAIMED, DONE, FAILED = "pending", "claimed", "done", "failed"

_meta = sa.MetaData()
sweeps = sa.Table(
    "sweep_definitions", _meta,
    sa.Column("name", sa.String(250), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("experiment", sa.String(500), nullable=False),  # the MLflow experiment of its runs
    sa.Column("parent_run", sa.String(64)),
    sa.Column("created", sa.Float, nullable=False),
)
units = sa.Table(
    "sweep_units", _meta,
    sa.Column("sweep", sa.String(250), primary_key=True),
    sa.Column("cell", sa.Integer, primary_key=True),
    sa.Column("phase", sa.String(16), primary_key=True),
    sa.Column("cell_key", sa.String(300), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, default=PENDING),
    sa.Column("epoch", sa.Integer, nullable=False, default=0),
    sa.Column("holder", sa.String(300)),
    sa.Column("lease_until", sa.Float, nullable=False, default=0.0),
    sa.Column("failures", sa.Integer, nullable=False, default=0),
    sa.Column("infra_failures", sa.Integer, nullable=False, default=0),
    sa.Column("run_id", sa.String(64)),
    sa.Column("error", sa.Text),
    sa.Column("updated", sa.Float, nullable=False, default=0.0),
)


def default_url() -> str:
    path = Path("mlruns").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'sweeps.db'}"


redact = databases.redact


def open_engine(url: str | None) -> sa.Engine:
    """An engine on the claims database (created with its tables if missing; safe when many processes start at once).

    The URL is checked first (:mod:`hrtem_core.databases`: backend, driver, SQLite folder and file, a server that
    answers within a bounded time), so each way it can be unusable is one error naming ``--storage``."""
    url = url or default_url()
    option, allowed = "--storage", ("a database URL where a sweep keeps its claims: sqlite:///PATH.db (a file shared "
                                    "by the workers) or postgresql://USER@HOST/DB")
    if databases.parse(url, option, allowed=allowed).get_backend_name() == "sqlite":
        # a writer waits for the lock instead of failing at once
        engine = databases.checked_engine(url, option, allowed=allowed, connect_args={"timeout": 120})
    else:
        # a worker stopped inside a transaction (SIGSTOP, a paused VM) must not keep its row locks: every claim
        # statement is one short transaction, so a session idle in one for a minute is ended by the server
        extra = {"options": "-c idle_in_transaction_session_timeout=60000"} if url.startswith("postgres") else {}
        engine = databases.checked_engine(url, option, allowed=allowed, pool_pre_ping=True,
                                          connect_args={**databases.connect_args(url), **extra})
    for attempt in range(20):
        try:
            _meta.create_all(engine)  # CREATE TABLE where missing
            break
        except DBAPIError as exc:
            # two first starts create the same table at once (PostgreSQL: duplicate pg_type row; SQLite: "already
            # exists"); the loser finds the tables on its next look. Anything else is a real error.
            if attempt < 19 and _is_creation_race(exc):
                time.sleep(0.1 * (attempt + 1))
                continue
            if not isinstance(exc, IntegrityError):  # unreachable server, refused login, not a database...
                reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
                raise InputError(f"--storage {redact(url)}: cannot use the claims database: {reason}") from None
            raise
    return engine


_local_locks: dict[str, threading.Lock] = {}
_local_locks_guard = threading.Lock()
_held = threading.local()  # the keys this thread holds: taking one again inside is a no-op, never a self-deadlock


@contextlib.contextmanager
def exclusive(engine: sa.Engine, key: str) -> Iterator[None]:
    """One holder at a time of ``key`` among every process (on any machine) sharing this claims database: for the
    MLflow writes that several workers would otherwise make at once on one shared entity (a sweep's parent run:
    MLflow's set_tag and log_batch read, then insert, so two concurrent writers collide on a unique key or each
    log their own metric point).

    PostgreSQL: a session-level advisory lock on a connection kept outside any transaction (the server's idle-in-
    transaction timeout does not apply). SQLite: a POSIX byte-range lock on ``<database>.lock`` next to the claims
    file (not on the database file itself: closing any descriptor of a file drops all of a process's POSIX locks on
    it, which would break SQLite's own locking). Both are released by the operating system or the server when the
    holder dies, so a SIGKILL inside never leaves the key held."""
    digest, name = hashlib.sha256(key.encode()).digest(), f"{engine.url}|{key}"
    held = _held.__dict__.setdefault("keys", set())
    if name in held:
        yield
        return
    with _local_locks_guard:  # POSIX and advisory locks are per process/session: threads of one process queue here
        local = _local_locks.setdefault(name, threading.Lock())
    with local:
        held.add(name)
        try:
            with _os_lock(engine, digest):
                yield
        finally:
            held.discard(name)


@contextlib.contextmanager
def _os_lock(engine: sa.Engine, digest: bytes) -> Iterator[None]:
    """The cross-process part of :func:`exclusive`."""
    if engine.dialect.name == "postgresql":
        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            lock_id = int.from_bytes(digest[:8], "big", signed=True)
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": lock_id})
            try:
                yield
            finally:
                try:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": lock_id})
                except DBAPIError:  # the session is gone, and its lock with it; never pool this connection
                    conn.invalidate()
        finally:
            conn.close()
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        import fcntl

        fd = os.open(f"{engine.url.database}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            offset = int.from_bytes(digest[:4], "big") & 0x3FFFFFFF
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)
        finally:
            os.close(fd)
    else:  # one process's private database: the thread lock above is all there is to share
        yield


def _is_creation_race(exc: Exception) -> bool:
    text = str(exc).lower()
    return "already exists" in text or "duplicate key" in text or "pg_type_typname_nsp_index" in text


def _now() -> float:
    return time.time()


# -- identity of a worker process ------------------------------------------------------------------------------------

def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat``, field 22): unlike a wall-clock
    start time (psutil's ``create_time`` is boot time + ticks, and the boot time is computed from the wall clock),
    it does not move when the machine's clock is stepped (NTP, a VM resumed). None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return -1  # no such process
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # fields after "(comm)": state is 3, starttime 22


def worker_identity() -> str:
    """host/pid/start/random: unique per process, and enough to tell on this host whether it is alive. ``start`` is
    ``t<ticks>`` (:func:`_start_ticks`) where /proc exists, else the process's create time."""
    me = psutil.Process()
    ticks = _start_ticks(me.pid)
    start = f"t{ticks}" if ticks is not None and ticks >= 0 else f"{me.create_time():.3f}"
    return f"{socket.gethostname()}/{me.pid}/{start}/{uuid.uuid4().hex[:8]}"


# how far a create time read by another process may differ for the same process: psutil derives it from the boot
# time, which moves with the wall clock (identities written before ``t<ticks>``, and machines without /proc)
CREATE_TIME_SLACK_S = 5.0


def holder_is_dead(holder: str | None) -> bool:
    """True only when the holder provably no longer exists: it ran on this host and its process is gone (or the pid
    now belongs to a process started at another time). Holders on other hosts are judged by their lease alone.
    A step of the machine's clock never makes a live holder look dead (start times are kernel ticks)."""
    if not holder:
        return False
    try:
        host, pid, started, _ = holder.split("/")
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    if started.startswith("t"):
        try:
            ticks = int(started[1:])
        except ValueError:
            return False
        now = _start_ticks(pid)
        return now is not None and now != ticks  # -1: gone; another value: the pid was reused
    try:
        started_at = float(started)
        return abs(psutil.Process(pid).create_time() - started_at) > CREATE_TIME_SLACK_S
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, ValueError):
        return False


# -- queue -----------------------------------------------------------------------------------------------------------

def _insert_ignoring_duplicates(conn, table: sa.Table, rows: list[dict]) -> None:
    if not rows:
        return
    from sqlalchemy.dialects import postgresql, sqlite

    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(conn.dialect.name)
    if insert is not None:  # INSERT ... ON CONFLICT DO NOTHING
        conn.execute(insert(table).on_conflict_do_nothing(), rows)
    else:
        for row in rows:
            try:
                with conn.begin_nested():
                    conn.execute(table.insert(), row)
            except IntegrityError:
                pass


def register_sweep(engine: sa.Engine, name: str, fingerprint: str, experiment: str,
                   unit_keys: list[tuple[int, str, str]], previous_fingerprint: str | None = None,
                   kind: str = "sweep") -> dict:
    """Queue a sweep's units (idempotent: any number of processes may do it at once, and a half-done registration
    is completed). Returns the sweep's row; ValueError if the name is taken by another definition.

    ``previous_fingerprint`` is the same definition's identity under an older hashing convention: a sweep
    registered with it is the same sweep, and its row is brought up to date."""
    with engine.begin() as conn:
        _insert_ignoring_duplicates(conn, sweeps, [dict(name=name, fingerprint=fingerprint, experiment=experiment,
                                                              created=_now())])
        if previous_fingerprint is not None:
            conn.execute(sweeps.update().where(sweeps.c.name == name, sweeps.c.fingerprint == previous_fingerprint)
                         .values(fingerprint=fingerprint))
    row = sweep_row(engine, name)
    if row["fingerprint"] != fingerprint:
        shown = name.removeprefix(f"{kind}:")
        raise InputError(f"{kind} {shown!r} already exists in {redact(str(engine.url))} with a different "
                         f"definition; give the changed {kind} a new name")
    register_units(engine, name, unit_keys)
    return row


def register_units(engine: sa.Engine, queue: str, unit_keys: list[tuple[int, str, str]]) -> None:
    """Queue units (cell, cell key, phase) under ``queue`` (a sweep's name, or a queue of its own such as a dataset's
    generation); idempotent, safe when many processes do it at once."""
    with engine.begin() as conn:
        _insert_ignoring_duplicates(conn, units, [
            dict(sweep=queue, cell=cell, phase=phase, cell_key=key, state=PENDING, epoch=0, lease_until=0.0,
                 failures=0, infra_failures=0, updated=_now()) for cell, key, phase in unit_keys])


def sweep_row(engine: sa.Engine, name: str) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(sweeps).where(sweeps.c.name == name)).mappings().first()
    return dict(row) if row else None


RESERVED = ("study:", "dataset:")  # names of the other queues kept here: a study's row, a dataset's generation


def sweep_names(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        names = [r[0] for r in conn.execute(sa.select(sweeps.c.name).order_by(sweeps.c.name))]
    return [n for n in names if not n.startswith(RESERVED)]


def set_parent_run(engine: sa.Engine, name: str, run_id: str) -> str:
    """Record the sweep's parent run unless another process already did; returns the one recorded."""
    with engine.begin() as conn:
        conn.execute(sweeps.update().where(sweeps.c.name == name, sweeps.c.parent_run.is_(None))
                     .values(parent_run=run_id))
    return sweep_row(engine, name)["parent_run"]


def unit_rows(engine: sa.Engine, name: str) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(units).where(units.c.sweep == name)
                            .order_by(units.c.cell, units.c.phase)).mappings().all()
    return [dict(r) for r in rows]


# -- one unit's life -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitKey:
    sweep: str
    cell: int
    phase: str

    def where(self):
        return sa.and_(units.c.sweep == self.sweep, units.c.cell == self.cell, units.c.phase == self.phase)


def claimable(row: dict, now: float) -> bool:
    """Whether a claim of this row may be tried: waiting, or held by a worker that is gone or silent too long."""
    if row["state"] == PENDING:
        return True
    return row["state"] == CLAIMED and (row["lease_until"] < now or holder_is_dead(row["holder"]))


def try_claim(engine: sa.Engine, row: dict, me: str, grace_s: float = GRACE_S) -> Claim | None:
    """Take the unit if it is still in the state we read (``row``); None if another process was first."""
    key = UnitKey(row["sweep"], row["cell"], row["phase"])
    now = _now()
    same = [key.where(), units.c.epoch == row["epoch"], units.c.state == row["state"]]
    if row["state"] == CLAIMED:
        # a renewal since our read moves lease_until past now (or changes nothing for a dead holder)
        same += [units.c.holder == row["holder"]]
        if not holder_is_dead(row["holder"]):
            same += [units.c.lease_until < now]
    with engine.begin() as conn:
        done = conn.execute(units.update().where(*same).values(
            state=CLAIMED, epoch=row["epoch"] + 1, holder=me, lease_until=now + grace_s, updated=now)).rowcount
    return Claim(engine, key, row["epoch"] + 1, me, grace_s, row["cell_key"]) if done == 1 else None


class Claim:
    """A held unit: renews its lease in a background thread; ``lost`` once another worker has taken it over."""

    def __init__(self, engine: sa.Engine, key: UnitKey, epoch: int, holder: str, grace_s: float, cell_key: str):
        self.engine, self.key, self.epoch, self.holder, self.grace_s = engine, key, epoch, holder, grace_s
        self.cell_key = cell_key
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _held(self):
        return sa.and_(self.key.where(), units.c.epoch == self.epoch, units.c.holder == self.holder,
                       units.c.state == CLAIMED)

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost`` set) when the unit is no longer ours."""
        now = _now()
        with self.engine.begin() as conn:
            ok = conn.execute(units.update().where(self._held()).values(lease_until=now + self.grace_s,
                                                                         updated=now)).rowcount == 1
        if not ok:
            self.lost.set()
        return ok

    def _beat(self) -> None:
        # several beats per grace period: one delayed by a loaded CPU or a busy database lock must not lose the unit
        interval = min(HEARTBEAT_S, max(self.grace_s / 6, 0.2))
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except Exception:  # noqa: BLE001  a database hiccup: try again on the next beat; the lease says the rest
                continue

    def __enter__(self) -> Claim:
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.cell_key}-{self.key.phase}",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False

    def _update_held(self, **values) -> bool:
        """A conditional update of our unit, retried on connection errors; True if it applied. After an error the
        statement may or may not have committed: ``values`` are written so that a re-read tells (see commit)."""
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    return conn.execute(units.update().where(self._held()).values(updated=_now(), **values)
                                        ).rowcount == 1
            except OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def _row(self) -> dict:
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(units).where(self.key.where())).mappings().one())

    def commit(self, run_id: str) -> bool:
        """Record ``run_id`` as the unit's result; False when the unit was taken over (the result must not count)."""
        try:
            ok = self._update_held(state=DONE, run_id=run_id, holder=None, error=None)
        except OperationalError:
            ok = False
        if not ok:  # maybe our commit landed and only its answer was lost: the row says
            row = self._row()
            ok = row["state"] == DONE and row["run_id"] == run_id and row["epoch"] == self.epoch
        if not ok:
            self.lost.set()
        return ok

    def release(self, error: str, kind: str, max_retries: int) -> str | None:
        """Give the unit back: ``pending`` for another try, ``failed`` once its retries are used up. ``kind`` is
        ``unit`` (its own failure: counts against ``max_retries``), ``infra`` (not its fault: counts against
        MAX_INFRA_FAILURES) or ``interrupted`` (the worker was stopped: counts against nothing). Returns the new
        state, None if the unit was no longer ours."""
        row = self._row()
        failures = row["failures"] + (kind == "unit")
        infra_failures = row["infra_failures"] + (kind == "infra")
        state = FAILED if failures > max_retries or infra_failures > MAX_INFRA_FAILURES else PENDING
        ok = self._update_held(state=state, holder=None, lease_until=0.0, failures=failures,
                               infra_failures=infra_failures, error=error[:2000])
        return state if ok else None


def reopen(engine: sa.Engine, row: dict) -> bool:
    """Put a done unit back to pending because its result is gone (a dataset folder deleted since); conditional on
    the row we read, so of many processes that find it gone, one reopens it and the others see it pending."""
    key = UnitKey(row["sweep"], row["cell"], row["phase"])
    with engine.begin() as conn:
        return conn.execute(units.update().where(
            key.where(), units.c.epoch == row["epoch"], units.c.state == DONE, units.c.run_id == row["run_id"]
        ).values(state=PENDING, holder=None, lease_until=0.0, run_id=None, updated=_now())).rowcount == 1


def reopen_failed(engine: sa.Engine, row: dict) -> bool:
    """Put a failed unit back to pending with its failures forgotten (a dataset generation asked for again)."""
    key = UnitKey(row["sweep"], row["cell"], row["phase"])
    with engine.begin() as conn:
        return conn.execute(units.update().where(key.where(), units.c.epoch == row["epoch"], units.c.state == FAILED)
                            .values(state=PENDING, failures=0, infra_failures=0, updated=_now())).rowcount == 1


def adopt(engine: sa.Engine, key: UnitKey, run_id: str) -> bool:
    """Record a run made before the sweep had claims (an earlier version's sweep) as the unit's result, if the unit
    was never claimed."""
    with engine.begin() as conn:
        return conn.execute(units.update().where(key.where(), units.c.state == PENDING, units.c.epoch == 0).values(
            state=DONE, epoch=1, run_id=run_id, updated=_now())).rowcount == 1


def release_dead(engine: sa.Engine, row: dict) -> bool:
    """Put a unit held by a dead or silent worker back to pending (doctor --fix); conditional on the row we read."""
    key = UnitKey(row["sweep"], row["cell"], row["phase"])
    with engine.begin() as conn:
        return conn.execute(units.update().where(
            key.where(), units.c.epoch == row["epoch"], units.c.holder == row["holder"], units.c.state == CLAIMED,
            units.c.lease_until == row["lease_until"]).values(state=PENDING, holder=None, lease_until=0.0,
                                                             updated=_now())).rowcount == 1
