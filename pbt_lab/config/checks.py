"""Validation shared by the configs: the optimizer names, one-line errors, and typed coercion of
YAML and ``--set`` values."""

from __future__ import annotations

import contextlib
import difflib
import math
import types
import typing

from pbt_lab import UserError
from pbt_lab.names import TRAIN_ACC, VAL_ACC

TARGET_METRICS = (TRAIN_ACC, VAL_ACC)
# The study's optimizers; optimizers.py maps each to Keras (kept here so configs load without TF).
OPTIMIZER_NAMES = ("gd", "momentum", "adam", "adagrad", "adadelta", "rmsprop")


def canonical_name(optimizer: str) -> str:
    """The study's name for ``optimizer`` (case-insensitive), or one line naming the close match."""
    key = str(optimizer).strip().lower()
    if key in OPTIMIZER_NAMES:
        return key
    close = difflib.get_close_matches(key, OPTIMIZER_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"unknown optimizer '{optimizer}'{hint}: choose one of {', '.join(OPTIMIZER_NAMES)}")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def positive(name: str, value, kind=float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
    require(
        ok and (kind is float or float(value).is_integer()),
        f"{name} must be a positive {'number' if kind is float else 'integer'}, got {value!r}",
    )


def coerce(value, kind, name: str):
    """``value`` as type ``kind`` (float, int, bool, str, list[...], dict, or X | None)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return coerce(value, next(a for a in args if a is not type(None)), name)
    if origin is list:
        require(isinstance(value, list), f"{name} must be a list, got {value!r}")
        return [coerce(v, args[0], name) for v in value]
    if kind is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{name} must be a number, got {value!r}",
        )
        return float(value)
    if kind is int:
        require(
            isinstance(value, int) and not isinstance(value, bool),
            f"{name} must be an integer, got {value!r}",
        )
        return value
    expected = {bool: "true or false", str: "a string", dict: "a mapping"}[kind]
    require(isinstance(value, kind), f"{name} must be {expected}, got {value!r}")
    return value
