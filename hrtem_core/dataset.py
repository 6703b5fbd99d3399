"""The dataset format that ``datagen`` writes and ``mlplatform`` reads (docs/architecture.md, "A dataset on disk").

A dataset is a folder: ``manifest.json`` plus WebDataset tars ``shard-NNNNNN.tar`` (and ``waves-NNNNNN.tar`` where
exit waves are kept). A sample is ``<key>.image.npy`` (float32 [H, W]), ``<key>.mask.npy`` (uint8 [H, W], 0/1) and
``<key>.json`` (metadata).

A sample's hash covers its key, its arrays (dtype, shape, bytes) and its metadata as canonical JSON without the
volatile fields (timestamps, timings, host). The dataset content hash is the hash of the ``key:sample-hash`` lines in
key order, so it depends only on content: not on how the work was split, nor on interruptions and resumes.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import platform
import re
import tarfile
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .config import canonical_json
from .errors import DatasetError
from .files import atomic_writer, write_atomic
from .locations import Location, exists, is_url, join, listing, open_read

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
WAVE_SHARD_PATTERN = "waves-{:06d}.tar"
VOLATILE = (("provenance", "created_utc"), ("provenance", "timing_s"), ("provenance", "host"),
            ("source", "import_time_utc"))
ARRAY_FIELDS = ("image.npy", "mask.npy")
# the packages whose versions a dataset records (in the manifest and in every sample's provenance)
RECORDED_DISTRIBUTIONS = ("hrtem-curation", "numpy", "scipy", "abTEM", "czone", "ase", "webdataset", "pymatgen")


def software_versions(extra: Iterable[str] = ()) -> dict:
    """Python and the installed versions of RECORDED_DISTRIBUTIONS and ``extra`` (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for dist in (*RECORDED_DISTRIBUTIONS, *extra):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ samples, hashes


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def stable_metadata(meta: dict) -> dict:
    meta = copy.deepcopy(meta)
    for section, key in VOLATILE:
        if isinstance(meta.get(section), dict):
            meta[section].pop(key, None)
    return meta


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_hash(key: str, arrays: dict[str, np.ndarray], meta: dict) -> str:
    h = hashlib.sha256()
    h.update(key.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(canonical_json(stable_metadata(meta)).encode())
    return h.hexdigest()


def content_hash(sample_hashes: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for key, digest in sorted(tuple(s) for s in sample_hashes):
        h.update(f"{key}:{digest}\n".encode())
    return h.hexdigest()


def file_sha256(path: Location) -> str:
    h = hashlib.sha256()
    with open_read(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_sample(key: str, arrays: dict[str, np.ndarray], meta: dict) -> dict:
    out = {"__key__": key, "json": json.dumps(meta, sort_keys=True, allow_nan=False).encode()}
    for name, a in arrays.items():
        out[name] = npy_bytes(a)
    return out


def decode_sample(key: str, fields: dict[str, bytes]) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, metadata) of one sample's members, checked against the sample contract (DatasetError if not)."""
    missing = [f for f in (*ARRAY_FIELDS, "json") if f not in fields]
    if missing:
        raise DatasetError(f"sample {key}: missing {', '.join(missing)}")
    arrays = {name: load_npy(fields[name]) for name in fields if name.endswith(".npy")}
    meta = json.loads(fields["json"])
    image, mask = arrays["image.npy"], arrays["mask.npy"]
    if image.dtype != np.float32 or image.ndim != 2:
        raise DatasetError(f"sample {key}: image must be float32 [H, W], got {image.dtype} {image.shape}")
    if mask.dtype != np.uint8 or mask.shape != image.shape:
        raise DatasetError(f"sample {key}: mask must be uint8 of the image's shape {image.shape}, got "
                           f"{mask.dtype} {mask.shape}")
    if mask.size and mask.max() > 1:
        raise DatasetError(f"sample {key}: mask values must be 0 or 1, found {int(mask.max())}")
    return arrays, meta


# -------------------------------------------------------------------------------------------------------- shards


def write_shard(path: Path, samples: list[dict]) -> None:
    """Write samples ({'__key__', field -> bytes or str}) through webdataset's TarWriter, atomically.

    The tar is built under ``<name>.<pid>.partial`` and renamed when complete, so no reader ever sees a partial
    shard. A fixed mtime makes the tar bytes a function of the content.
    """
    import webdataset as wds

    with atomic_writer(path) as fh:
        with wds.TarWriter(fh, encoder=False, mtime=0.0) as writer:
            for s in samples:
                writer.write(s)


def _open_tar(path: Location) -> tarfile.TarFile:
    if is_url(path):  # streamed: one pass over the object, no seeks (each would be a request)
        return tarfile.open(fileobj=open_read(path), mode="r|")
    return tarfile.open(path, "r")


def iter_tar_samples(path: Location, fields: Iterable[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) in file order; a key's fields are consecutive in a WebDataset tar.

    With ``fields``, only those members are read (locally the others are seeked over: indexing reads only the
    metadata). A key with none of the wanted fields is not yielded.
    """
    wanted = None if fields is None else set(fields)
    current, found = None, {}
    with _open_tar(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            dirname, base = os.path.split(member.name)
            key, _, field = base.partition(".")
            key = f"{dirname}/{key}" if dirname else key
            if key != current:
                if current is not None and found:
                    yield current, found
                current, found = key, {}
            if wanted is None or field in wanted:
                found[field] = tar.extractfile(member).read()
    if current is not None and found:
        yield current, found


# ------------------------------------------------------------------------------------------------------ manifest


def read_manifest(root: Location) -> dict:
    path = join(root, MANIFEST)
    if not exists(path):
        raise DatasetError(f"{root}: no {MANIFEST}; not a finished dataset (an interrupted 'generate' resumes "
                           "when run again with the same arguments)")
    try:
        with open_read(path) as fh:
            return json.loads(fh.read())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None


def build_manifest(name: str, shards: list[dict], generation: dict, software: dict, created_utc: str,
                   **fields) -> dict:
    """The manifest of a finished dataset from its shard records ({name, sha256, n_samples, samples: [[key,
    hash]]}); ``fields`` are the writer's own (recipe, seed, source, timing...). Counts and the content hash are
    computed here, so every writer records them the same way."""
    hashes = [tuple(h) for rec in shards for h in rec["samples"]]
    manifest = {
        "name": name,
        "format_version": FORMAT_VERSION,
        "recipe": None, "recipe_hash": None, "seed": None,
        "n_samples": len(hashes),
        "content_hash": content_hash(hashes),
        "shards": [{k: rec[k] for k in ("name", "sha256", "n_samples", "samples")} for rec in shards],
        "wave_shards": [],
        "generation": generation,
        "software": software,
        "created_utc": created_utc,
    }
    manifest.update(fields)
    return manifest


def write_manifest(root: Path, manifest: dict) -> None:
    """Written last: a dataset is finished exactly when its manifest exists."""
    write_atomic(Path(root) / MANIFEST, json.dumps(manifest, indent=1).encode())


def is_shard_name(name: str) -> bool:
    return bool(re.fullmatch(r"(shard|waves)-\d{6}\.tar", name))


def check_output(out: Location, ident: dict, progress_file: Path | None = None) -> tuple[str, dict | None]:
    """What ``out`` holds for a writer identified by ``ident``: ('new', None), ('resume', None) or ('done',
    manifest). Refuses (DatasetError) a file, a folder holding something else, or a dataset of another identity.

    ``ident`` is recorded as the manifest's ``generation`` (and, while unfinished, in ``progress_file``). On object
    storage, a prefix with shards but no manifest is an upload that was interrupted: it is written again.
    """
    if is_url(out):
        names = listing(out)
        if MANIFEST not in names:
            if any(not is_shard_name(n) for n in names):
                raise DatasetError(f"--out {out}: holds other objects ({', '.join(names[:5])}) and no dataset; "
                                   "choose a new or empty prefix")
            return "new", None
        manifest = read_manifest(out)
        return _same_identity(out, manifest.get("generation") or {}, ident, manifest)
    out = Path(out)
    if not out.exists():
        return "new", None
    if not out.is_dir():
        raise DatasetError(f"--out {out}: exists and is not a folder")
    manifest = None
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        found = manifest.get("generation") or {}
    elif progress_file is not None and progress_file.is_file():
        found = json.loads(progress_file.read_text())
    elif any(out.iterdir()):
        raise DatasetError(f"--out {out}: folder is not empty and holds no dataset; choose a new or empty folder")
    else:
        return "new", None
    return _same_identity(out, found, ident, manifest)


def _same_identity(out: Location, found: dict, ident: dict, manifest: dict | None) -> tuple[str, dict | None]:
    diffs = [f"{k}: existing {found.get(k)!r}, requested {ident[k]!r}" for k in ident if found.get(k) != ident[k]]
    if diffs:
        raise DatasetError(f"--out {out} holds a different dataset ({'; '.join(diffs)}); refusing to mix them. "
                           "Use a new folder.")
    return ("done", manifest) if manifest is not None else ("resume", None)


# ------------------------------------------------------------------------------------------------------- reading


def iter_dataset(root: Location) -> Iterator[tuple[str, dict[str, np.ndarray], dict]]:
    """Every sample of a finished dataset (a folder or an object-storage prefix), in key order, decoded."""
    manifest = read_manifest(root)
    for shard in manifest["shards"]:
        for key, fields in iter_tar_samples(join(root, shard["name"])):
            arrays, meta = decode_sample(key, fields)
            yield key, arrays, meta


def verify_dataset(root: Location) -> dict:
    """Recompute every hash. Raises DatasetError naming the first bad shard and sample; returns a summary."""
    manifest = read_manifest(root)
    all_hashes: list[tuple[str, str]] = []
    for shard in manifest.get("wave_shards", []):
        path = join(root, shard["name"])
        if not exists(path):
            raise DatasetError(f"wave shard {shard['name']}: missing")
        if file_sha256(path) != shard["sha256"]:
            raise DatasetError(f"wave shard {shard['name']}: sha256 does not match the manifest")
    for shard in manifest["shards"]:
        path = join(root, shard["name"])
        if not exists(path):
            raise DatasetError(f"shard {shard['name']}: missing")
        expected = dict(shard["samples"])
        seen = []
        try:
            for key, fields in iter_tar_samples(path):
                arrays, meta = decode_sample(key, fields)
                digest = sample_hash(key, {k: v for k, v in arrays.items() if k in ARRAY_FIELDS}, meta)
                if key not in expected:
                    raise DatasetError(f"shard {shard['name']}, sample {key}: not listed in the manifest")
                if digest != expected[key]:
                    raise DatasetError(f"shard {shard['name']}, sample {key}: content hash {digest[:12]}… does not "
                                       f"match the manifest's {expected[key][:12]}…")
                seen.append((key, digest))
        except DatasetError:
            raise
        except (tarfile.TarError, ValueError, OSError) as exc:
            raise DatasetError(f"shard {shard['name']}: unreadable ({exc})") from None
        missing = sorted(set(expected) - {k for k, _ in seen})
        if missing:
            raise DatasetError(f"shard {shard['name']}, sample {missing[0]}: listed in the manifest but missing")
        if len(seen) != shard["n_samples"]:
            raise DatasetError(f"shard {shard['name']}: {len(seen)} samples, manifest says {shard['n_samples']}")
        if file_sha256(path) != shard["sha256"]:
            raise DatasetError(f"shard {shard['name']}: file sha256 does not match the manifest")
        all_hashes.extend(seen)
    digest = content_hash(all_hashes)
    if digest != manifest["content_hash"]:
        raise DatasetError(f"dataset content hash {digest} does not match the manifest's {manifest['content_hash']}")
    if len(all_hashes) != manifest["n_samples"]:
        raise DatasetError(f"{len(all_hashes)} samples on disk, manifest says {manifest['n_samples']}")
    return {"n_samples": len(all_hashes), "n_shards": len(manifest["shards"]), "content_hash": digest}
