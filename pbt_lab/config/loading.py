"""Configs from files: the defaults, then a YAML file (listing only what differs), then the Python
API's sections, then ``--set key=value`` overrides, built into the typed dataclasses with unknown keys
named and types checked."""

from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import yaml

from pbt_lab import UserError
from pbt_lab.config.checks import coerce, require


def load_config(
    cls: type,
    path: str | Path | None = None,
    overrides: list[str] = (),
    base: dict | None = None,
    settings: dict | None = None,
):
    """``cls`` built from its defaults, then ``base`` (e.g. a run's recorded config), then the YAML
    file at ``path``, then ``settings`` (the Python API's sections), then ``key=value`` overrides."""
    values: dict = merge(merge(base or {}, read_yaml(path) if path else {}), settings or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        require(bool(sep and key), f"--set expects key=value, got {item!r}")
        node = values
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"--set {key}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            node[leaf] = raw
    return build(cls, values)


def merge(low: dict, high: dict) -> dict:
    """``low`` with ``high`` laid over it, section by section."""
    out = dict(low)
    for key, value in high.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is written twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise UserError(f"config file {path} is not valid YAML{line}: {getattr(e, 'problem', e)}") from e
    require(
        isinstance(values, dict),
        f"config file {path} must hold a mapping of sections, got {type(values).__name__}",
    )
    return values


def build(cls: type, values: dict, prefix: str = ""):
    """``cls(**values)`` with nested sections built, types checked and unknown keys named."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if is_dataclass(kind):
            require(isinstance(value, dict), f"{prefix}{name} must be a section of keys, got {value!r}")
            kwargs[name] = build(kind, {**_experiment_defaults(cls, name), **value}, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _experiment_defaults(cls: type, name: str) -> dict:
    """Where an experiment's default section differs from the section's class defaults (the width
    study's 96 % target): those values, so a YAML or --set section that omits them keeps them."""
    f = next(f for f in fields(cls) if f.name == name)
    if f.default_factory is MISSING:
        return {}
    default = f.default_factory()
    plain = type(default)()
    return {
        k.name: getattr(default, k.name)
        for k in fields(default)
        if getattr(default, k.name) != getattr(plain, k.name)
    }
