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
import tokenize
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .config import canonical_json
from .errors import DatasetError
from .files import atomic_writer, write_atomic
from .locations import Location, exists, is_url, join, listing, open_read
from .shard_hashes import ShardHashCache

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


NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_MAX = 16 + 10_000  # numpy refuses longer headers (read_array_header's max_header_size)


def load_npy(data, what: str = "array", view: bool = False) -> np.ndarray:
    """The array of a ``.npy`` file's bytes (never a pickle). DatasetError naming ``what`` (e.g. the shard, sample
    and member) when they are not one: no magic, a header numpy cannot parse, truncated data.

    ``data``: ``bytes`` or any buffer (``bytearray``, a uint8 array). ``view``: the array shares ``data``'s memory
    instead of being copied out of it (writable when ``data`` is); the loaders read each member into a buffer of its
    own and decode it this way."""
    buf = memoryview(data).cast("B")
    head = bytes(buf[:_NPY_HEADER_MAX])  # the header only: no copy of the data
    if not head.startswith(NPY_MAGIC):
        raise DatasetError(f"{what}: not a .npy array (its {len(buf)} bytes do not start with the .npy magic)")
    try:
        shape, fortran_order, dtype, start = _npy_header(head)
        # the header's size against the bytes there are, before numpy allocates what the header claims
        count = int(np.prod(shape, dtype=np.int64))
        needed = count * dtype.itemsize
        if needed > len(buf) - start:
            raise ValueError(f"its header claims {shape} {dtype} ({needed} bytes) but {len(buf) - start} bytes "
                             "follow it")
        flat = np.frombuffer(buf, dtype=dtype, count=count, offset=start)
        if not view:
            flat = flat.copy()
        return flat.reshape(shape, order="F" if fortran_order else "C")
    except _BAD_NPY_HEADER as exc:
        raise DatasetError(f"{what}: not a valid .npy array ({' '.join(str(exc).split()) or type(exc).__name__})") \
            from None


_NPY_HEADERS: dict[bytes, tuple] = {}
# what numpy's header reader (ast.literal_eval of the header's text) raises on damaged bytes: one flipped byte in a
# header gives ValueError, SyntaxError or tokenize's TokenError ("EOF in multi-line statement"), deep nesting
# RecursionError
_BAD_NPY_HEADER = (ValueError, EOFError, SyntaxError, tokenize.TokenError, TypeError, OverflowError, RecursionError,
                   MemoryError)


def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, offset of the data) of a ``.npy`` file from its first bytes, parsed by numpy's
    own reader (version 1.0 or 2.0, no object dtypes); remembered by the header's bytes (a dataset's samples share a
    handful of headers, and numpy parses them with ``ast.literal_eval``)."""
    version = (head[6], head[7]) if len(head) >= 8 else None
    length = {(1, 0): 10 + int.from_bytes(head[8:10], "little"),
              (2, 0): 12 + int.from_bytes(head[8:12], "little")}.get(version) if version else None
    key = head[:length] if length else None
    if key is not None and key in _NPY_HEADERS:
        return _NPY_HEADERS[key]
    stream = io.BytesIO(head)
    version = np.lib.format.read_magic(stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f".npy format version {version} is not one numpy writes for data (1.0, 2.0)")
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not data")
    parsed = (tuple(shape), bool(fortran_order), dtype, stream.tell())
    if key is not None and stream.tell() == length and len(_NPY_HEADERS) < 256:
        _NPY_HEADERS[key] = parsed
    return parsed


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


class _HashingReader:
    """A binary file read through a sha256: what is read updates it, ``rest()`` reads what is left and returns the
    digest of the whole file. tarfile's stream mode ("r|") reads sequentially and only calls ``read``, so a shard is
    hashed while it is read, in one pass."""

    def __init__(self, fh):
        self.fh, self.hash = fh, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.hash.update(data)
        return data

    def rest(self) -> str:
        for chunk in iter(lambda: self.fh.read(1 << 20), b""):
            self.hash.update(chunk)
        return self.hash.hexdigest()


def file_sha256(path: Location) -> str:
    with open_read(path) as fh:
        return _HashingReader(fh).rest()


def encode_sample(key: str, arrays: dict[str, np.ndarray], meta: dict) -> dict:
    out = {"__key__": key, "json": json.dumps(meta, sort_keys=True, allow_nan=False).encode()}
    for name, a in arrays.items():
        out[name] = npy_bytes(a)
    return out


def check_image_and_mask(image: np.ndarray, mask: np.ndarray, where: str) -> None:
    """What training needs of a decoded sample: image and mask 2-D and of one shape, the mask 0/1 (uint8 or bool).
    DatasetError naming ``where`` (the sample) and what differs."""
    if image.ndim != 2:
        raise DatasetError(f"{where}: image must be 2-D [H, W], got shape {image.shape}")
    if mask.dtype not in (np.uint8, np.bool_):
        raise DatasetError(f"{where}: mask must be uint8 (0/1) or bool, got {mask.dtype}")
    if mask.shape != image.shape:
        raise DatasetError(f"{where}: mask shape {mask.shape} differs from the image's {image.shape}")
    if mask.dtype == np.uint8 and mask.size and mask.max() > 1:
        raise DatasetError(f"{where}: mask values must be 0 or 1, found {int(mask.max())}")


def load_metadata(data: bytes, what: str) -> dict:
    """A sample's metadata from its ``.json`` member: DatasetError naming ``what`` (the shard and sample) unless the
    bytes are UTF-8 JSON of an object."""
    try:
        meta = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError (not UTF-8) is a ValueError too
        raise DatasetError(f"{what}: its metadata (.json) is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{what}: its metadata (.json) must be a JSON object, got a {type(meta).__name__}")
    return meta


def decode_sample(key: str, fields: dict[str, bytes], where: str = "") -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, metadata) of one sample's members, checked against the sample contract (DatasetError if not);
    ``where`` (e.g. ``shard shard-000001.tar, ``) prefixes the sample in messages."""
    what = f"{where}sample {key}"
    missing = [f for f in (*ARRAY_FIELDS, "json") if f not in fields]
    if missing:
        raise DatasetError(f"{what}: missing {', '.join(missing)}")
    arrays = {name: load_npy(fields[name], f"{what}, {name}") for name in fields if name.endswith(".npy")}
    meta = load_metadata(fields["json"], what)
    image, mask = arrays["image.npy"], arrays["mask.npy"]
    if image.dtype != np.float32 or image.ndim != 2:
        raise DatasetError(f"{what}: image must be float32 [H, W], got {image.dtype} {image.shape}")
    if mask.dtype != np.uint8 or mask.shape != image.shape:
        raise DatasetError(f"{what}: mask must be uint8 of the image's shape {image.shape}, got "
                           f"{mask.dtype} {mask.shape}")
    check_image_and_mask(image, mask, what)
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


def iter_tar_samples(path: Location, fields: Iterable[str] | None = None,
                     spans: dict | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) in file order; a key's fields are consecutive in a WebDataset tar.

    With ``fields``, only those members are read (locally the others are seeked over: indexing reads only the
    metadata). A key with none of the wanted fields is not yielded. ``spans``: a dict that receives
    ``{key: {field: (byte offset of the member's data in the file, size)}}`` for every member, read or not (what
    the loaders read the members by).
    """
    try:
        with _open_tar(path) as tar:
            yield from _tar_samples(tar, fields, spans)
    except (tarfile.TarError, EOFError) as exc:  # truncated, or not a tar at all
        raise DatasetError(f"shard {path}: unreadable tar ({exc}): the file is truncated or corrupt; "
                           "`python -m datagen verify` checks the whole dataset") from None


def _tar_samples(tar: tarfile.TarFile, fields: Iterable[str] | None,
                 spans: dict | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    wanted = None if fields is None else set(fields)
    current, found = None, {}
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
        if spans is not None:
            spans.setdefault(key, {})[field] = (member.offset_data, member.size)
        if wanted is None or field in wanted:
            found[field] = tar.extractfile(member).read()
    if current is not None and found:
        yield current, found


def shard_mismatch(root: Location, shard: dict, actual: str) -> DatasetError:
    return DatasetError(f"dataset {root}: shard {shard['name']}: file sha256 {actual[:16]}… does not match the "
                        f"manifest's {shard['sha256'][:16]}… (the file changed after the dataset was written)")


def iter_shard(root: Location, shard: dict, fields: Iterable[str] | None = None,
               cache: ShardHashCache | None = None, spans: dict | None = None
               ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one shard of a manifest (as :func:`iter_tar_samples`), checked against the manifest's sha256.

    The file is hashed while it is read, streamed in one pass (the members that ``fields`` leaves out are read
    through, not seeked over), and the digest is compared once the last sample has been yielded: DatasetError naming
    the dataset, the shard and both digests. What a consumer got is trustworthy only once the iterator is exhausted
    (:func:`read_shard` collects a shard first). With ``cache``, a local file whose digest is known for its current
    size and mtime_ns is not hashed again: it is checked against the manifest at once, and read with seeks. Files on
    object storage are always hashed while read. A shard that is missing or not a tar raises what tarfile or the
    file system raised. ``spans``: as :func:`iter_tar_samples`.
    """
    path = join(root, shard["name"])
    st = None
    if not is_url(path):
        st = os.stat(path)
        known = cache.lookup(path, st) if cache is not None else None
        if known is not None:
            if known != shard["sha256"]:
                raise shard_mismatch(root, shard, known)
            yield from iter_tar_samples(path, fields, spans)
            return
    with open_read(path) as fh:
        reader = _HashingReader(fh)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            yield from _tar_samples(tar, fields, spans)
        digest = reader.rest()  # tarfile stops at the end-of-archive blocks: the padding after them counts too
    if cache is not None and st is not None:
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):  # not changed while it was read
            cache.record(path, st, digest)
    if digest != shard["sha256"]:
        raise shard_mismatch(root, shard, digest)


def read_shard(root: Location, shard: dict, fields: Iterable[str] | None = None,
               cache: ShardHashCache | None = None, spans: dict | None = None) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of :func:`iter_shard`, returned only once the shard's sha256 has been checked."""
    return list(iter_shard(root, shard, fields, cache, spans))


# ------------------------------------------------------------------------------------------------------ manifest


def read_manifest(root: Location) -> dict:
    """The manifest of the dataset at ``root``, checked by :func:`validate_manifest` (DatasetError if it fails)."""
    path = join(root, MANIFEST)
    if not exists(path):
        raise DatasetError(f"{root}: no {MANIFEST}; not a finished dataset (an interrupted 'generate' resumes "
                           "when run again with the same arguments)")
    try:
        with open_read(path) as fh:
            manifest = json.loads(fh.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    return validate_manifest(manifest, path)


_HEX64 = re.compile(r"[0-9a-f]{64}")
_SHARD_ENTRY = "{name, sha256, n_samples, samples}"


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain_file_name(name) -> bool:
    """A file directly inside the dataset: no folder part, no '..', not absolute, nothing a path could escape by."""
    return (isinstance(name, str) and name not in ("", ".") and "/" not in name and "\\" not in name
            and ".." not in name and "\0" not in name and not os.path.isabs(name))


def validate_manifest(manifest, where: Location) -> dict:
    """``manifest`` if it has the shape every reader relies on, else DatasetError naming ``where`` (the manifest's
    path), the key and what is allowed: a mapping whose ``shards`` (and ``wave_shards``, where present) are lists
    of entries with a plain file ``name`` inside the dataset and a 64-hex ``sha256``, with ``name`` a string,
    ``content_hash`` 64 hex digits and ``n_samples`` a count; a shard's ``n_samples`` and ``samples`` ([[key, 64-hex
    sample hash], ...]) are checked where present."""
    if not isinstance(manifest, dict):
        raise DatasetError(f"{where}: a manifest must be a JSON object (a mapping with 'shards', 'name', "
                           f"'content_hash', 'n_samples'), got a {type(manifest).__name__}")
    if "shards" not in manifest:
        raise DatasetError(f"{where}: key 'shards' is missing; it must be a list of shard entries {_SHARD_ENTRY}")
    seen: set[str] = set()
    for list_key in ("shards", "wave_shards"):
        entries = manifest.get(list_key, [])
        if not isinstance(entries, list):
            raise DatasetError(f"{where}: '{list_key}' must be a list of shard entries {_SHARD_ENTRY}, got a "
                               f"{type(entries).__name__}")
        for i, entry in enumerate(entries):
            at = f"{list_key}[{i}]"
            if not isinstance(entry, dict):
                raise DatasetError(f"{where}: '{at}' must be a mapping {_SHARD_ENTRY}, got a {type(entry).__name__}")
            name = entry.get("name")
            if not _plain_file_name(name):
                raise DatasetError(f"{where}: '{at}.name' {name!r} is not allowed: a shard must be a plain file name "
                                   "inside the dataset (no '/', no '..', not absolute), e.g. 'shard-000000.tar'")
            if name in seen:
                raise DatasetError(f"{where}: '{at}.name' {name!r} is listed twice; each shard is listed once")
            seen.add(name)
            digest = entry.get("sha256")
            if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
                raise DatasetError(f"{where}: '{at}.sha256' {digest!r} is not allowed: it must be the file's sha256, "
                                   "64 lowercase hex digits")
            if "n_samples" in entry and not _is_count(entry["n_samples"]):
                raise DatasetError(f"{where}: '{at}.n_samples' {entry['n_samples']!r} must be a count (an integer "
                                   ">= 0)")
            samples = entry.get("samples", [])
            if not (isinstance(samples, list) and all(
                    isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and isinstance(s[1], str)
                    and _HEX64.fullmatch(s[1]) for s in samples)):
                raise DatasetError(f"{where}: '{at}.samples' must be a list of [key, sample hash (64 hex digits)] "
                                   "pairs")
    if not isinstance(manifest.get("name"), str):
        raise DatasetError(f"{where}: 'name' {manifest.get('name')!r} must be the dataset's name (a string)")
    chash = manifest.get("content_hash")
    if not (isinstance(chash, str) and _HEX64.fullmatch(chash)):
        raise DatasetError(f"{where}: 'content_hash' {chash!r} must be 64 lowercase hex digits")
    if not _is_count(manifest.get("n_samples")):
        raise DatasetError(f"{where}: 'n_samples' {manifest.get('n_samples')!r} must be a count (an integer >= 0)")
    shards = manifest["shards"]
    if shards and all("samples" in e for e in shards):  # the manifest's own sample list pins its content hash
        listed = [tuple(s) for e in shards for s in e["samples"]]
        if len(listed) != manifest["n_samples"]:
            raise DatasetError(f"{where}: 'n_samples' {manifest['n_samples']} does not match the {len(listed)} "
                               "samples its shards list: the manifest was edited or is corrupt")
        if content_hash(listed) != chash:
            raise DatasetError(f"{where}: 'content_hash' {chash[:16]}… does not match the hash of the samples its "
                               f"shards list ({content_hash(listed)[:16]}…): the manifest was edited or is corrupt")
    return manifest


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
            arrays, meta = decode_sample(key, fields, where=f"shard {shard['name']}, ")
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
    for i, shard in enumerate(manifest["shards"]):
        path = join(root, shard["name"])
        absent = [k for k in ("samples", "n_samples") if k not in shard]
        if absent:
            raise DatasetError(f"{join(root, MANIFEST)}: 'shards[{i}]' has no {' or '.join(absent)}; verify needs "
                               f"every shard's {_SHARD_ENTRY}")
        if not exists(path):
            raise DatasetError(f"shard {shard['name']}: missing")
        expected = dict(shard["samples"])
        seen = []
        try:
            # hashed while read: the file's sha256 is checked after its last sample (no second pass, no cache)
            for key, fields in iter_shard(root, shard):
                arrays, meta = decode_sample(key, fields, where=f"shard {shard['name']}, ")
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
        all_hashes.extend(seen)
    digest = content_hash(all_hashes)
    if digest != manifest["content_hash"]:
        raise DatasetError(f"dataset content hash {digest} does not match the manifest's {manifest['content_hash']}")
    if len(all_hashes) != manifest["n_samples"]:
        raise DatasetError(f"{len(all_hashes)} samples on disk, manifest says {manifest['n_samples']}")
    return {"n_samples": len(all_hashes), "n_shards": len(manifest["shards"]), "content_hash": digest}
