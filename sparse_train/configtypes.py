"""Typed config sections: strict type checking, nested construction from plain dicts, overrides.

A config is a tree of dataclasses deriving from `Section`. Every field carries a one-line help
text (`option(...)`). Construction checks each field against its annotation before the
section's own `validate()` runs, so every error is a `ConfigError` naming the field and what is
allowed. Nothing here knows about the sparse_train fields themselves (see `config.py`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

from sparse_train.errors import ConfigError

T = TypeVar("T", bound="Section")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a one-line help text (shown by `sparse-train config --fields`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        nullable = type(None) in typing.get_args(tp)
        return " or ".join(parts) + (" or null" if nullable else "")
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_describe(inner)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return `value` converted to `tp` where the conversion is lossless, else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(path, f"must be {_describe(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"must be {_describe(tp)}, got null")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"must be {_describe(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be {_describe(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, path)
        raise ConfigError(path, f"must be {_describe(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} at {path}")
    raise ConfigError(path, f"must be {_describe(tp)}, got {value!r}")


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """typing.get_type_hints, once per class: it evaluates the string annotations every call
    (most of building a config: a planner validates tens of thousands of them)."""
    return typing.get_type_hints(cls)


@dataclass
class Section:
    """Base of every config section: type-checks its fields, then runs `validate()`."""

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                setattr(self, f.name, _coerce(value, hints[f.name], f.name))
            except ConfigError as err:
                if err.field_path.startswith(f.name):
                    raise
                raise err.under(f.name) from None
        self.validate()

    def validate(self) -> None:
        """Checks beyond types; raise ConfigError(field, message). Overridden by sections."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build section `cls` from a plain mapping; unknown keys are errors, never ignored."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"must be a mapping, got {data!r}")
    known = field_names(cls)
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(where, f"unknown key{suggestion}; allowed: {', '.join(known)}")
    hints = type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        child = f"{path}.{key}" if path else key
        tp = hints[key]
        kwargs[key] = from_dict(tp, value, child) if dataclasses.is_dataclass(tp) else value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise (err.under(path) if path else err) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a","b","c"], parsed value); the value is read as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError("--set", f"expected KEY=VALUE (e.g. train.steps=100), got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError("--set", f"malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict[str, Any], cls: type, parts: list[str], value: Any) -> None:
    """Set `value` at the dotted path in `data`, checking each step names a real field."""
    node, section, walked = data, cls, []
    for i, part in enumerate(parts):
        walked.append(part)
        known = field_names(section)
        if part not in known:
            hint = difflib.get_close_matches(part, known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(".".join(walked), f"unknown key{suggestion}; allowed: {', '.join(known)}")
        tp = type_hints(section)[part]
        if i == len(parts) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(".".join(walked), "is not a section; cannot set a sub-key of it")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(walked), "is not a mapping in the config file")
        section = tp


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) for every leaf field, for documentation and `config --fields`."""
    rows = []
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_help(hints[f.name], name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((name, f.metadata.get("help", ""), default))
    return rows
