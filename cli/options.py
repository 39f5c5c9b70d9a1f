"""Click options generated from the config dataclasses: one flag per field (nested records flattened
under their prefix), the field's type, default and help. A command built here also takes `--config
FILE` (YAML, nested like the dataclass); flags given on the command line override the file. Commands whose
settings hold a run's as `base` (tune, compare) also take a run's own file (best-<method>.yaml, a run
folder's config.yaml) as their base."""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable

import click
from click.core import ParameterSource

from tedcache.configfile import read_config_file, resolve
from tedcache.errors import TedcacheError
from tedcache.schema import help_of, hints, is_record, unwrap_optional


@dataclass
class Flag:
    """One command-line flag and the config field it sets."""

    path: tuple[str, ...]  # field names from the top record down, e.g. ("optim", "lr")
    name: str  # "--lr"
    hint: Any  # the field's type
    default: Any  # the field's default where this record is used (MISSING: required)
    help: str
    items: str  # how list values are separated

    @property
    def param(self) -> str:
        """The click parameter name (unique per command)."""
        return "__".join(self.path)

    @property
    def key(self) -> str:
        return ".".join(self.path)


def flags_of(cls, exclude: tuple[str, ...] = (), prefix: str = "", path: tuple[str, ...] = (),
             defaults=None) -> list[Flag]:
    """The flags of every field of `cls` (recursively; `exclude` holds dotted field paths to leave out).
    `defaults`: an instance whose values are the defaults here (a nested record's factory default)."""
    result = []
    types_of = hints(cls)
    for field in fields(cls):
        field_path = path + (field.name,)
        if ".".join(field_path) in exclude:
            continue
        hint = types_of[field.name]
        if field.default is not MISSING:
            default = field.default
        elif field.default_factory is not MISSING:
            default = field.default_factory()
        else:
            default = MISSING
        if defaults is not None:
            default = getattr(defaults, field.name)
        if is_record(hint):
            inner = field.metadata.get("prefix")
            inner = f"{field.name.replace('_', '-')}-" if inner is None else inner
            result += flags_of(hint, exclude, prefix + inner, field_path, None if default is MISSING else default)
            continue
        name = field.metadata.get("flag") or f"--{field.name.replace('_', '-')}"
        result.append(Flag(field_path, f"--{prefix}{name[2:]}", hint, default, help_of(field),
                           field.metadata.get("items", ",")))
    names = [f.name for f in result]
    duplicated = {n for n in names if names.count(n) > 1}
    assert not duplicated, f"{cls.__name__}: flags {duplicated} name two fields"
    return result


def _base_type(hint):
    return unwrap_optional(hint)[1]


class ListOfItems(click.ParamType):
    """A list flag's value: one item or several joined by the separator; each item converted to the list's
    element type. Repeating the flag adds more (click's `multiple`); `_value` joins the repetitions."""

    def __init__(self, item_type: type, separator: str):
        self.item_type, self.separator = item_type, separator
        self.name = f"{item_type.__name__.upper()}[{separator}...]"

    def convert(self, value, param, ctx):
        items = [item.strip() for item in str(value).split(self.separator) if item.strip()]
        try:
            return [self.item_type(item) for item in items]
        except ValueError:
            self.fail(f"'{value}' is not a list of {self.item_type.__name__} joined by '{self.separator}' "
                      f"(e.g. {self.separator.join(['1', '2', '3'] if self.item_type is int else ['a', 'b'])})",
                      param, ctx)


def click_option(flag: Flag) -> click.Option:
    """The click.Option for a flag, its type, default and help from the dataclass field."""
    base = _base_type(flag.hint)
    default = None if flag.default is MISSING else flag.default
    required = " (required, here or in --config)" if flag.default is MISSING else ""
    if base is bool:
        if flag.default is None or default is True:  # tri-state (unset: "decide for me"), or on unless turned off
            stem = flag.name[2:]
            return click.Option([f"--{stem}/--no-{stem}", flag.param], default=default, help=flag.help)
        return click.Option([flag.name, flag.param], is_flag=True, default=bool(default), help=flag.help)
    if typing.get_origin(base) is list:
        shown = flag.items.join(map(str, default)) if default else None
        item_type = {int: int, float: float}.get(typing.get_args(base)[0], str)
        a, b = ("1", "2") if item_type is int else ("a", "b")
        several = (f" Several: joined by '{flag.items}' ({flag.name} {a}{flag.items}{b}), or the flag repeated "
                   f"({flag.name} {a} {flag.name} {b}), or both.")
        return click.Option([flag.name, flag.param], type=ListOfItems(item_type, flag.items), multiple=True,
                            default=None if default is None else list(default), show_default=shown or False,
                            help=flag.help + several + required)
    return click.Option([flag.name, flag.param], type={int: int, float: float}.get(base, str), default=default,
                        show_default=default is not None, help=flag.help + required)


def _value(flag: Flag, raw):
    """A flag's parsed value as the config record wants it (a list flag's repetitions joined into one list)."""
    if typing.get_origin(_base_type(flag.hint)) is list:
        return [item for items in raw for item in items]
    return raw


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _present(tree: dict, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def config_from_command_line(cls, flags: list[Flag], config_file: str | None, values: dict):
    """The `cls` record: dataclass defaults, then the config file, then the flags given on the command line."""
    ctx = click.get_current_context()
    given: dict = {}
    for flag in flags:
        if ctx.get_parameter_source(flag.param) not in (ParameterSource.DEFAULT, None):
            _set(given, flag.path, _value(flag, values[flag.param]))
    from_file = _as_base(cls, read_config_file(config_file)) if config_file else {}
    for flag in flags:
        if flag.default is MISSING and not (_present(given, flag.path) or _present(from_file, flag.path)):
            raise TedcacheError(f"missing {flag.name} ({flag.help.rstrip('.')}); give it as a flag or as "
                                f"'{flag.key}' in a --config file")
    return resolve(cls, from_file, given)


def _as_base(cls, values: dict) -> dict:
    """`values` with the keys `cls` does not have moved under its `base` field, where it has one: a run's
    config file given to tune or compare becomes their base (the keys of neither stay unknown, named as base.*)."""
    names = {f.name for f in fields(cls)}
    if "base" not in names or "base" in values:
        return values
    run = {k: v for k, v in values.items() if k not in names}
    return {**{k: v for k, v in values.items() if k in names}, **({"base": run} if run else {})}


def config_command(group: click.Group, name: str, cls, exclude: tuple[str, ...] = ()):
    """Register `fn(record)` as command `name` whose flags are generated from `cls` (see module doc)."""

    def register(fn: Callable):
        flags = flags_of(cls, exclude)

        def callback(config_file, **values):
            fn(config_from_command_line(cls, flags, config_file, values))

        params = [click_option(flag) for flag in flags]
        where = " or a run's own file (best-<method>.yaml, a run folder's config.yaml) as the base" \
            if any(f.name == "base" for f in fields(cls)) else " (e.g. a run folder's config.yaml)"
        params.append(click.Option(["--config", "config_file"], default=None, metavar="FILE",
                                   help=f"YAML file of settings, nested like the configuration{where}; flags "
                                        "override it."))
        group.add_command(click.Command(name, callback=callback, params=params, help=fn.__doc__))
        fn.flags = flags
        return fn

    return register
