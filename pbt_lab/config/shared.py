"""The configs every experiment shares: model, training, data, resources, Tune's run settings.

Defaults live here once, each field with a one-line docstring; every dataclass validates itself
on construction (and on ``dataclasses.replace``), so a bad value fails with one clear line before
any work starts. ``loading.load_config`` layers a YAML file (listing only what differs) and ``--set
key=value`` overrides on top of the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pbt_lab.config.checks import TARGET_METRICS, canonical_name, positive, require
from pbt_lab.names import OPTIMIZER, TRAIN_ACC

STUDY_CNN = "pbt_lab.training.model:build_cnn"  # the default builder (config never imports Keras)


@dataclass(frozen=True)
class ModelConfig:
    """The network: a builder function and its settings (pbt_lab/training/model.py)."""

    builder: str = STUDY_CNN
    """'package.module:function' or 'path/to/file.py:function' taking (input_shape, num_classes, scale,
    **options) and returning an uncompiled keras.Model with one logit per class (default: the study's CNN)."""
    scale: float = 1.0
    """Width factor passed to the builder (the study's CNN multiplies its conv filters, 32 and 64)."""
    options: dict = field(default_factory=dict)
    """Keyword arguments for the builder, e.g. the study CNN's {dense_units: 512, scale_dense: true}."""

    def __post_init__(self):
        where, _, name = str(self.builder).rpartition(":")
        require(
            isinstance(self.builder, str) and bool(where) and bool(name),
            f"model.builder must be 'module:function' or 'path/to/file.py:function', got {self.builder!r}",
        )
        positive("model.scale", self.scale)
        require(isinstance(self.options, dict), f"model.options must be a mapping, got {self.options!r}")


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
    """Images per training step (PBT may change it: steps and budgets stay in optimizer steps)."""
    weight_decay: float = 0.0
    """Decoupled weight decay: each step first shrinks every weight by lr × weight_decay of itself."""
    momentum: float | None = None
    """The momentum optimizer's momentum (null: its TF1 default 0.5, or optimizer_args')."""
    beta_1: float | None = None
    """Adam's β₁ (null: 0.9, or optimizer_args')."""
    beta_2: float | None = None
    """Adam's β₂ (null: 0.999, or optimizer_args')."""
    label_smoothing: float = 0.0
    """The loss's label smoothing: targets (1 − s) one-hot + s / K."""
    clip_norm: float | None = None
    """Gradients scaled down to this global norm when above it (null: no clipping)."""
    steps_per_check: int = 50
    """Training steps fused into one call; metrics, target and budgets are checked between calls."""
    target: float = 0.97
    """Accuracy that counts as trained (the study's 97 % is MNIST's: set your own data's)."""
    target_metric: str = TRAIN_ACC
    """train_acc (the study: accuracy over the last check's batches) or val_acc."""
    stop_at_target: bool = True
    """End the run when the target is reached (the study's criterion)."""
    max_steps: int | None = None
    """Step budget; None for no step cap."""
    max_seconds: float | None = 120.0
    """Budget in pure training seconds (the study's 120 s cap); None for no cap."""
    divergence_loss: float | None = 1e3
    """A training loss above this (chance is ln K: 2.3 for 10 classes), or a non-finite one: diverged."""
    stop_on_divergence: bool = True
    """End a diverging run at once; false lets it run on to its budget (the benchmark's baseline)."""
    stall_checks: int | None = None
    """End a run as stalled after this many checks in a row whose training loss stayed within
    ``stall_tolerance`` of chance (ln K for K classes): it neither learns nor diverges; null: never."""
    stall_tolerance: float = 0.05
    """How far below chance (in nats) a check's mean training loss must be to count as learning."""
    val_every: int = 10
    """Checks between validation passes (the last check always validates)."""
    rank_examples: int | None = None
    """Validate on this many examples of the validation split (one seeded subset, the same for every
    run) at every check but the last, which validates the whole split; null: the whole split always.
    PBT's ranking is these validations (``pbt.rank_examples``)."""
    seed: int = 3141592
    """Seeds weights, dropout and data order (the study's seed)."""
    jit_compile: bool = False
    """Compile the fused training call with XLA."""

    def __post_init__(self):
        object.__setattr__(self, OPTIMIZER, canonical_name(self.optimizer))
        positive("train.lr", self.lr)
        require(isinstance(self.optimizer_args, dict), "train.optimizer_args must be a mapping")
        positive("train.batch_size", self.batch_size, int)
        for name in ("weight_decay", "label_smoothing", "momentum", "beta_1", "beta_2"):
            value = getattr(self, name)
            require(
                value is None
                or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1),
                f"train.{name} must be in [0, 1), got {value!r}",
            )
        positive("train.clip_norm", self.clip_norm, allow_none=True)
        positive("train.steps_per_check", self.steps_per_check, int)
        require(
            isinstance(self.target, (int, float)) and 0 < self.target <= 1,
            f"train.target must be in (0, 1], got {self.target!r}",
        )
        require(
            self.target_metric in TARGET_METRICS,
            f"train.target_metric must be one of {', '.join(TARGET_METRICS)}, got {self.target_metric!r}",
        )
        positive("train.max_steps", self.max_steps, int, allow_none=True)
        positive("train.max_seconds", self.max_seconds, allow_none=True)
        positive("train.divergence_loss", self.divergence_loss, allow_none=True)
        positive("train.val_every", self.val_every, int)
        positive("train.rank_examples", self.rank_examples, int, allow_none=True)
        positive("train.stall_checks", self.stall_checks, int, allow_none=True)
        positive("train.stall_tolerance", self.stall_tolerance)
        require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
            f"train.seed must be a non-negative integer, got {self.seed!r}",
        )

    @property
    def most_checks(self) -> int:
        """The most checks a run reports: its step budget's, else (a seconds budget only) one per second
        of it, which checks on a fast machine and a small model can outrun."""
        if self.max_steps:
            return math.ceil(self.max_steps / self.steps_per_check)
        return math.ceil(self.max_seconds or 0) or 1


@dataclass(frozen=True)
class DataConfig:
    """The image set (DESIGN §6, pbt_lab/training/data.py)."""

    source: str | None = None
    """A Keras-layout .npz path; mnist, fashion_mnist or cifar10 (Keras's downloaders); 'bundled' (the
    offline MNIST subset); or null: $PBT_LAB_DATA, then Keras's MNIST."""
    num_classes: int | None = None
    """Classes K: labels must lie in 0..K−1 (null: the largest label + 1)."""

    def __post_init__(self):
        positive("data.num_classes", self.num_classes, int, allow_none=True)


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
        positive("resources.cpu", self.cpu)
        require(
            isinstance(self.gpu, (int, float)) and self.gpu >= 0,
            f"resources.gpu must be ≥ 0, got {self.gpu!r}",
        )
        positive("resources.max_concurrent", self.max_concurrent, int, allow_none=True)


@dataclass(frozen=True)
class TuneRunConfig:
    """How Ray Tune runs and keeps the trials."""

    checkpoint_every: int = 0
    """Checks between checkpoints (0: none; an interrupted trial then restarts from scratch)."""
    keep_checkpoints: int | None = 4
    """Checkpoints kept per trial (null: all); PBT ignores it and keeps what exploits can still need."""
    max_failures: int = 0
    """Failures after which a trial whose worker died is still restarted from its last checkpoint (a
    member on a lost node may count two: Ray counts each of its calls that failed)."""
    allow_unverified: bool = False
    """Let restores the audit cannot verify (their saver reported no digests) and exploits decided but
    never carried out pass instead of failing the run; the summary records that it was used."""

    def __post_init__(self):
        require(
            isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
            f"run.checkpoint_every must be a non-negative integer, got {self.checkpoint_every!r}",
        )
        positive("run.keep_checkpoints", self.keep_checkpoints, int, allow_none=True)
        require(
            isinstance(self.max_failures, int) and self.max_failures >= -1,
            f"run.max_failures must be an integer ≥ -1 (-1: forever), got {self.max_failures!r}",
        )
        require(
            isinstance(self.allow_unverified, bool),
            f"run.allow_unverified must be true or false, got {self.allow_unverified!r}",
        )


@dataclass(frozen=True)
class Experiment:
    """What every experiment has: data, model, training, per-trial resources, Tune's run settings."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: TuneRunConfig = field(default_factory=TuneRunConfig)

    @property
    def optimizers(self) -> set[str]:
        """The optimizers this experiment trains (``train.optimizer_args`` is checked against each)."""
        return {self.train.optimizer}
