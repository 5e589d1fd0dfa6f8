"""Typed configuration: defaults live here once, each field with a one-line docstring.

Every dataclass validates itself on construction (and on ``dataclasses.replace``), so a bad
value fails with one clear line before any work starts. ``load_config`` layers a YAML file
(listing only what differs) and ``--set key=value`` overrides on top of the defaults.
"""

from __future__ import annotations

import argparse
import difflib
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from pbt_lab import UserError

TARGET_METRICS = ("train_acc", "val_acc")
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
    stop_on_divergence: bool = True
    """End a diverging run at once; false lets it run on to its budget (the benchmark's baseline)."""
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


@dataclass(frozen=True)
class DataConfig:
    """Where MNIST comes from (DESIGN §6)."""

    source: str | None = None
    """A Keras-layout mnist.npz path, 'bundled' (the offline subset), or null: $PBT_LAB_DATA, then Keras's cache."""


@dataclass(frozen=True)
class ResourcesConfig:
    """What each trial holds while it runs."""

    cpu: float = 1.0
    """CPUs per trial; TensorFlow's thread pools are sized to match."""
    gpu: float = 0.0
    """GPUs per trial; a fraction (e.g. 0.25) shares one card between trials."""
    max_concurrent: int | None = None
    """Most trials at once; null: as many as the cluster's free resources allow."""

    @property
    def threads(self) -> int:
        """TensorFlow threads per trial: its whole CPUs, at least one."""
        return max(1, int(self.cpu))

    def __post_init__(self):
        _positive("resources.cpu", self.cpu)
        _require(isinstance(self.gpu, (int, float)) and 0 <= self.gpu, f"resources.gpu must be ≥ 0, got {self.gpu!r}")
        _positive("resources.max_concurrent", self.max_concurrent, int, allow_none=True)


@dataclass(frozen=True)
class TuneRunConfig:
    """How Ray Tune runs and keeps the trials."""

    checkpoint_every: int = 0
    """Checks between checkpoints (0: none; an interrupted trial then restarts from scratch)."""
    keep_checkpoints: int | None = 4
    """Checkpoints kept per trial (null: all); PBT ignores it and keeps what exploits can still need."""
    max_failures: int = 0
    """Times a trial whose worker died is restarted from its last checkpoint."""

    def __post_init__(self):
        _require(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
                 f"run.checkpoint_every must be a non-negative integer, got {self.checkpoint_every!r}")
        _positive("run.keep_checkpoints", self.keep_checkpoints, int, allow_none=True)
        _require(isinstance(self.max_failures, int) and self.max_failures >= -1,
                 f"run.max_failures must be an integer ≥ -1 (-1: forever), got {self.max_failures!r}")


def quantile_size(fraction: float, ranked: int) -> int:
    """Members replaced (and donors) at a PBT decision ranking ``ranked``: max(1, floor(fraction × ranked))."""
    return max(1, math.floor(fraction * ranked + 1e-9))  # 0.2 × 15 is 3.0000000000000004 in floats


def study_learning_rates() -> list[float]:
    """The study's 48 rates: 10^(k/6) for k = -36…12, k ≠ 0 (1e-6 to 100, 1/6 decade apart)."""
    return [10 ** (k / 6) for k in range(-36, 13) if k != 0]


@dataclass(frozen=True)
class GridConfig:
    """The exhaustive optimizer × learning rate (× seed) grid."""

    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZER_NAMES))
    """Optimizers to try (all six by default)."""
    lrs: list[float] = field(default_factory=study_learning_rates)
    """Learning rates to try with every optimizer (default: the study's 48)."""
    seeds: list[int] = field(default_factory=lambda: [TrainConfig.seed])
    """Seeds: each optimizer × rate runs once per seed."""

    def __post_init__(self):
        _require(bool(self.optimizers), "grid.optimizers must name at least one optimizer")
        object.__setattr__(self, "optimizers", [canonical_name(o) for o in self.optimizers])
        _require(bool(self.lrs), "grid.lrs must list at least one learning rate")
        for lr in self.lrs:
            _positive("grid.lrs", lr)
        _require(bool(self.seeds) and all(isinstance(s, int) and s >= 0 for s in self.seeds),
                 f"grid.seeds must be non-negative integers, got {self.seeds!r}")


@dataclass(frozen=True)
class Experiment:
    """What every experiment has: data, model, training, per-trial resources, Tune's run settings."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: TuneRunConfig = field(default_factory=TuneRunConfig)


@dataclass(frozen=True)
class GridExperiment(Experiment):
    """``python -m pbt_lab.grid``: every optimizer × rate trained to the target or a budget."""

    grid: GridConfig = field(default_factory=GridConfig)


# Per-optimizer learning-rate ranges for PBT: the floor of each optimizer's valley in the study
# and in our grid runs, about a decade either side. Mutations stay inside them.
DEFAULT_LR_RANGES = {
    "gd": [1e-2, 1.0], "momentum": [1e-2, 1.0], "adam": [1e-4, 1e-2],
    "adagrad": [1e-2, 1.0], "adadelta": [1.0, 100.0], "rmsprop": [1e-4, 1e-2],
}


@dataclass(frozen=True)
class PBTConfig:
    """Population-based training (Ray Tune's PopulationBasedTraining)."""

    population: int = 20
    """Members (initial optimizer × log-uniform rate drawn from ``seed``); 5, 10, 15, 20 make 20 % exact."""
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZER_NAMES))
    """Optimizers members start with and may switch to."""
    lr_ranges: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_LR_RANGES.items()})
    """Per optimizer [low, high]: initial rates are drawn and mutations kept inside it."""
    metric: str = "val_acc"
    """What ranks members at each perturbation: val_acc or train_acc."""
    perturbation_interval: int = 4
    """Checks between perturbations (each member checkpoints at each)."""
    burn_in_period: int = 0
    """Checks before a member's first perturbation: a multiple of the interval."""
    quantile_fraction: float = 0.2
    """At each decision the bottom max(1, floor(fraction × ranked)) copy one of as many top members."""
    perturbation_factors: list[float] = field(default_factory=lambda: [0.8, 1.2])
    """A copied learning rate is multiplied by one of these (by 1/f where × f would leave its range)..."""
    resample_probability: float = 0.25
    """...or, with this probability, drawn log-uniform from its optimizer's range."""
    optimizer_switch_probability: float = 0.2
    """Probability that an exploit also switches to another optimizer (resampled, never 'the neighbour')."""
    stop_at_target: bool = False
    """End the run when a member reaches train.target: that member wins, the others are stopped."""
    synch: bool = False
    """Synchronous PBT: every member waits at each interval, then all are ranked at once."""
    seed: int = 0
    """Seeds the initial population and every choice PBT makes (ties, donors, explore)."""

    def __post_init__(self):
        _require(isinstance(self.population, int) and self.population >= 2,
                 f"pbt.population must be an integer ≥ 2, got {self.population!r}")
        _require(bool(self.optimizers), "pbt.optimizers must name at least one optimizer")
        object.__setattr__(self, "optimizers", [canonical_name(o) for o in self.optimizers])
        # Listed ranges override the defaults one optimizer at a time.
        ranges = {**DEFAULT_LR_RANGES, **{canonical_name(k): v for k, v in self.lr_ranges.items()}}
        for name, r in ranges.items():
            r = _coerce(r, list[float], f"pbt.lr_ranges.{name}")
            _require(len(r) == 2 and 0 < r[0] < r[1], f"pbt.lr_ranges.{name} must be [low, high] with 0 < low < high, got {r!r}")
            ranges[name] = r
        object.__setattr__(self, "lr_ranges", ranges)
        _require(self.metric in TARGET_METRICS, f"pbt.metric must be one of {', '.join(TARGET_METRICS)}, got {self.metric!r}")
        _positive("pbt.perturbation_interval", self.perturbation_interval, int)
        _require(isinstance(self.burn_in_period, int) and self.burn_in_period >= 0,
                 f"pbt.burn_in_period must be a non-negative integer, got {self.burn_in_period!r}")
        _require(isinstance(self.quantile_fraction, (int, float)) and 0 < self.quantile_fraction <= 0.5,
                 f"pbt.quantile_fraction must be in (0, 0.5], got {self.quantile_fraction!r}")
        _require(self.burn_in_period % self.perturbation_interval == 0,
                 f"pbt.burn_in_period must be a multiple of pbt.perturbation_interval ({self.perturbation_interval}): "
                 f"members checkpoint and are ranked at multiples of it, got {self.burn_in_period!r}")
        factors = _coerce(self.perturbation_factors, list[float], "pbt.perturbation_factors")
        _require(bool(factors) and all(f > 0 and f != 1 for f in factors),
                 f"pbt.perturbation_factors must be positive numbers other than 1, got {self.perturbation_factors!r}")
        object.__setattr__(self, "perturbation_factors", factors)
        # A step reflected at a bound (× 1/f) must land inside: each range spans at least f².
        widest = max(max(factors), 1 / min(factors)) ** 2
        for name in self.optimizers:
            low, high = ranges[name]
            _require(high / low >= widest * (1 - 1e-9), f"pbt.lr_ranges.{name} = [{low:g}, {high:g}] is narrower than "
                     f"{widest:.3g}× (the largest perturbation factor, squared): widen it or lower the factors")
        for name in ("resample_probability", "optimizer_switch_probability"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"pbt.{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class PBTExperiment(Experiment):
    """``python -m pbt_lab.pbt``: a population trained under PBT."""

    pbt: PBTConfig = field(default_factory=PBTConfig)


def study_rates_between(low: float, high: float) -> list[float]:
    """The study's rates (1/6 decade apart) from ``low`` to ``high``, both included."""
    return [lr for lr in study_learning_rates() if low * (1 - 1e-9) <= lr <= high * (1 + 1e-9)]


def _rates_by_optimizer(name: str, value: dict) -> dict:
    """{optimizer: [rates]} with canonical names and positive rates, or one line saying what is wrong."""
    _require(isinstance(value, dict) and bool(value), f"{name} must map optimizers to lists of rates, got {value!r}")
    out = {}
    for optimizer, lrs in value.items():
        lrs = _coerce(lrs, list[float], f"{name}.{optimizer}")
        _require(bool(lrs), f"{name}.{optimizer} must list at least one learning rate")
        for lr in lrs:
            _positive(f"{name}.{optimizer}", lr)
        out[canonical_name(optimizer)] = lrs
    return out


SCALING_MODES = ("fixed", "resweep")


@dataclass(frozen=True)
class ScalingConfig:
    """The width study: the network widened step by step, learning rates trained at every width."""

    widths: list[float] = field(default_factory=lambda: [float(w) for w in range(1, 11)])
    """Width multipliers of model.scale (model.scale is 1×): the study's 1×…10×."""
    mode: str = "fixed"
    """fixed: the rates in ``lrs`` at every width (the study); resweep: the rate grid ``sweep_lrs`` at every width."""
    lrs: dict = field(default_factory=lambda: {"adam": study_rates_between(3e-4, 3.2e-3)})
    """Fixed mode: {optimizer: [rates]} (default Adam at the study's rates around its best, 3.2e-4 to 3.2e-3)."""
    sweep_lrs: dict = field(default_factory=lambda: {"adam": study_rates_between(1e-4, 1e-2)})
    """Re-sweep mode: {optimizer: [rates]} re-run at every width (default Adam, the study's rates 1e-4 to 1e-2)."""

    def __post_init__(self):
        widths = _coerce(self.widths, list[float], "scaling.widths")
        _require(bool(widths), "scaling.widths must list at least one width multiplier")
        for w in widths:
            _positive("scaling.widths", w)
        _require(len(set(widths)) == len(widths), f"scaling.widths must not repeat a width, got {widths!r}")
        object.__setattr__(self, "widths", widths)
        _require(self.mode in SCALING_MODES, f"scaling.mode must be one of {', '.join(SCALING_MODES)}, got {self.mode!r}")
        object.__setattr__(self, "lrs", _rates_by_optimizer("scaling.lrs", self.lrs))
        object.__setattr__(self, "sweep_lrs", _rates_by_optimizer("scaling.sweep_lrs", self.sweep_lrs))

    def rates(self) -> dict:
        """{optimizer: [rates]} this mode trains at every width."""
        return self.lrs if self.mode == "fixed" else self.sweep_lrs


@dataclass(frozen=True)
class ScalingExperiment(Experiment):
    """``python -m pbt_lab.scaling``: steps and seconds to the target as the network widens."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(target=0.96))
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


# The best rate per optimizer from our grid-cpu run (README): the trace's default when no grid is given.
# GD reached no 97 % there; 0.1 is its best in the quick grid (0.464, Momentum's best step, left it at chance).
GRID_CPU_BEST_LRS = {"gd": 0.1, "momentum": 0.215, "adam": 0.00215, "adagrad": 0.1, "adadelta": 14.7,
                     "rmsprop": 0.00464}


@dataclass(frozen=True)
class TraceConfig:
    """Each optimizer trained at its best rate, validating often: the study's trace figure."""

    lrs: dict = field(default_factory=lambda: dict(GRID_CPU_BEST_LRS))
    """{optimizer: rate}; ``--grid RUN_DIR`` replaces it with that grid's best rate per optimizer."""

    def __post_init__(self):
        _require(isinstance(self.lrs, dict) and bool(self.lrs), f"trace.lrs must map optimizers to a rate, got {self.lrs!r}")
        rates = {}
        for optimizer, lr in self.lrs.items():
            _positive(f"trace.lrs.{optimizer}", lr)
            rates[canonical_name(optimizer)] = float(lr)
        object.__setattr__(self, "lrs", rates)


@dataclass(frozen=True)
class TraceExperiment(Experiment):
    """``python -m pbt_lab.trace``: validation accuracy over time and steps, one trial per optimizer."""

    # Curves, not times to target: every trial trains its whole budget and validates at every check.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(stop_at_target=False, val_every=1))
    trace: TraceConfig = field(default_factory=TraceConfig)


# --- YAML and --set ------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None):
    """``cls`` built from its defaults, then ``base`` (e.g. a run's recorded config), then the YAML
    file at ``path``, then ``key=value`` overrides."""
    values: dict = _merge(base or {}, read_yaml(path) if path else {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        _require(bool(sep and key), f"--set expects key=value, got {item!r}")
        node = values
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            _require(isinstance(node, dict), f"--set {key}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            node[leaf] = raw
    return build(cls, values)


def _merge(low: dict, high: dict) -> dict:
    out = dict(low)
    for key, value in high.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is written twice", key_node.start_mark)
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
    _require(isinstance(values, dict), f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
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
            _require(isinstance(value, dict), f"{prefix}{name} must be a section of keys, got {value!r}")
            kwargs[name] = build(kind, {**_experiment_defaults(cls, name), **value}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _experiment_defaults(cls: type, name: str) -> dict:
    """Where an experiment's default section differs from the section's class defaults (the width
    study's 96 % target): those values, so a YAML or --set section that omits them keeps them."""
    f = next(f for f in fields(cls) if f.name == name)
    if f.default_factory is MISSING:
        return {}
    default = f.default_factory()
    plain = type(default)()
    return {k.name: getattr(default, k.name) for k in fields(default) if getattr(default, k.name) != getattr(plain, k.name)}


def _coerce(value, kind, name: str):
    """``value`` as type ``kind`` (float, int, bool, str, list[...], dict, or X | None)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), name)
    if origin is list:
        _require(isinstance(value, list), f"{name} must be a list, got {value!r}")
        return [_coerce(v, args[0], name) for v in value]
    if kind is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number, got {value!r}")
        return float(value)
    if kind is int:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        return value
    expected = {bool: "true or false", str: "a string", dict: "a mapping"}[kind]
    _require(isinstance(value, kind), f"{name} must be {expected}, got {value!r}")
    return value
