"""Typed configuration: defaults live here once, each field with a one-line docstring.

Every dataclass validates itself on construction (and on ``dataclasses.replace``), so a bad
value fails with one clear line before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pbt_lab import UserError
from pbt_lab.optimizers import canonical_name

TARGET_METRICS = ("train_acc", "val_acc")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _positive(name: str, value, kind=float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    _require(ok and (kind is float or float(value).is_integer()),
             f"{name} must be a positive {'number' if kind is float else 'integer'}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The study's CNN (DESIGN §1)."""

    scale: float = 1.0
    """Width factor: multiplies the conv filters (32, 64)."""
    scale_dense: bool = False
    """Also multiply the dense layer by ``scale`` (the study's code kept it at 1024)."""
    dense_units: int = 1024
    """Units of the hidden dense layer at scale 1."""
    dropout: float = 0.4
    """Dropout rate before the output layer."""

    def __post_init__(self):
        _positive("model.scale", self.scale)
        _positive("model.dense_units", self.dense_units, int)
        _require(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: optimizer, rate, target and budgets (the study's defaults)."""

    optimizer: str = "adam"
    """One of gd, momentum, adam, adagrad, adadelta, rmsprop (case-insensitive)."""
    lr: float = 1e-3
    """Learning rate."""
    optimizer_args: dict = field(default_factory=dict)
    """Keras arguments that override the optimizer's TF1 defaults, e.g. {epsilon: 1e-7}."""
    batch_size: int = 100
    """Images per training step."""
    steps_per_check: int = 50
    """Training steps fused into one call; metrics, target and budgets are checked between calls."""
    target: float = 0.97
    """Accuracy that counts as trained."""
    target_metric: str = "train_acc"
    """train_acc (the study: accuracy over the last check's batches) or val_acc."""
    stop_at_target: bool = True
    """End the run when the target is reached (the study's criterion)."""
    max_steps: int | None = None
    """Step budget; None for no step cap."""
    max_seconds: float | None = 120.0
    """Budget in pure training seconds (the study's 120 s cap); None for no cap."""
    divergence_loss: float | None = 1e3
    """A training loss above this (chance is ln 10 ≈ 2.3), or a non-finite one, ends the run as diverged."""
    val_every: int = 10
    """Checks between validation passes (the last check always validates)."""
    seed: int = 3141592
    """Seeds weights, dropout and data order (the study's seed)."""
    jit_compile: bool = False
    """Compile the fused training call with XLA."""

    def __post_init__(self):
        object.__setattr__(self, "optimizer", canonical_name(self.optimizer))
        _positive("train.lr", self.lr)
        _require(isinstance(self.optimizer_args, dict), "train.optimizer_args must be a mapping")
        _positive("train.batch_size", self.batch_size, int)
        _positive("train.steps_per_check", self.steps_per_check, int)
        _require(isinstance(self.target, (int, float)) and 0 < self.target <= 1,
                 f"train.target must be in (0, 1], got {self.target!r}")
        _require(self.target_metric in TARGET_METRICS,
                 f"train.target_metric must be one of {', '.join(TARGET_METRICS)}, got {self.target_metric!r}")
        _positive("train.max_steps", self.max_steps, int, allow_none=True)
        _positive("train.max_seconds", self.max_seconds, allow_none=True)
        _positive("train.divergence_loss", self.divergence_loss, allow_none=True)
        _positive("train.val_every", self.val_every, int)
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
                 f"train.seed must be a non-negative integer, got {self.seed!r}")
