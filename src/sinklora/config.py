"""Typed configuration: dataclasses hold every default and help string once; YAML files and
``key=value`` overrides layer on top; everything is validated before heavy work and all errors are
reported together.

A command's config is a (possibly nested) dataclass. Fields carry their help text in
``field(metadata={"help": ...})`` (use :func:`option`). A config class may define
``validate(self) -> list[str]`` returning human-readable errors (field name, value, fix).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more configuration values are invalid; the message lists every problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        if len(self.errors) == 1:
            super().__init__(f"invalid configuration: {self.errors[0]}")
        else:
            super().__init__("invalid configuration:\n" + "\n".join(f"  - {e}" for e in self.errors))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping holding one key twice is an error (PyYAML keeps the last
    silently; YAML 1.2 says keys are unique)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first[key] + 1})", key_node.start_mark)
            except TypeError:  # an unhashable key: the base class reports it
                break
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str, column_offset: int = 0) -> Any:
    """``text`` parsed as YAML; a syntax error or a duplicate key is one ConfigError line naming ``where``
    (a file or an override), the line and the column (shifted by ``column_offset`` on the first line)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        column = mark.column + 1 + (column_offset if mark is not None and mark.line == 0 else 0)
        at = f"line {mark.line + 1}, column {column}: " if mark is not None else ""
        problem = ": ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError([f"{where}: {at}{problem}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{where}: {' '.join(str(e).split())}"]) from None


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a help string (shown by ``sinklora CMD --help``)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str, errors: list[str]) -> Any:
    """Convert ``value`` to type ``tp`` (YAML already parsed scalars), or record an error."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            trial: list[str] = []
            out = _coerce(value, a, name, trial)
            if not trial:
                return out
        errors.append(f"{name}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{name}={value!r}: must be one of {', '.join(repr(a) for a in allowed)}{hint}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        out = [_coerce(v, item_tp, f"{name}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{name}={value!r}: expected a mapping")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            errors.append(f"{name}={value!r}: expected a mapping of {tp.__name__} fields")
            return tp()
        return _build(tp, value, errors, prefix=f"{name}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        errors.append(f"{name}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            errors.append(f"{name}={value!r}: expected an integer")
            return value
        try:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (TypeError, ValueError, OverflowError):
            errors.append(f"{name}={value!r}: expected an integer")
            return value
    if tp is float:
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            errors.append(f"{name}={value!r}: expected a number")
            return value
    if tp is str:
        if isinstance(value, (dict, list)):
            errors.append(f"{name}={value!r}: expected a string")
            return value
        return str(value)
    return value


def _build(cls: type[T], data: dict, errors: list[str], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            errors.append(f"unknown key '{prefix}{key}'{hint} (known keys: {', '.join(prefix + f for f in fields)})")
            continue
        kwargs[key] = _coerce(value, hints[key], prefix + key, errors)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        errors.append(f"{prefix.rstrip('.') or cls.__name__}: {e}")
        return None  # type: ignore[return-value]


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{dotted}: {p!r} is not a section"])
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=3", "name=x"]`` -> nested dict, values parsed as YAML scalars."""
    data: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError([f"override {item!r}: expected key=value (for example max_steps=10)"])
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"override {item!r}", column_offset=len(key) + 1) if raw.strip() else ""
        _set_dotted(data, key.strip().lstrip("-").replace("-", "_"), value)
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def collect_errors(cfg: Any, prefix: str = "", tolerant: bool = False) -> list[str]:
    """Run ``validate()`` on a config and every nested config dataclass. ``tolerant``: a field of the
    wrong type was already reported, so a validate() that trips over it is skipped."""
    errors: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            errors += collect_errors(value, prefix + f.name + ".", tolerant)
    if hasattr(cfg, "validate"):
        try:
            found = cfg.validate()
        except (TypeError, AttributeError):
            if not tolerant:
                raise
            found = []
        errors += [prefix + e if prefix and not e.startswith(prefix) else e for e in found]
    return errors


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Build ``cls`` from defaults, then a YAML file, then overrides; validate; raise ConfigError."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(p)!r} does not exist"])
        loaded = parse_yaml(p.read_text(), f"config file {str(p)!r}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"config file {str(p)!r}: expected a mapping at the top level"])
        data = loaded
    if overrides:
        data = _merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    errors: list[str] = []
    cfg = _build(cls, data, errors)
    if cfg is not None:
        errors += collect_errors(cfg, tolerant=bool(errors))
    if errors:
        raise ConfigError(errors)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a reader sees the old file or the new one)."""
    from sinklora import atomic

    atomic.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, nested sections flattened with dots."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
