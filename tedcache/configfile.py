"""Config files: YAML nested like the config dataclasses. Command-line flags override a file's values;
every run folder (config.yaml) and cache (its metadata's `config`) keeps the resolved configuration."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import TedcacheError
from .schema import check_choices, from_dict, merge, to_dict

CONFIG_FILE = "config.yaml"
# settings renamed since earlier run folders were written: old key -> (new key, {old value: new value})
RENAMED = {"autocast": ("train_precision", {None: "auto", True: "bf16-mixed", False: "fp32"})}


def config_yaml(config) -> str:
    """A config record as YAML that `--config` reads back to the same record."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def read_config_file(path: str) -> dict:
    """The mapping a YAML config file holds (one-line errors for a missing or malformed file)."""
    file = Path(path)
    if not file.is_file():
        raise TedcacheError(f"config file {path} does not exist; give a YAML file (e.g. a run folder's {CONFIG_FILE})")
    try:
        values = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TedcacheError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TedcacheError(f"config file {path} must hold a mapping of settings, not a {type(values).__name__}")
    for old, (new, translate) in RENAMED.items():
        if old in values and new not in values:
            value = values.pop(old)
            values[new] = translate.get(value, value)
    return _expand_home(values)


def _expand_home(value):
    """Paths in a config file may start with ~ (the user's home), as they may on a command line."""
    if isinstance(value, dict):
        return {k: _expand_home(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_home(v) for v in value]
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~/") else value


def resolve(cls, *layers: dict, where: str = ""):
    """A checked `cls` record from mappings laid over one another (later ones win): unknown keys, wrong
    types and values outside a field's choices are one TedcacheError naming the key."""
    values: dict = {}
    for layer in layers:
        values = merge(values, layer)
    record = from_dict(cls, values, where)
    check_choices(record)
    return record
