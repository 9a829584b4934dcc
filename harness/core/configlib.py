"""Strict loading of YAML into nested dataclasses: in a sweep of hundreds of runs, a misspelt key that is
silently ignored wastes an allocation, so nothing is ignored.

Every key must exist in its dataclass; a misspelt key is an error that names it, suggests the closest
valid key and lists all valid keys at that level. Types are checked against the annotations. Defaults
live in the dataclasses only. A dataclass field may be *polymorphic*: its `name` key chooses the
dataclass that validates the rest (used for `model:`, whose keys depend on the model).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from harness.core.errors import ConfigError
from harness.core.keys import set_dotted

# A field whose dataclass is chosen by its `name` key: metadata={"variants": callable(name) -> class | None,
# "variant_names": callable() -> list[str]}.
VARIANTS = "variants"


def positive(default: Any = dataclasses.MISSING, **kwargs):
    """A numeric field that must be > 0 (None allowed when the type is Optional)."""
    return dataclasses.field(default=default, metadata={"gt": 0}, **kwargs)


def non_negative(default: Any = dataclasses.MISSING, **kwargs):
    return dataclasses.field(default=default, metadata={"ge": 0}, **kwargs)


def bounded(default: Any = dataclasses.MISSING, *, ge: Any = None, gt: Any = None, le: Any = None, why: str = "", **kwargs):
    """A numeric field with bounds (ge/gt below, le above); `why` says where the upper bound comes from."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    return dataclasses.field(default=default, metadata={**meta, "why": why}, **kwargs)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return `value` checked (and, where lossless, converted) against type `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"config key {path}: expected {_type_name(tp)}, got {_fmt(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        raise ConfigError(
            f"config key {path}: {_fmt(value)} is not one of: {', '.join(map(str, choices))}"
        )
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {path}: expected {_type_name(tp)}, got {_fmt(value)}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {path}: expected a mapping, got {_fmt(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return load(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string; accept numeric strings.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(
        f"config key {path}: expected {_type_name(tp)}, got {_fmt(value)} ({type(value).__name__})"
    )


def _check_bounds(value: Any, meta: typing.Mapping, path: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(f"config key {path}: must be > {meta['gt']}, got {value}")
    if "ge" in meta and not value >= meta["ge"]:
        raise ConfigError(f"config key {path}: must be >= {meta['ge']}, got {value}")
    if "le" in meta and not value <= meta["le"]:
        why = f" ({meta['why']})" if meta.get("why") else ""
        raise ConfigError(f"config key {path}: must be <= {meta['le']:,}{why}, got {_fmt(value)}")


def _unknown_key(key: str, valid: list[str], path: str) -> ConfigError:
    where = f"under {path}" if path else "at the top level"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    full = f"{path}.{key}" if path else key
    return ConfigError(f"unknown config key {full}{hint}; valid keys {where}: {', '.join(valid)}")


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict:
    # Resolving string annotations costs ~1 ms per class; a sweep loads thousands of configs.
    return typing.get_type_hints(cls)


def load(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly. `path` is the dotted key prefix for messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = f"config key {path}" if path else "the config"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {_fmt(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _type_hints(cls)
    for key in data:
        if not isinstance(key, str) or key not in fields:
            raise _unknown_key(str(key), list(fields), path)
    kwargs = {}
    for name, value in data.items():
        field = fields[name]
        sub = f"{path}.{name}" if path else name
        if VARIANTS in field.metadata:
            kwargs[name] = _load_variant(field, value, sub)
            continue
        kwargs[name] = _coerce(value, hints[name], sub)
        _check_bounds(kwargs[name], field.metadata, sub)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"config {path or 'file'}: missing required key(s) {', '.join(missing)}") from e
    # Sections left out keep their defaults, which must be valid too (e.g. data.path has none).
    for name, field in fields.items():
        value = getattr(obj, name)
        if name not in kwargs and dataclasses.is_dataclass(value):
            _validate_tree(value, f"{path}.{name}" if path else name)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def _validate_tree(obj: Any, path: str) -> None:
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, f"{path}.{field.name}")
    if hasattr(obj, "validate"):
        obj.validate(path)


def _load_variant(field: dataclasses.Field, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"config key {path}: expected a mapping with a 'name' key, got {_fmt(value)}")
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
    name = value.get("name", getattr(default, "name", None))
    cls = field.metadata[VARIANTS](name) if isinstance(name, str) else None
    if cls is None:
        names = ", ".join(field.metadata["variant_names"]())
        raise ConfigError(f"config key {path}.name: {_fmt(name)} is not one of: {names}")
    # Keys left at their default are taken from the default only when the variant is unchanged.
    merged = dict(value)
    if default is not None and type(default) is cls:
        merged = {**to_dict(default), **value}
    return load(cls, merged, path)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists, in field order (for YAML and JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# Limits of the YAML the harness reads (configs, sweep specs, run directories' config.yaml). A config has about a
# hundred nodes and a large spec a few thousand; the limits stop a hostile file before it costs memory or stack:
# an alias bomb ("billion laughs": nine anchors of nine aliases each expand to 9^9 nodes when anything walks the
# tree) and deep nesting (PyYAML's composer recurses once per level: RecursionError near 1000 levels).
MAX_YAML_BYTES = 16 * 2**20
MAX_YAML_NODES = 100_000  # nodes after expanding aliases
MAX_YAML_DEPTH = 64


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one), nesting deeper than
    MAX_YAML_DEPTH and documents whose aliases expand to more than MAX_YAML_NODES nodes."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the second would silently replace the first)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_expanded_size(root) -> None:
    """Count the nodes of the tree with every alias expanded, without expanding it: a node's size is memoized
    by identity (an alias is the same node object), so this costs one visit per distinct node."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) not in sizes:
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = node.value
            else:
                children = []
            sizes[id(node)] = 1 + sum(size(c) for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"expands to more than {MAX_YAML_NODES:,} values (aliases of aliases?)", node.start_mark)
        return sizes[id(node)]

    if root is not None:
        size(root)


def load_yaml_text(text: str) -> Any:
    """YAML text as Python values, with the strict loader's limits (yaml.YAMLError when it breaks one)."""
    return yaml.load(text, Loader=_StrictLoader)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass the path of a YAML file in it (see yaml/ for examples)")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass the path of a YAML file (see yaml/ for examples)")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size:,} bytes, more than the {MAX_YAML_BYTES:,} a config "
                          "or sweep spec may have; pass a config file (see yaml/ for examples)")
    try:
        data = load_yaml_text(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; pass a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys to values at the top, got {_fmt(data)}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value); the value is read as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set optim.effective_lr=0.5")
    try:
        value = load_yaml_text(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set` overrides to a raw config mapping (before strict loading, which then checks them)."""
    data = _deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(data, ".".join(keys), value, f"--set {text!r}")
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data
