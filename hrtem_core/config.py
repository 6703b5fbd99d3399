"""Configuration files: one YAML reader, one override grammar, one error format, one hash.

Recipes (datagen), training configs (mlplatform) and experiment definitions (experiments) are all YAML mappings
validated by pydantic models, overridden with ``--set dotted.key=value``, and identified by :func:`config_hash`.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from .errors import ConfigError


def canonical_json(obj: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_hash(obj: Any) -> str:
    """sha256 of :func:`canonical_json`: the identity of a recipe, a training config or an experiment definition."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_key(node: yaml.Node, path: tuple = (), seen: set | None = None) -> str | None:
    """'line L: key K is given twice (first on line F)' for the first mapping (at any depth) that repeats a key, or
    None. YAML lets a later key silently replace an earlier one; a config that says two things means neither. Keys
    merged in with ``<<: *anchor`` may be overridden: only a mapping's own keys count."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already checked (or a recursive one)
        return None
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if isinstance(key_node, yaml.ScalarNode):
                ident = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if ident in first:
                    dotted = ".".join(str(p) for p in (*path, key_node.value))
                    return f"line {line}: key {dotted!r} is given twice (first on line {first[ident]})"
                first[ident] = line
            found = _duplicate_key(value_node, (*path, getattr(key_node, "value", "?")), seen)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, (*path, i), seen)
            if found:
                return found
    return None


def load_yaml(text: str, what: str) -> Any:
    """YAML text read safely, refusing a key given twice in any mapping (ConfigError naming ``what``, the key and
    its lines); yaml.YAMLError for text that is not YAML."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicate = _duplicate_key(node)
        if duplicate:
            raise ConfigError(f"{what}: {duplicate}: keep one of them")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """A YAML file whose top level is a mapping of sections; ``what`` names it in errors ("recipe", "sweep"...).
    A key given twice, at any depth, is an error naming the key and its lines."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        data = load_yaml(path.read_text(), f"{what} {path}")
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
        value = load_yaml(raw, f"--set {key}") if raw.strip() else None
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


# -- where a value came from ---------------------------------------------------------------------------------------

class Origins:
    """Where each value of a config came from: its file, or the override that set it (or a section above it) last.

    ``source`` names the file ("config runs/a.yaml"); ``add(key, where)`` records an override in the order they are
    applied, ``where`` being ``--set`` or a place in a definition file ("sweep s.yaml, subset a"). ``context`` (e.g.
    "subset a") is added to names that do not say it already. :meth:`name` is what errors print before the value.
    """

    def __init__(self, source: str, context: str | None = None):
        self.source, self.context = source, context
        self.overrides: list[tuple[str, str]] = []

    def add(self, key: str, where: str) -> "Origins":
        self.overrides.append((key, where))
        return self

    def add_sets(self, texts=()) -> "Origins":
        """Record ``--set dotted.key=value`` texts (malformed ones are refused by :func:`parse_override` anyway)."""
        for text in texts:
            key = text.split("=", 1)[0].strip()
            if key:
                self.add(key, "--set")
        return self

    def name(self, key: str) -> str:
        """'--set optim.lr', 'sweep s.yaml, subset a: data.train.0.filter' or 'config a.yaml: optim.lr' (the file's
        name alone for a problem of the whole config)."""
        label = None
        for okey, where in reversed(self.overrides):
            if key and (key == okey or key.startswith(okey + ".") or okey.startswith(key + ".")):
                if where == "--set":
                    label = f"--set {okey}" if okey == key or okey.startswith(key + ".") else f"--set {okey}: {key}"
                else:
                    label = f"{where}: {key}"
                break
        if label is None:
            label = f"{self.source}: {key}" if key else self.source
        if self.context and self.context not in label:
            label = f"{label} ({self.context})"
        return label


def show_value(value: Any) -> str:
    """A value as an error prints it: YAML's spelling for true/false/null, repr otherwise (long ones shortened)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    shown = repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


# -- the base of every schema: no unknown keys, finite numbers, numbers and booleans kept apart --------------------

def _admits(annotation: Any) -> set:
    """The plain types a field's annotation admits, through Optional, unions, Annotated and Literal; ``object`` for
    anything else (containers, models, Any)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _admits(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_admits(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if annotation is type(None) or annotation in (bool, int, float, str):
        return {annotation}
    return {object}


def _scalar_kind(value: Any, admitted: set) -> None:
    """ValueError when ``value`` is a boolean where only numbers go, or anything but a boolean where only true/false
    goes (pydantic's lax mode would read ``true`` as 1 and ``1`` or ``"yes"`` as true)."""
    if isinstance(value, bool) and bool not in admitted and admitted & {int, float}:
        raise ValueError("expected a whole number, not true/false" if float not in admitted else
                         "expected a number, not true/false")
    if admitted - {type(None)} == {bool} and value is not None and not isinstance(value, bool):
        raise ValueError("expected true or false")


class StrictModel(BaseModel):
    """A config section: unknown keys are refused, numbers must be finite (no .inf, .nan), a boolean is not a number
    (``epochs: true`` is refused, not read as 1) and only a boolean is a boolean (``dihedral: 1`` is refused)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is None:
            return value
        annotation = field.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0] if len(args) == 1 else annotation
        if typing.get_origin(annotation) is list and isinstance(value, list):
            admitted = _admits(typing.get_args(annotation)[0]) if typing.get_args(annotation) else {object}
            for item in value:
                _scalar_kind(item, admitted)
            return value
        _scalar_kind(value, _admits(field.annotation))
        return value


# -- validation errors ---------------------------------------------------------------------------------------------

# pydantic names union branches in error locations ("tagged-union[...]", "uniform"): they are not keys
_DIST_TAGS = {"uniform", "normal", "truncnormal", "loguniform", "choice", "float", "int"}
# pydantic's names of the branches of simple unions (int | str ...) and of constrained types: not keys either
_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "none", "constrained-int", "constrained-float",
              "constrained-str", "function-after", "function-before", "function-plain", "function-wrap"}


def format_validation_error(what: str, exc: ValidationError, origins: Origins | None = None) -> str:
    """One line per problem, ``<where>: <dotted key>: <value>: <what is allowed>``, where is the file (``what``) or
    the override that set the key (``origins``)."""
    origins = origins or Origins(what)
    lines: list[str] = []
    for err in exc.errors():
        parts = [p for p in err["loc"] if not (isinstance(p, str) and (p in _DIST_TAGS or "[" in p))]
        while parts and isinstance(parts[-1], str) and parts[-1] in _TYPE_TAGS:
            parts.pop()
        loc = ".".join(str(p) for p in parts)
        value = err.get("input")
        if isinstance(value, dict) and "dist" in value and err["type"] in ("float_type", "float_parsing"):
            continue  # a distribution that failed: its own error says why; "not a number" adds nothing
        if err["type"] == "model_attributes_type" and not isinstance(value, dict):
            continue  # a scalar where a number or a distribution goes: the number error says it
        name = origins.name(loc)
        if err["type"] == "extra_forbidden":
            line = f"{name}: unknown key (value {show_value(value)}); check the spelling against the reference"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            shown = show_value(value)
            if not loc or isinstance(value, (dict, list)) or len(shown) > 120:
                line = f"{name}: {msg}"
            else:
                line = f"{name}: {shown}: {msg}"
        if line not in lines:  # a union reports one problem per branch
            lines.append(line)
    return "\n".join(lines) or f"invalid {what}: {exc}"


def validate(model, data: dict, what: str, error=ConfigError, origins: Origins | None = None):
    """``model.model_validate(data)``, or ``error`` with one line per problem naming where its value came from."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_validation_error(what, exc, origins)) from None
