"""Curated subsets of shard datasets: index the sample metadata, filter it, cap it, split it by structure.

The platform knows a dataset only through the sample contract (docs/architecture.md, "A dataset on disk", read
through :mod:`hrtem_core.dataset`): ``manifest.json``
plus WebDataset tars whose ``<key>.json`` members hold the metadata. Indexing decodes only those JSON members. Every
shard is checked against the sha256 the manifest records before anything of it is used: the first scan of a file
hashes it while reading it (one pass), later scans of the unchanged file find its digest in a cache
(``hrtem_core.shard_hashes``, by path, size and mtime) and seek past the arrays, so they cost the metadata and the
tar headers, not the pixels.

Filter language (``compile_filter``): a Python-syntax boolean expression over dotted metadata fields, e.g.
``-200 <= imaging.defocus_A <= 200 and structure.n_defects >= 1 and not structure.has_stacking_fault``. Allowed:
``and or not``, comparisons ``== != < <= > >= in, not in`` (chained too), parentheses, numbers, strings,
``True False None``, list/tuple/set literals, ``+ - * /`` on numbers and the calls ``abs min max``. It is parsed with
:mod:`ast` and checked against a whitelist; nothing is ever ``eval``-ed and fields are looked up in the metadata dict
only, never as Python attributes.

Missing fields: a field must exist in at least one sample (else the filter is refused as naming an unknown field).
In a sample that lacks it, any comparison, ``in`` test or bare truth test involving it is False, and arithmetic on
it stays missing. ``not`` negates that False as usual: ``not structure.has_twin`` is True for a sample with no
``structure.has_twin``; write ``structure.has_twin == False`` to require the field to be present.

Randomness: every seeded choice ranks items by ``sha256(f"{seed}|{item id}")``. That is a seeded shuffle that does
not depend on the order of the input, on Python's ``random`` implementation, nor on which other items are present;
so ``max_samples=100`` picks a subset of what ``max_samples=200`` picks with the same seed (nested learning curves).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import operator
import os
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from hrtem_core.dataset import (MANIFEST, check_image_and_mask, iter_shard, load_metadata, load_npy, read_manifest,
                                read_shard)
from hrtem_core.errors import DatasetError, InputError
from hrtem_core.locations import as_location, exists, is_url, join, name_of, stamp
from hrtem_core.shard_hashes import ShardHashCache


class CurationError(InputError):
    """A dataset, filter or selection that cannot be used; the message names what and where."""


class FilterError(CurationError):
    """A filter expression that is not valid, names an unknown field, or cannot be evaluated on a sample."""


@dataclass(frozen=True)
class SampleRecord:
    dataset_name: str
    dataset_path: str
    content_hash: str
    shard: str
    key: str
    structure_id: str
    # excluded from eq/hash so records can live in sets and dict keys
    meta: dict = field(compare=False, hash=False, repr=False)
    # where the sample's members lie in its shard, as the (sha256-checked) scan found them: ((field, byte offset of
    # its data, size), ...) in file order, and the shard file's (size, mtime_ns) then (mtime_ns -1 on object
    # storage): the loaders read the members by offset, after checking the shard is still that file
    members: tuple = field(default=(), compare=False, hash=False, repr=False)
    shard_stamp: tuple = field(default=(), compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class SkippedShard:
    """A shard left out of a dataset by ``scan_dataset(..., skip_bad_shards=True)``, and why."""

    dataset: str  # the manifest's name
    path: str  # the dataset's folder or prefix
    shard: str  # the shard's file name
    reason: str
    n_samples: int | None = None  # as the manifest says

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "path": self.path, "shard": self.shard, "reason": self.reason,
                "n_samples": self.n_samples}


@dataclass(frozen=True)
class DatasetIndex:
    name: str
    path: str
    content_hash: str
    records: list[SampleRecord] = field(repr=False)
    manifest: dict = field(compare=False, repr=False)
    skipped: tuple[SkippedShard, ...] = field(default=(), compare=False)

    @property
    def n_samples(self) -> int:
        return len(self.records)


def _order(r: SampleRecord):
    return (r.dataset_name, r.dataset_path, r.key)


def _rank(seed: int, ident: str) -> str:
    return hashlib.sha256(f"{seed}|{ident}".encode()).hexdigest()


def _structure_id(content_hash: str, key: str, meta: dict) -> str:
    seed = meta.get("seed")
    if isinstance(seed, dict) and seed.get("structure") is not None:
        return f"{content_hash[:16]}/{seed['structure']}"
    # e.g. imported experimental images: each image is its own structure
    return f"{content_hash[:16]}/{key.partition('_')[0]}"


# --------------------------------------------------------------------------------------------------- indexing
def scan_dataset(path: str | os.PathLike, hash_cache: ShardHashCache | None = None,
                 skip_bad_shards: bool = False) -> DatasetIndex:
    """Index a finished dataset from its manifest and the ``.json`` members of its shards (arrays are not decoded).

    Every shard is checked against the sha256 its manifest records (``hrtem_core.dataset.read_shard``): hashed while
    it is scanned, in the same single pass, unless ``hash_cache`` (default: ``ShardHashCache.default()``, saved here)
    knows the digest of the file as it is now, in which case its arrays are seeked over. A shard that differs from
    the manifest, or a manifest of the wrong shape, raises DatasetError naming the dataset, the shard and what
    differs, so nothing reads data that is not what the manifest (and its content hash) says.

    ``skip_bad_shards``: a shard that is missing, unreadable, differs from its sha256, holds samples whose image and
    mask do not decode as training reads them (``hrtem_core.dataset.check_image_and_mask``) or whose metadata is not
    JSON, or holds another number of samples than the manifest says, is left out instead, and listed in the index's
    ``skipped``; the arrays of every shard are then decoded once here (a full read), so that nothing fails later in
    the loaders. A dataset all of whose shards are bad still raises DatasetError.
    """
    root = path if is_url(path) else Path(path).resolve()  # a folder, or a prefix on object storage
    mpath = join(root, MANIFEST)
    if not exists(mpath):
        raise CurationError(f"{path}: no {MANIFEST}; not a finished dataset")
    try:
        manifest = read_manifest(root)  # checked: DatasetError naming the manifest, the key and what is allowed
    except OSError as exc:
        raise CurationError(f"{mpath}: unreadable ({type(exc).__name__}: {exc})") from None
    name, chash, shards = manifest["name"], manifest["content_hash"], manifest["shards"]
    cache = ShardHashCache.default() if hash_cache is None else hash_cache
    records: list[SampleRecord] = []
    skipped: list[SkippedShard] = []
    try:
        for shard in shards:
            try:
                shard_records = _scan_shard(root, path, name, chash, shard, cache, decode=skip_bad_shards)
            except InputError as exc:
                if not skip_bad_shards:
                    raise
                skipped.append(SkippedShard(name, str(root), shard["name"], str(exc), shard.get("n_samples")))
                continue
            records.extend(shard_records)
    finally:
        if hash_cache is None:
            cache.save()  # the digests of the shards hashed so far, even when a later one fails
    if skipped and len(skipped) == len(shards):
        raise DatasetError(f"dataset {root}: all {len(shards)} shard(s) are bad, nothing is left to read (first: "
                           f"{skipped[0].shard}: {skipped[0].reason}); regenerate the dataset or leave it out")
    records.sort(key=lambda r: r.key)
    expected = manifest.get("n_samples")
    if skipped and isinstance(expected, int):
        expected -= sum(s.n_samples or 0 for s in skipped)
    if len(records) != expected:
        raise CurationError(f"{root}: {len(records)} samples in the shards, manifest says {expected}"
                            + (f" (less the {len(skipped)} skipped shard(s))" if skipped else ""))
    dup = next((a.key for a, b in zip(records, records[1:]) if a.key == b.key), None)
    if dup is not None:
        raise CurationError(f"{root}: sample key {dup} occurs more than once")
    return DatasetIndex(name, str(root), chash, records, manifest, tuple(skipped))


def _scan_shard(root, path, name: str, chash: str, shard: dict, cache: ShardHashCache, decode: bool
                ) -> list[SampleRecord]:
    """The records of one shard, once its sha256 has been checked; InputError (CurationError, DatasetError) naming the
    shard and what is wrong with it. ``decode``: its images and masks are decoded and checked too (a full read)."""
    spath = join(root, shard["name"])
    problem = None  # the first sample that does not decode: reported once the shard's sha256 has been checked
    spans: dict = {}
    try:  # collected first: nothing is used before the shard's sha256 has been checked
        before = stamp(spath)
        if decode:
            samples = []
            for key, fields in iter_shard(root, shard, cache=cache, spans=spans):  # only the metadata is kept
                samples.append((key, {"json": fields.get("json", b"")}))
                if problem is None:
                    problem = _undecodable(f"{spath}: sample {key}", fields)
        else:
            samples = read_shard(root, shard, fields=("json",), cache=cache, spans=spans)
        if stamp(spath) != before:
            raise CurationError(f"{spath}: the shard changed while it was indexed; index it again")
    except (tarfile.TarError, OSError) as exc:
        raise CurationError(f"{spath}: unreadable shard ({type(exc).__name__}: {exc})") from None
    except DatasetError as exc:
        if decode:
            raise
        raise DatasetError(f"{exc}; 'python -m datagen verify {path}' names the sample, or train with "
                           "--skip-bad-shards to leave the shard out") from None
    if problem is not None:
        raise DatasetError(problem)
    records = []
    for key, fields in samples:
        meta = load_metadata(fields["json"], f"{spath}: sample {key}")
        members = tuple(sorted(((f, *span) for f, span in spans.get(key, {}).items()), key=lambda m: m[1]))
        records.append(SampleRecord(name, str(root), chash, str(spath), key, _structure_id(chash, key, meta), meta,
                                    members, before))
    if "n_samples" in shard and len(samples) != shard["n_samples"]:
        raise CurationError(f"{spath}: {len(samples)} samples with metadata, manifest says {shard['n_samples']}")
    return records


def _undecodable(where: str, fields: dict[str, bytes]) -> str | None:
    """Why a sample's members would fail in the loaders (``mlplatform.data``), or None."""
    missing = [f for f in ("image.npy", "mask.npy", "json") if f not in fields]
    if missing:
        return f"{where}: has no {' and no '.join(missing)} member"
    try:
        check_image_and_mask(load_npy(fields["image.npy"], f"{where}, image.npy"),
                             load_npy(fields["mask.npy"], f"{where}, mask.npy"), where)
    except DatasetError as exc:
        return str(exc)
    return None


def known_fields(records: Iterable[SampleRecord | dict]) -> set[str]:
    """Dotted paths of every leaf (non-dict value, lists included) present in any sample's metadata."""
    out: set[str] = set()

    def walk(d: dict, prefix: str):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out.add(f"{prefix}{k}")

    for r in records:
        walk(r.meta if isinstance(r, SampleRecord) else r, "")
    return out


# ------------------------------------------------------------------------------------------------ filter language
class _Missing:
    """A field absent from this sample: falsy, and poisoning arithmetic."""

    def __bool__(self):
        return False

    def __repr__(self):
        return "<missing>"


MISSING = _Missing()
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
        ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_CALLS = {"abs": abs, "min": min, "max": max}
_NODE_NAMES = {ast.Lambda: "lambda", ast.ListComp: "a list comprehension", ast.SetComp: "a set comprehension",
               ast.DictComp: "a dict comprehension", ast.GeneratorExp: "a generator expression",
               ast.Subscript: "subscripting x[...]", ast.Dict: "a dict literal", ast.JoinedStr: "an f-string",
               ast.NamedExpr: "an assignment (:=)", ast.IfExp: "a conditional (x if c else y)",
               ast.Starred: "unpacking (*x)", ast.Slice: "a slice", ast.Await: "await", ast.Is: "'is' (use ==)",
               ast.IsNot: "'is not' (use !=)", ast.Pow: "'**'", ast.Mod: "'%'", ast.FloorDiv: "'//'",
               ast.Invert: "'~'", ast.BitAnd: "'&' (use 'and')", ast.BitOr: "'|' (use 'or')"}


class Filter:
    """A compiled filter: ``f(meta) -> bool``; ``.text`` is the expression, ``.fields`` the fields it reads."""

    def __init__(self, text: str, fn: Callable[[dict], Any], fields: set[str]):
        self.text, self._fn, self.fields = text, fn, fields

    def __call__(self, meta: dict) -> bool:
        try:
            return bool(self._fn(meta))
        except FilterError as exc:
            raise FilterError(f"filter {self.text!r} on sample {meta.get('id', '?')}: {exc}") from None

    def __repr__(self):
        return f"Filter({self.text!r})"


def _field_chain(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _unknown_field(name: str, known: set[str]) -> str:
    section = sorted(f for f in known if f.startswith(name + "."))
    if section:
        more = f", ... ({len(section)} in all)" if len(section) > 8 else ""
        return f"{name!r} is a section, not a value; its fields: {', '.join(section[:8])}{more}"
    close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
    leaf = name.rsplit(".", 1)[-1]  # also suggest 'imaging.defocus_A' for a bare or misplaced 'defocus_A'
    close += [f for f in sorted(known) if f.rsplit(".", 1)[-1] == leaf and f not in close]
    hint = f"; did you mean {', '.join(close[:5])}?" if close else "; no similar field exists"
    return f"unknown field {name!r}{hint}"


def _numbers(*values):
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise FilterError(f"arithmetic needs numbers, got {v!r}")


# far beyond any hand-written filter, far below Python's recursion limit (compiling, evaluating and quoting a node in
# an error message each take a few frames per level)
MAX_FILTER_DEPTH = 100


def _depth(tree: ast.AST) -> int:
    """The nesting depth of an expression's syntax tree, counted without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def compile_filter(expr: str, known_fields: set[str]) -> Filter:
    """Compile a filter expression over sample metadata (see the module docstring for the grammar)."""
    text = " ".join(str(expr).split("\n")).strip()  # YAML may fold or break long filters over lines
    if not text:
        raise FilterError("filter is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        col = exc.offset if exc.offset and 1 <= exc.offset <= len(text) else len(text) + 1
        where = "at the end" if col > len(text) else f"at column {col}"
        raise FilterError(f"filter {text!r}: syntax error {where}: {exc.msg}\n  {text}\n  {' ' * (col - 1)}^") \
            from None
    except (RecursionError, MemoryError):  # Python's parser gives up on a few thousand nested operators
        raise FilterError(f"filter {_clip(text)!r}: nested too deeply (at most {MAX_FILTER_DEPTH} levels of "
                          "operators, calls and parentheses)") from None
    if (depth := _depth(tree)) > MAX_FILTER_DEPTH:  # compiling and evaluating recurse once per level
        raise FilterError(f"filter {_clip(text)!r}: nested {depth} levels deep; at most {MAX_FILTER_DEPTH} levels "
                          "of operators, calls and parentheses are allowed")
    used: set[str] = set()

    def bad(node, what):
        return FilterError(f"filter {text!r}: {what} is not allowed (column {getattr(node, 'col_offset', 0) + 1}: "
                           f"{ast.unparse(node)!r})")

    def build(node) -> Callable[[dict], Any]:
        # each branch returns a closure; evaluating a filter is then a few Python calls per node
        if isinstance(node, ast.BoolOp):
            parts = [build(v) for v in node.values]
            if isinstance(node.op, ast.And):
                return lambda m: all(p(m) for p in parts)
            return lambda m: any(p(m) for p in parts)
        if isinstance(node, ast.UnaryOp):
            inner = build(node.operand)
            if isinstance(node.op, ast.Not):
                return lambda m: not inner(m)
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                sign = -1 if isinstance(node.op, ast.USub) else 1

                def unary(m):
                    v = inner(m)
                    if v is MISSING:
                        return v
                    _numbers(v)
                    return sign * v
                return unary
            raise bad(node, f"operator {_NODE_NAMES.get(type(node.op), type(node.op).__name__)}")
        if isinstance(node, ast.BinOp):
            if type(node.op) not in _ARITH:
                raise bad(node, f"operator {_NODE_NAMES.get(type(node.op), type(node.op).__name__)}")
            fn, left, right = _ARITH[type(node.op)], build(node.left), build(node.right)

            def arith(m):
                a, b = left(m), right(m)
                if a is MISSING or b is MISSING:
                    return MISSING
                _numbers(a, b)  # numbers only: no 'x' * 10**9 strings
                try:
                    return fn(a, b)
                except ZeroDivisionError:
                    raise FilterError(f"division by zero in {ast.unparse(node)!r}") from None
            return arith
        if isinstance(node, ast.Compare):
            for op in node.ops:
                if type(op) not in _CMP:
                    raise bad(node, f"comparison {_NODE_NAMES.get(type(op), type(op).__name__)}")
            ops = [_CMP[type(op)] for op in node.ops]
            operands = [build(node.left), *(build(c) for c in node.comparators)]

            def compare(m):
                a = operands[0](m)
                for fn, get_b in zip(ops, operands[1:]):
                    b = get_b(m)
                    if a is MISSING or b is MISSING:
                        return False
                    try:
                        if not fn(a, b):
                            return False
                    except TypeError:
                        raise FilterError(f"cannot compare {a!r} with {b!r} in {ast.unparse(node)!r}") from None
                    a = b
                return True
            return compare
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _CALLS) or node.keywords:
                what = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
                raise bad(node, f"calling {what!r} (only abs, min and max, with positional arguments)")
            fn, args = _CALLS[node.func.id], [build(a) for a in node.args]

            def call(m):
                vals = [a(m) for a in args]
                if any(v is MISSING for v in vals):
                    return MISSING
                try:
                    return fn(*vals)
                except (TypeError, ValueError) as exc:
                    raise FilterError(f"{ast.unparse(node)!r}: {exc}") from None
            return call
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [build(e) for e in node.elts]
            return lambda m: tuple(i(m) for i in items)  # a tuple: fields may hold unhashable lists
        if isinstance(node, ast.Constant):
            if node.value is not None and not isinstance(node.value, (bool, int, float, str)):
                raise bad(node, f"a {type(node.value).__name__} literal")
            return lambda m, v=node.value: v
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = _field_chain(node)
            if name is None:
                raise bad(node, "attribute access on anything but a metadata field")
            if name not in known_fields:
                raise FilterError(f"filter {text!r}: {_unknown_field(name, known_fields)}")
            used.add(name)
            parts = name.split(".")

            def get(m):
                for p in parts:  # dict lookups only: never getattr
                    if not isinstance(m, dict) or p not in m:
                        return MISSING
                    m = m[p]
                return m
            return get
        raise bad(node, _NODE_NAMES.get(type(node), f"a {type(node).__name__} expression"))

    return Filter(text, build(tree.body), used)


# ------------------------------------------------------------------------------------------------- selection
def select(source: DatasetIndex | Iterable[SampleRecord], filter: str | None = None, max_samples: int | None = None,
           max_images_per_structure: int | None = None, seed: int = 0) -> list[SampleRecord]:
    """Filter, cap images per structure, cap the total; records sorted by (dataset_name, dataset_path, key).

    Known fields for the filter are those of all the given records. A filter that keeps nothing raises
    :class:`CurationError`. Both caps choose by seeded rank (module docstring), so they are reproducible, change with
    the seed, and a smaller cap picks a subset of what a larger one picks.
    """
    records = list(source.records if isinstance(source, DatasetIndex) else source)
    where = f" of {source.name} ({source.path})" if isinstance(source, DatasetIndex) else ""
    if not records:
        raise CurationError(f"nothing to select from: no samples{where}")
    for cap, label in ((max_samples, "max_samples"), (max_images_per_structure, "max_images_per_structure")):
        if cap is not None and cap < 1:
            raise CurationError(f"{label} must be >= 1 or None, got {cap}")
    if filter is not None and filter.strip():
        f = compile_filter(filter, known_fields(records))
        kept = [r for r in records if f(r.meta)]
        if not kept:
            raise CurationError(f"filter {f.text!r} selected none of the {len(records)} samples checked{where}")
        records = kept
    if max_images_per_structure is not None:
        groups: dict[str, list[SampleRecord]] = defaultdict(list)
        for r in records:
            groups[r.structure_id].append(r)
        by_rank = lambda r: _rank(seed, f"{r.structure_id}|{r.key}")  # noqa: E731
        records = [r for g in groups.values() for r in sorted(g, key=by_rank)[:max_images_per_structure]]
    if max_samples is not None and len(records) > max_samples:
        records = sorted(records, key=lambda r: _rank(seed, f"{r.content_hash}|{r.key}"))[:max_samples]
    return sorted(records, key=_order)


def split_by_structure(records: Iterable[SampleRecord], val_fraction: float, seed: int = 0
                       ) -> tuple[list[SampleRecord], list[SampleRecord]]:
    """(train, val) with every image of a structure on one side.

    val gets ``round(val_fraction * n_structures)`` structures, at least 1 and at most n_structures - 1, chosen by a
    seeded shuffle of the unique structure ids; independent of record order. Both lists are in (dataset, key) order.
    """
    records = sorted(records, key=_order)
    if not 0 < val_fraction < 1:
        raise CurationError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    ids = sorted({r.structure_id for r in records})
    if len(ids) < 2:
        raise CurationError(f"cannot split {len(records)} samples of {len(ids)} structure(s) into train and "
                            "validation: at least 2 structures are needed")
    n_val = min(max(round(val_fraction * len(ids)), 1), len(ids) - 1)
    val_ids = set(sorted(ids, key=lambda s: _rank(seed, s))[:n_val])
    return [r for r in records if r.structure_id not in val_ids], [r for r in records if r.structure_id in val_ids]


# ------------------------------------------------------------------------------------------------------- naming
def _ref_get(ref, key):
    return ref.get(key) if isinstance(ref, dict) else getattr(ref, key, None)


def subset_name(refs: Sequence[Any], seed: int | None = None, max_len: int = 60) -> str:
    """A short readable name for a curated subset, e.g. ``tiny-seed3[imaging.defocus_A>=-200 an...]-1a2b3c4d``.

    ``refs`` are DatasetRefs (or dicts with path, name, filter, max_samples, max_images_per_structure). The label
    is the ref's name, else the manifest name, else the folder name. The 8-hex suffix hashes the full description
    (each dataset's content hash where its manifest is readable, filter, caps, and ``seed`` when a cap makes the
    subset depend on it), so different subsets never share a name even when the readable part is truncated.
    """
    readable, full = [], []
    for ref in refs:
        path = str(_ref_get(ref, "path"))
        try:
            manifest = read_manifest(as_location(path))
        except (OSError, ValueError):
            manifest = {}
        label = _ref_get(ref, "name") or manifest.get("name") or name_of(path)
        filt = " ".join(str(_ref_get(ref, "filter") or "").split())
        caps = [f"{tag}{v}" for tag, v in (("max", _ref_get(ref, "max_samples")),
                                           ("per", _ref_get(ref, "max_images_per_structure"))) if v]
        part = label + (f"[{_compact(filt)}]" if filt else "") + (f"({','.join(caps)})" if caps else "")
        readable.append(part)
        identity = manifest.get("content_hash") or str(path if is_url(path) else Path(path).resolve())
        full.append(json.dumps([label, identity, filt, caps, seed if caps else None]))
    text = "+".join(readable)
    if len(text) > max_len:
        text = text[:max_len - 3] + "..."
    return f"{text}-{hashlib.sha256(chr(10).join(full).encode()).hexdigest()[:8]}"


def _compact(expr: str) -> str:
    # drop the spaces around comparison operators only; 'and'/'or'/'not' keep theirs
    for op in (">=", "<=", "==", "!=", ">", "<"):
        expr = expr.replace(f" {op} ", op)
    return expr


# -------------------------------------------------------------------------------------------- a selection's identity
def selection_digest(records: Sequence[SampleRecord], filter: str | None = None) -> str:
    """Digest of exactly the samples a run reads and the filter that chose them: each record's dataset content hash
    and key, sorted, hashed with the filter. Two selections share it only if they are the same samples of the same
    data, chosen by the same filter (so a dataset input's description, filter included, holds for every run)."""
    lines = [f"filter {' '.join((filter or '').split())}", *sorted(f"{r.content_hash}/{r.key}" for r in records)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _summary(values: list[float]) -> dict | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=float)
    return {"min": round(float(arr.min()), 3), "median": round(float(np.median(arr)), 3),
            "max": round(float(arr.max()), 3)}


def selection_profile(records: Sequence[SampleRecord]) -> dict:
    """What a microscopist asks of a training set, in a few numbers: samples and structures, materials, structure
    kinds, defocus, dose and particle radius ranges, and how many samples carry how many planar defects."""
    def get(r: SampleRecord, section: str, key: str):
        value = (r.meta.get(section) or {}).get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def numbers(section: str, key: str) -> list[float]:
        return [v for v in (get(r, section, key) for r in records) if v is not None]

    def counts(section: str, key: str) -> dict:
        found = Counter(str((r.meta.get(section) or {}).get(key)) for r in records
                        if (r.meta.get(section) or {}).get(key) is not None)
        return dict(sorted(found.items()))

    profile = {"n_samples": len(records), "n_structures": len({r.structure_id for r in records}),
               "material": counts("structure", "material"), "structure_kind": counts("structure", "kind"),
               "n_defects": counts("structure", "n_defects"),
               "defocus_A": _summary(numbers("imaging", "defocus_A")),
               "dose_e_per_A2": _summary(numbers("imaging", "dose_e_per_A2")),
               "radius_A": _summary(numbers("structure", "radius_A"))}
    return {k: v for k, v in profile.items() if v not in (None, {})}
