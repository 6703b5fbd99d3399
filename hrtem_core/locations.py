"""Where a dataset lives: a local folder, or a prefix on object storage (``s3://bucket/prefix``; any fsspec URL).

Object storage is read and written through fsspec (s3fs for ``s3://``); credentials and endpoint come from the usual
AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for MinIO...) or the
instance's role, never from files in this repository. A URL is kept as a string throughout: ``pathlib`` would fold
its ``//``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Union

from .errors import InputError

Location = Union[str, Path]
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(location: Location) -> bool:
    """True for an object-storage URL (``s3://...``); False for a local path (``file://`` URLs included)."""
    return isinstance(location, str) and bool(_URL.match(location)) and not location.startswith("file://")


def as_location(text: Location) -> Location:
    """A command-line value as a location: URLs stay strings, anything else becomes a Path."""
    if isinstance(text, str) and text.startswith("file://"):
        return Path(text[len("file://"):])
    return text if is_url(text) else Path(text)


def join(location: Location, *names: str) -> Location:
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *names])
    return Path(location, *names)


def name_of(location: Location) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_url(location) else Path(location).name


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


@contextmanager
def _remote(url: str, doing: str):
    """Errors of the object store (no credentials, no such bucket, no endpoint: botocore's own exception types) as
    an InputError naming the URL; a missing object stays a FileNotFoundError."""
    try:
        yield
    except (InputError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001  botocore/aiobotocore errors share no base class with OSError
        raise InputError(f"{url}: cannot {doing} ({type(exc).__name__}: {exc}); check the AWS_* variables "
                         "(credentials, AWS_ENDPOINT_URL) and the bucket") from None


def open_read(location: Location) -> IO[bytes]:
    if is_url(location):
        with _remote(location, "read it"):
            fs, path = _fs(location)
            return fs.open(path, "rb")
    return open(location, "rb")


def stamp(location: Location) -> tuple[int, int]:
    """(size, mtime_ns) of a file (mtime_ns -1 on object storage, whose objects are replaced whole, never edited):
    what tells a reader that a file is still the one it indexed."""
    if is_url(location):
        with _remote(location, "look it up"):
            fs, path = _fs(location)
            return int(fs.info(path)["size"]), -1
    st = Path(location).stat()
    return st.st_size, st.st_mtime_ns


def exists(location: Location) -> bool:
    if is_url(location):
        with _remote(location, "look it up"):
            fs, path = _fs(location)
            return fs.exists(path)
    return Path(location).exists()


def listing(location: Location) -> list[str]:
    """Names directly under a folder or prefix (empty when there is none)."""
    if is_url(location):
        with _remote(location, "list it"):
            fs, path = _fs(location)
            try:
                return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
            except FileNotFoundError:
                return []
    return sorted(p.name for p in Path(location).iterdir()) if Path(location).is_dir() else []


def upload(local: Path, url: str) -> None:
    """Copy one local file to ``url`` (object stores make an object appear whole or not at all)."""
    with _remote(url, "write it"):
        fs, path = _fs(url)
        fs.put_file(str(local), path)


def register_webdataset_schemes() -> None:
    """Let webdataset open ``s3://`` (and other fsspec) shard URLs through fsspec (it has no S3 handler of its own)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module; the package exports a function of that name

    def fsspec_open(url, mode="rb", bufsize=8192, **kw):
        return open_read(url)

    for scheme in ("s3", "s3a", "gcs", "az", "abfs"):
        gopen.gopen_schemes.setdefault(scheme, fsspec_open)
