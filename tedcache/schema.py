"""Typed records: dataclass fields that document themselves, and checked conversion between records and
plain dicts (YAML config files, a cache's JSON metadata), with one-line errors that name the key.

A field declared with `setting(default, "help")` carries its help text (and, optionally, its allowed
choices and the command-line flag it is reached by) in its metadata; the CLI, the config files and the
docs are generated from these declarations, so a default or a description lives in one place.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, fields, is_dataclass

from .errors import TedcacheError


def setting(default=MISSING, help: str = "", *, factory=None, choices: tuple[str, ...] | None = None,
            flag: str | None = None, prefix: str | None = None, items: str = ","):
    """A dataclass field with its documentation. `flag`: the CLI flag when it is not --field-name;
    `prefix`: for a nested record, the prefix of its fields' flags ("" flattens them); `choices`: the
    allowed values (checked by `check_choices`)."""
    meta = {"help": help, "choices": choices, "flag": flag, "prefix": prefix, "items": items}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def hints(cls) -> dict[str, typing.Any]:
    """The resolved type of each field of a dataclass (postponed annotations evaluated)."""
    return typing.get_type_hints(cls)


def is_record(hint) -> bool:
    return isinstance(hint, type) and is_dataclass(hint)


def _args(hint) -> tuple:
    return typing.get_args(hint)


def unwrap_optional(hint) -> tuple[bool, typing.Any]:
    """(whether None is allowed, the hint without None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in _args(hint) if a is not type(None)]
        if len(rest) < len(_args(hint)):
            return True, rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return False, hint


def type_name(hint) -> str:
    nullable, inner = unwrap_optional(hint)
    origin = typing.get_origin(inner)
    if origin is list:
        name = f"list of {type_name(_args(inner)[0])}"
    elif origin is dict:
        name = "mapping"
    elif is_record(inner):
        name = "mapping"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if nullable else name


def convert(value, hint, key: str):
    """`value` as `hint` says (an int where a float is wanted becomes a float; a YAML string such as
    "1e-4" for a float is read as one); TedcacheError naming `key` when it does not fit."""
    nullable, inner = unwrap_optional(hint)
    if inner is typing.Any:
        return value
    if value is None:
        if nullable:
            return None
        raise TedcacheError(f"{key} must be a {type_name(inner)}, not null")
    origin = typing.get_origin(inner)
    if is_record(inner):
        if not isinstance(value, dict):
            raise TedcacheError(f"{key} must be a mapping of {inner.__name__} settings, not {value!r}")
        return from_dict(inner, value, key)
    if origin is list or inner is list:
        if not isinstance(value, (list, tuple)):
            raise TedcacheError(f"{key} must be a list, not {value!r}")
        item_hint = _args(inner)[0] if _args(inner) else typing.Any
        return [convert(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or inner is dict:
        if not isinstance(value, dict):
            raise TedcacheError(f"{key} must be a mapping, not {value!r}")
        value_hint = _args(inner)[1] if _args(inner) else typing.Any
        return {k: convert(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if inner is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif inner is bool or inner is str:
        if isinstance(value, inner):
            return value
    raise TedcacheError(f"{key} must be a {type_name(hint)}, not {value!r}")


def from_dict(cls, data: dict, where: str = ""):
    """A `cls` record from a plain dict: unknown keys, missing required keys and wrong types are one
    TedcacheError naming the key (dotted from `where`)."""
    prefix = f"{where}." if where else ""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TedcacheError(f"unknown setting '{prefix}{unknown[0]}'; {cls.__name__} has "
                            f"{', '.join(known)}")
    types_of = hints(cls)
    values = {}
    for name, field in known.items():
        if name in data:
            value = data[name]
            if is_record(types_of[name]) and isinstance(value, dict) and field.default_factory is not MISSING:
                value = merge(to_dict(field.default_factory()), value)  # a partial mapping keeps the other defaults
            values[name] = convert(value, types_of[name], prefix + name)
        elif field.default is MISSING and field.default_factory is MISSING:
            raise TedcacheError(f"missing setting '{prefix}{name}' ({help_of(field) or type_name(types_of[name])})")
    return cls(**values)


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` laid over it, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def to_dict(record) -> dict:
    """The record as plain, JSON/YAML-ready values (nested records become mappings)."""
    return dataclasses.asdict(record)


def check_choices(record, where: str = "") -> None:
    """Every field declared with `choices` holds one of them (nested records included)."""
    for field in fields(record):
        value = getattr(record, field.name)
        choices = field.metadata.get("choices")
        if choices and value is not None and value not in choices:
            flag = field.metadata.get("flag") or field.name.replace("_", "-")
            raise TedcacheError(f"unknown {flag.lstrip('-')} '{value}'; use one of {', '.join(choices)}")
        if is_dataclass(value):
            check_choices(value, f"{where}{field.name}.")
