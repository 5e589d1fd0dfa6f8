"""Each experiment's own config: the grid, PBT, the width study, the trace."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pbt_lab.config.checks import OPTIMIZER_NAMES, canonical_name, coerce, positive, require
from pbt_lab.config.shared import Experiment, TrainConfig
from pbt_lab.config.space import Space, build_space
from pbt_lab.names import TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS

RANKED_METRICS = (VAL_ACC, VAL_LOSS, TRAIN_ACC, TRAIN_LOSS)  # what a check reports, PBT may rank by


def quantile_size(fraction: float, ranked: int, population: int | None = None) -> int:
    """Members replaced (and donors) at a PBT decision ranking ``ranked`` fresh scores in a population
    of ``population`` (default: ``ranked``): floor(fraction × ranked), and at least one where the whole
    population is too small for the fraction to name anyone (fewer than 1 / fraction members)."""
    size = math.floor(fraction * ranked + 1e-9)  # 0.2 × 15 is 3.0000000000000004 in floats
    return size or int(math.floor(fraction * (population or ranked) + 1e-9) == 0)


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
        require(bool(self.optimizers), "grid.optimizers must name at least one optimizer")
        object.__setattr__(self, "optimizers", [canonical_name(o) for o in self.optimizers])
        require(bool(self.lrs), "grid.lrs must list at least one learning rate")
        for lr in self.lrs:
            positive("grid.lrs", lr)
        require(
            bool(self.seeds) and all(isinstance(s, int) and s >= 0 for s in self.seeds),
            f"grid.seeds must be non-negative integers, got {self.seeds!r}",
        )


GRID_STALL_CHECKS = 10  # the slowest recorded learner that reached the target left chance after 1 check


@dataclass(frozen=True)
class GridExperiment(Experiment):
    """``python -m pbt_lab.grid``: every optimizer × rate trained to the target or a budget."""

    # Most of a grid's rates cannot learn: a trial ten checks at chance stops (tests/test_stall.py).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(stall_checks=GRID_STALL_CHECKS))
    grid: GridConfig = field(default_factory=GridConfig)

    @property
    def optimizers(self) -> set[str]:
        return set(self.grid.optimizers)


# Per-optimizer learning-rate ranges for PBT: the floor of each optimizer's valley in the study
# and in our grid runs, about a decade either side. Mutations stay inside them.
DEFAULT_LR_RANGES = {
    "gd": [1e-2, 1.0],
    "momentum": [1e-2, 1.0],
    "adam": [1e-4, 1e-2],
    "adagrad": [1e-2, 1.0],
    "adadelta": [1.0, 100.0],
    "rmsprop": [1e-4, 1e-2],
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
    metric: str = VAL_ACC
    """What ranks members at each perturbation: val_acc, val_loss, train_acc or train_loss."""
    mode: str | None = None
    """max or min: whether a higher ``metric`` ranks higher (null: max for accuracies, min for losses)."""
    space: dict = field(default_factory=dict)
    """Searched keys beyond (or replacing) the study's optimizer and rate: config/space.py, e.g.
    {weight_decay: {log: [1.0e-6, 1.0e-3]}, batch_size: {log_int: [32, 256]}}."""
    perturbation_interval: int = 4
    """Checks between perturbations (each member checkpoints at each)."""
    rank_examples: int | None = None
    """Rank members on this many validation examples (one seeded subset, the same for all); the last
    validation of each member is of the whole split. Null: rank on the whole split. The summary states
    the ranking's standard error (``ranking``), the time breakdown its share (``validate``)."""
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
    max_checkpoints_per_member: int = 3
    """Checkpoints a member's directory holds at any moment, the one being written included (≥ 3: its
    latest, the one the experiment snapshot in storage names, and the next)."""

    def __post_init__(self):
        require(
            isinstance(self.max_checkpoints_per_member, int)
            and not isinstance(self.max_checkpoints_per_member, bool)
            and self.max_checkpoints_per_member >= 3,
            "pbt.max_checkpoints_per_member must be an integer ≥ 3 (a member's latest checkpoint, the one "
            f"a resume needs and the one being written), got {self.max_checkpoints_per_member!r}",
        )
        require(
            isinstance(self.population, int) and self.population >= 2,
            f"pbt.population must be an integer ≥ 2, got {self.population!r}",
        )
        require(bool(self.optimizers), "pbt.optimizers must name at least one optimizer")
        require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
            f"pbt.seed must be a non-negative integer, got {self.seed!r}",
        )
        object.__setattr__(self, "optimizers", [canonical_name(o) for o in self.optimizers])
        # Listed ranges override the defaults one optimizer at a time.
        ranges = {**DEFAULT_LR_RANGES, **{canonical_name(k): v for k, v in self.lr_ranges.items()}}
        for name, r in ranges.items():
            r = coerce(r, list[float], f"pbt.lr_ranges.{name}")
            require(
                len(r) == 2 and 0 < r[0] < r[1],
                f"pbt.lr_ranges.{name} must be [low, high] with 0 < low < high, got {r!r}",
            )
            ranges[name] = r
        object.__setattr__(self, "lr_ranges", ranges)
        require(
            self.metric in RANKED_METRICS,
            f"pbt.metric must be one of {', '.join(RANKED_METRICS)}, got {self.metric!r}",
        )
        mode = self.mode or ("min" if self.metric in (TRAIN_LOSS, VAL_LOSS) else "max")
        require(mode in ("max", "min"), f"pbt.mode must be max or min, got {self.mode!r}")
        object.__setattr__(self, "mode", mode)
        positive("pbt.perturbation_interval", self.perturbation_interval, int)
        require(
            isinstance(self.burn_in_period, int) and self.burn_in_period >= 0,
            f"pbt.burn_in_period must be a non-negative integer, got {self.burn_in_period!r}",
        )
        require(
            isinstance(self.quantile_fraction, (int, float)) and 0 < self.quantile_fraction <= 0.5,
            f"pbt.quantile_fraction must be in (0, 0.5], got {self.quantile_fraction!r}",
        )
        require(
            self.burn_in_period % self.perturbation_interval == 0,
            f"pbt.burn_in_period must be a multiple of pbt.perturbation_interval "
            f"({self.perturbation_interval}): "
            f"members checkpoint and are ranked at multiples of it, got {self.burn_in_period!r}",
        )
        factors = coerce(self.perturbation_factors, list[float], "pbt.perturbation_factors")
        require(
            bool(factors) and all(f > 0 and f != 1 for f in factors),
            "pbt.perturbation_factors must be positive numbers other than 1, "
            f"got {self.perturbation_factors!r}",
        )
        object.__setattr__(self, "perturbation_factors", factors)
        # A step reflected at a bound (× 1/f) must land inside: each range spans at least f².
        widest = max(max(factors), 1 / min(factors)) ** 2
        for name in self.optimizers:
            low, high = ranges[name]
            require(
                high / low >= widest * (1 - 1e-9),
                f"pbt.lr_ranges.{name} = [{low:g}, {high:g}] is narrower than "
                f"{widest:.3g}× (the largest perturbation factor, squared): widen it or lower the factors",
            )
        for name in ("resample_probability", "optimizer_switch_probability"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"pbt.{name} must be in [0, 1], got {value!r}")
        object.__setattr__(self, "_space", build_space(self, self.space))

    @property
    def search_space(self) -> Space:
        """The searched keys with their kinds: the study's optimizer and rate and ``space``'s."""
        return self._space


@dataclass(frozen=True)
class PBTExperiment(Experiment):
    """``python -m pbt_lab.pbt``: a population trained under PBT."""

    pbt: PBTConfig = field(default_factory=PBTConfig)

    @property
    def optimizers(self) -> set[str]:
        return set(self.pbt.optimizers)


def study_rates_between(low: float, high: float) -> list[float]:
    """The study's rates (1/6 decade apart) from ``low`` to ``high``, both included."""
    return [lr for lr in study_learning_rates() if low * (1 - 1e-9) <= lr <= high * (1 + 1e-9)]


def _rates_by_optimizer(name: str, value: dict) -> dict:
    """{optimizer: [rates]} with canonical names and positive rates, or one line saying what is wrong."""
    require(
        isinstance(value, dict) and bool(value),
        f"{name} must map optimizers to lists of rates, got {value!r}",
    )
    out = {}
    for optimizer, lrs in value.items():
        lrs = coerce(lrs, list[float], f"{name}.{optimizer}")
        require(bool(lrs), f"{name}.{optimizer} must list at least one learning rate")
        for lr in lrs:
            positive(f"{name}.{optimizer}", lr)
        out[canonical_name(optimizer)] = lrs
    return out


SCALING_MODES = ("fixed", "resweep")


@dataclass(frozen=True)
class ScalingConfig:
    """The width study: the network widened step by step, learning rates trained at every width."""

    widths: list[float] = field(default_factory=lambda: [float(w) for w in range(1, 11)])
    """Width multipliers of model.scale (model.scale is 1×): the study's 1×…10×."""
    mode: str = "fixed"
    """fixed: the rates ``lrs`` at every width (the study); resweep: the grid ``sweep_lrs`` at every width."""
    lrs: dict = field(default_factory=lambda: {"adam": study_rates_between(3e-4, 3.2e-3)})
    """Fixed mode: {optimizer: [rates]} (default Adam at the study's rates around its best, 3.2e-4–3.2e-3)."""
    sweep_lrs: dict = field(default_factory=lambda: {"adam": study_rates_between(1e-4, 1e-2)})
    """Re-sweep mode: {optimizer: [rates]} re-run at every width (default Adam at the study's 1e-4–1e-2)."""

    def __post_init__(self):
        widths = coerce(self.widths, list[float], "scaling.widths")
        require(bool(widths), "scaling.widths must list at least one width multiplier")
        for w in widths:
            positive("scaling.widths", w)
        require(len(set(widths)) == len(widths), f"scaling.widths must not repeat a width, got {widths!r}")
        object.__setattr__(self, "widths", widths)
        require(
            self.mode in SCALING_MODES,
            f"scaling.mode must be one of {', '.join(SCALING_MODES)}, got {self.mode!r}",
        )
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

    @property
    def optimizers(self) -> set[str]:
        return set(self.scaling.rates())


# The best rate per optimizer from our grid-cpu run (README): the trace's default when no grid is given.
# GD's is 0.1, in its band of 0.1–0.316 (550 steps) since grid-cpu's cap became 1,000 steps.
GRID_CPU_BEST_LRS = {
    "gd": 0.1,
    "momentum": 0.215,
    "adam": 0.00215,
    "adagrad": 0.1,
    "adadelta": 14.7,
    "rmsprop": 0.00464,
}


@dataclass(frozen=True)
class TraceConfig:
    """Each optimizer trained at its best rate, validating often: the study's trace figure."""

    lrs: dict = field(default_factory=lambda: dict(GRID_CPU_BEST_LRS))
    """{optimizer: rate}; ``--grid RUN_DIR`` replaces it with that grid's best rate per optimizer."""

    def __post_init__(self):
        require(
            isinstance(self.lrs, dict) and bool(self.lrs),
            f"trace.lrs must map optimizers to a rate, got {self.lrs!r}",
        )
        rates = {}
        for optimizer, lr in self.lrs.items():
            positive(f"trace.lrs.{optimizer}", lr)
            rates[canonical_name(optimizer)] = float(lr)
        object.__setattr__(self, "lrs", rates)


@dataclass(frozen=True)
class TraceExperiment(Experiment):
    """``python -m pbt_lab.trace``: validation accuracy over time and steps, one trial per optimizer."""

    # Curves, not times to target: every trial trains its whole budget and validates at every check.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(stop_at_target=False, val_every=1))
    trace: TraceConfig = field(default_factory=TraceConfig)

    @property
    def optimizers(self) -> set[str]:
        return set(self.trace.lrs)


COMPARE_METHODS = ("grid", "random", "asha", "pbt", "pb2")


@dataclass(frozen=True)
class CompareConfig:
    """Searchers side by side at equal compute: the budget is the grid's (optimizers × rates ×
    train.max_steps training steps), spent by every method at every seed."""

    methods: list[str] = field(default_factory=lambda: list(COMPARE_METHODS))
    """Which to run: grid, random (random optimizer, log-uniform rate in its pbt.lr_ranges), asha
    (random configs under Ray's ASHAScheduler), pbt (the lab's), pb2 (Ray's PB2 over the rate)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Each seed sets the data order, initial weights and the searcher's choices."""
    asha_grace_checks: int = 1
    """ASHA: checks every trial gets before its first cut."""
    asha_reduction_factor: int = 3
    """ASHA: one in this many trials goes on at each rung."""
    near_best: float = 0.002
    """'Reached the grid's best' means within this much validation accuracy of it (0.2 pt)."""

    def __post_init__(self):
        require(bool(self.methods), "compare.methods must name at least one method")
        for m in self.methods:
            require(
                m in COMPARE_METHODS, f"compare.methods: unknown {m!r} (one of {', '.join(COMPARE_METHODS)})"
            )
        require(len(set(self.methods)) == len(self.methods), "compare.methods must not repeat a method")
        require(
            bool(self.seeds) and all(isinstance(s, int) and s >= 0 for s in self.seeds),
            f"compare.seeds must be non-negative integers, got {self.seeds!r}",
        )
        require(len(set(self.seeds)) == len(self.seeds), "compare.seeds must not repeat a seed")
        positive("compare.asha_grace_checks", self.asha_grace_checks, int)
        require(
            isinstance(self.asha_reduction_factor, int) and self.asha_reduction_factor >= 2,
            f"compare.asha_reduction_factor must be an integer ≥ 2, got {self.asha_reduction_factor!r}",
        )
        require(0 <= self.near_best < 1, f"compare.near_best must be in [0, 1), got {self.near_best!r}")


@dataclass(frozen=True)
class CompareExperiment(Experiment):
    """``python -m pbt_lab.compare``: grid, random search, ASHA, PBT and PB2 at the grid's compute."""

    # Equal compute: every trial trains its whole budget (no stop at the target, none at divergence:
    # a diverged trial's steps count as spent) and validates at every check, for the curves.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            stop_at_target=False, stop_on_divergence=False, max_steps=300, max_seconds=None, val_every=1
        )
    )
    grid: GridConfig = field(default_factory=GridConfig)
    pbt: PBTConfig = field(default_factory=PBTConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    @property
    def optimizers(self) -> set[str]:
        searched = set(self.compare.methods) - {"grid"}  # random, ASHA, PBT and PB2 draw from pbt.optimizers
        return set(self.grid.optimizers) | (set(self.pbt.optimizers) if searched else set())

    @property
    def budget(self) -> int:
        """Training steps every method spends: the grid's (checked by ``experiments.compare.validate``)."""
        return len(self.grid.optimizers) * len(self.grid.lrs) * self.train.max_steps
