"""Configuration files: one YAML reader, one override grammar, one error format, one hash.

Recipes (datagen), training configs (mlplatform) and experiment definitions (experiments) are all YAML mappings
validated by pydantic models, overridden with ``--set dotted.key=value``, and identified by :func:`config_hash`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ConfigError


def canonical_json(obj: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_hash(obj: Any) -> str:
    """sha256 of :func:`canonical_json`: the identity of a recipe, a training config or an experiment definition."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """A YAML file whose top level is a mapping of sections; ``what`` names it in errors ("recipe", "sweep"...)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings, creating sections; a whole-number part indexes a list (``data.train.0.x``)."""
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        where = ".".join(keys[: i + 1])
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {dotted}: '{where}' indexes a list of {len(node)} items; use "
                                  f"0..{len(node) - 1}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(keys[:i])}' is a value ({node!r}), not a section with keys")
        if last:
            node[key] = value
        else:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]


def parse_override(text: str) -> tuple[str, Any]:
    """``dotted.key=value`` with the value read as YAML (so numbers, lists and ``{dist: ...}`` mappings work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set imaging.dose_e_per_A2=800")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key {key!r} is not a dotted key like imaging.dose_e_per_A2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.problem})") from None
    return key, value


def apply_overrides(data: dict, overrides=()) -> dict:
    """A deep copy of ``data`` with every ``dotted.key=value`` text applied in order.

    The JSON round trip is the copy, and makes YAML oddities (dates, sets) fail here rather than later.
    """
    data = json.loads(json.dumps(data))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return data


def require_unique(names: list[str], what: str) -> None:
    """Names that label metrics, runs or cells must not repeat."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what}: names must be unique, repeated: {', '.join(dup)}")


# pydantic names union branches in error locations ("tagged-union[...]", "uniform"): they are not keys
_DIST_TAGS = {"uniform", "normal", "truncnormal", "loguniform", "choice", "float", "int"}


def format_validation_error(what: str, exc: ValidationError) -> str:
    """One line per problem: dotted key, what is wrong, the value; ``what`` names the file ("recipe x.yaml")."""
    lines = [f"invalid {what}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]
                       if not (isinstance(p, str) and (p in _DIST_TAGS or "[" in p)))
        value = err.get("input")
        if isinstance(value, dict) and "dist" in value and err["type"] in ("float_type", "float_parsing"):
            continue  # a distribution that failed: its own error says why; "not a number" adds nothing
        if err["type"] == "model_attributes_type" and not isinstance(value, dict):
            continue  # a scalar where a number or a distribution goes: the number error says it
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (value {value!r}); check the spelling against the reference")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        shown = repr(value)
        if "got" in msg or len(shown) > 120 or not loc:
            lines.append(f"  {loc + ': ' if loc else ''}{msg}")
        else:
            lines.append(f"  {loc}: {msg} (got {shown})")
    return "\n".join(lines)


def validate(model, data: dict, what: str, error=ConfigError):
    """``model.model_validate(data)``, or ``error`` with one line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_validation_error(what, exc)) from None
