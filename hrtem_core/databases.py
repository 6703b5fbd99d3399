"""Database URLs given on the command line (tracking stores, sweep claims, Optuna storages), checked before use.

Every command that keeps state in a database opens it through :func:`checked_engine` (or :func:`check_database`)
before any work starts, so that each way a URL can be unusable is one :class:`~hrtem_core.errors.InputError` naming
the option, the URL (password hidden) and what to do, instead of a driver's traceback minutes later:

* a URL that does not parse, or names a backend we do not support;
* a driver that is not installed (``postgresql+pg8000://`` without pg8000) — the error names the pip package;
* an SQLite file in a folder that does not exist, a folder where the file should be, or a file that is not an
  SQLite database;
* a server that does not answer: :data:`CONNECT_TRIES` attempts, each bounded by :data:`CONNECT_TIMEOUT_S`, with a
  short pause between them (a database that is still starting gets a few seconds), then the error says how long was
  spent waiting.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import InputError

SQLITE_HEADER = b"SQLite format 3\x00"
CONNECT_TRIES = 3
CONNECT_TIMEOUT_S = 5
RETRY_PAUSE_S = (1.0, 2.0)  # after the first and the second failed attempt
SUPPORTED = ("sqlite", "postgresql", "mysql")
# the import name a SQLAlchemy dialect needs -> what to install
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000",
                   "asyncpg": "asyncpg", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "mysql": "mysql-connector-python"}


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (as it may appear in an error or a log)."""
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        return url


def parse(url: str, option: str, supported: tuple[str, ...] = SUPPORTED, allowed: str | None = None):
    """The SQLAlchemy URL of ``url``; InputError when it does not parse or its backend is not ``supported``."""
    import sqlalchemy as sa

    allowed = allowed or "sqlite:///PATH.db, postgresql://USER@HOST/DB or mysql://USER@HOST/DB"
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise InputError(f"{option} {url!r}: not a database URL; allowed: {allowed}") from None
    if parsed.get_backend_name() not in supported:
        raise InputError(f"{option} {redact(url)!r}: database kind {parsed.get_backend_name()!r} is not supported; "
                         f"allowed: {allowed}")
    return parsed


def check_sqlite_file(path: Path, option: str, url: str) -> None:
    """An SQLite database at ``path`` can be opened or created: its folder exists, and it is absent, empty or an
    SQLite file."""
    if not path.parent.is_dir():
        raise InputError(f"{option} {url}: folder {path.parent} does not exist: create it, or give a path in an "
                         "existing folder")
    if path.is_dir():
        raise InputError(f"{option} {url}: {path} is a folder: give the path of a database file (e.g. {path}/x.db)")
    if path.is_file() and path.stat().st_size:
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise InputError(f"{option} {url}: cannot read {path}: {exc.strerror}") from None
        if head != SQLITE_HEADER:
            raise InputError(f"{option} {url}: {path} is not an SQLite database: give the database file "
                             "this option was given before, or a new file name")


def _driver_error(exc: ImportError, option: str, url: str) -> InputError:
    name = (getattr(exc, "name", None) or str(exc)).split(".")[0]
    package = DRIVER_PACKAGES.get(name, name)
    return InputError(f"{option} {redact(url)}: the database driver {name!r} is not installed: "
                      f"pip install '{package}', or name an installed driver in the URL")


def first_line(exc: BaseException) -> str:
    """The driver's own words, without SQLAlchemy's background link or the statement."""
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def checked_engine(url: str, option: str, supported: tuple[str, ...] = SUPPORTED, allowed: str | None = None,
                   connect: bool = True, **engine_kwargs):
    """A SQLAlchemy engine on ``url`` after the checks of this module; with ``connect``, one connection has been
    made (servers: within :data:`CONNECT_TRIES` bounded attempts)."""
    import sqlalchemy as sa

    parsed = parse(url, option, supported, allowed)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise InputError(f"{option} {url!r}: an SQLite database here must be a file (sqlite:///PATH.db)")
        path = Path(parsed.database).expanduser().absolute()
        check_sqlite_file(path, option, url)
        connect = connect and path.exists()  # a new file is created by its first real use, not by a check
    try:
        engine = sa.create_engine(url, **engine_kwargs)
    except ImportError as exc:  # the dialect imports its DBAPI module here
        raise _driver_error(exc, option, url) from None
    if connect:
        try:
            connect_with_retries(engine, option, url)
        except BaseException:
            engine.dispose()
            raise
    return engine


# a server that wants a password this process does not have ("fe_sendauth: no password supplied") or refuses the one
# it has ("password authentication failed"): libpq's words, and MySQL's "Access denied"
PASSWORD_WORDS = ("password", "access denied")
PASSWORD_HINT = ("give this process the database password: PGPASSWORD (or a ~/.pgpass file) in the environment of "
                 "every process that connects, each Dask worker included (start `dask worker` with it set), or "
                 "USER:PASSWORD@ in the URL")


def is_password_error(exc: BaseException | None) -> bool:
    """The server refused the connection for want of the right password."""
    return exc is not None and any(w in first_line(exc).lower() for w in PASSWORD_WORDS)


def connect_with_retries(engine, option: str, url: str) -> None:
    """One connection to ``engine`` within :data:`CONNECT_TRIES` attempts, else InputError saying how long it took."""
    import sqlalchemy as sa

    start, last = time.monotonic(), None
    for attempt in range(CONNECT_TRIES):
        try:
            with engine.connect() as conn:
                if engine.dialect.name == "sqlite":  # opening an SQLite file reads nothing yet
                    conn.execute(sa.text("SELECT count(*) FROM sqlite_master"))
            return
        except sa.exc.DBAPIError as exc:
            last = exc
            if engine.dialect.name == "sqlite" or is_password_error(exc):
                break  # a file, not a server, or a password: trying again changes nothing
        if attempt < len(RETRY_PAUSE_S):
            time.sleep(RETRY_PAUSE_S[attempt])
    spent = time.monotonic() - start
    tries = "" if engine.dialect.name == "sqlite" else \
        f" after {attempt + 1} {'try' if attempt == 0 else 'tries'} in {spent:.0f} s"
    hint = "check the file" if engine.dialect.name == "sqlite" else PASSWORD_HINT if is_password_error(last) else \
        "start the database server, or check host, port, user and database name"
    raise InputError(f"{option} {redact(url)}: cannot connect{tries}: {first_line(last)}: {hint}") from None


def check_database(url: str, option: str, **kwargs) -> None:
    """:func:`checked_engine` for its errors only (the engine is disposed)."""
    kwargs.setdefault("connect_args", connect_args(url))
    checked_engine(url, option, **kwargs).dispose()


def connect_args(url: str) -> dict:
    """A bounded connection timeout for the server backends (none for SQLite, whose lock wait is separate)."""
    name = url.split(":", 1)[0].split("+", 1)[0].lower()
    return {"connect_timeout": CONNECT_TIMEOUT_S} if name in ("postgresql", "postgres", "mysql") else {}


__all__ = ["SQLITE_HEADER", "CONNECT_TRIES", "CONNECT_TIMEOUT_S", "redact", "parse", "check_sqlite_file",
           "checked_engine", "connect_with_retries", "check_database", "connect_args", "first_line"]
