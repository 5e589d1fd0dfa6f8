"""The search space: the hyperparameters a search sets and PBT mutates, each with its kind.

    pbt:
      space:
        weight_decay: {log: [1.0e-6, 1.0e-3]}              # a range, explored × 0.8 / × 1.2
        model.options.dropout: {linear: [0.1, 0.6]}
        batch_size: {log_int: [32, 256]}                   # an int range (log or linear: int)
        label_smoothing: {ordered: [0.0, 0.05, 0.1]}       # a choice that moves to a neighbour
        optimizer: {choice: [adam, momentum], resample_probability: 0.3}
        lr: {log: {adam: [1.0e-4, 1.0e-2], momentum: [1.0e-2, 1.0]}}   # a range per optimizer

Each key may set its own ``factors`` and ``resample_probability``. The study's space (``pbt.optimizers``
× each one's ``pbt.lr_ranges``) is the default; ``pbt.space`` adds keys or replaces those two.
Keys: the searchable ``train`` settings (``SEARCHABLE``) and any ``model.options.*`` (a builder
option: it must change no weight's shape, checked before the run starts). Plain data: no Ray, no
TensorFlow (``tuning/explore.py`` draws from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pbt_lab.config.checks import OPTIMIZER_NAMES, canonical_name, coerce, require
from pbt_lab.names import BATCH_SIZE, LR, MODEL_OPTIONS, OPTIMIZER, RECIPE, SCHEDULE_TAG

LOG, LINEAR, INT, LOG_INT, CHOICE, ORDERED = "log", "linear", "int", "log_int", "choice", "ordered"
RANGES, INTS, CHOICES = (LOG, LINEAR), (INT, LOG_INT), (CHOICE, ORDERED)
KINDS = (*RANGES, *INTS, *CHOICES)

# Where each acts (the trainer): in flight (a variable its traced step reads), retraced, or rebuilt.
IN_FLIGHT = (LR, "weight_decay", "momentum", "beta_1", "beta_2", "label_smoothing", "clip_norm")
SEARCHABLE = (OPTIMIZER, *IN_FLIGHT, BATCH_SIZE)
INT_KEYS = (BATCH_SIZE,)
# Per optimizer: the in-flight optimizer arguments it reads (others leave it unchanged).
OPTIMIZER_ARGS = {"momentum": ("momentum",), "adam": ("beta_1", "beta_2")}
IN_FLIGHT_OPTIMIZER_ARGS = ("momentum", "beta_1", "beta_2")
UNIT_KEYS = ("momentum", "beta_1", "beta_2", "label_smoothing")  # fractions: [0, 1)


@dataclass(frozen=True)
class Hyperparameter:
    """One searched key: its kind, bounds or values, and how PBT explores it."""

    key: str
    """A trial config path: ``lr``, ``batch_size``, ``model.options.dropout``."""
    kind: str
    """log, linear (ranges), int, log_int (int ranges), choice, ordered (choices)."""
    bounds: tuple = ()
    """[low, high] of a range; empty where ``bounds_by`` holds them."""
    bounds_by: tuple = ()
    """((optimizer, (low, high)), …): a range that depends on the optimizer (the study's rates)."""
    values: tuple = ()
    """A choice's values (in their order, for ordered)."""
    factors: tuple = (0.8, 1.2)
    resample_probability: float = 0.25

    def range_for(self, optimizer: str | None) -> tuple[float, float]:
        return dict(self.bounds_by)[optimizer] if self.bounds_by else self.bounds

    @property
    def ranges(self) -> list[tuple[float, float]]:
        return [b for _, b in self.bounds_by] if self.bounds_by else [self.bounds]

    @property
    def continuous(self) -> bool:
        """A real-valued range (PB2 searches these)."""
        return self.kind in RANGES

    def scalar(self, value) -> float:
        """``value`` as one number for a chart (TensorBoard's schedules): a choice's place in its list."""
        return float(self.values.index(value)) if self.values else float(value)


@dataclass(frozen=True)
class Space:
    """The searched keys, the optimizer first (a rate's range depends on it)."""

    params: tuple[Hyperparameter, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def __getitem__(self, key: str) -> Hyperparameter:
        return next(p for p in self.params if p.key == key)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def scalars(self, recipe: dict) -> dict[str, float]:
        """A recipe's searched values as charted numbers, ``{schedule/KEY: value}`` (TensorBoard's tags;
        a choice's value is its place in the list, which ``legend`` names)."""
        return {
            f"{SCHEDULE_TAG}/{key}": self[key].scalar(value)
            for key, value in recipe.items()
            if key in self
            and value is not None
            and value == value  # (not NaN)
            and (not self[key].values or value in self[key].values)  # (a value from outside the space)
        }

    def legend(self) -> str:
        """What a choice's numbers mean: ``optimizer: 0 adam, 1 rmsprop``, a paragraph per choice key."""
        return "\n\n".join(
            f"{h.key}: " + ", ".join(f"{i} {v}" for i, v in enumerate(h.values))
            for h in self.params
            if h.values
        )


def get_path(config: dict, key: str):
    """``config``'s value at a dotted ``key`` (``model.options.dropout``); None where absent."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def set_path(config: dict, key: str, value) -> dict:
    """A copy of ``config`` with ``value`` at the dotted ``key`` (the dicts on the way copied)."""
    head, _, rest = key.partition(".")
    out = dict(config)
    out[head] = set_path(out.get(head) or {}, rest, value) if rest else value
    return out


def nested(flat: dict) -> dict:
    """``{"model.options.dropout": 0.3}`` as ``{"model": {"options": {"dropout": 0.3}}}`` (Ray's form)."""
    out: dict = {}
    for key, value in flat.items():
        out = set_path(out, key, value)
    return out


def _number(value, name: str) -> float:
    return coerce(value, float, name)


def _bounds(value, kind: str, name: str) -> tuple:
    pair = coerce(value, list[float], name)
    require(len(pair) == 2, f"{name} must be [low, high], got {value!r}")
    low, high = pair
    require(low < high, f"{name} = [{low:g}, {high:g}] is empty: low must be below high")
    if kind in (LOG, LOG_INT):
        require(low > 0, f"{name} = [{low:g}, {high:g}]: a log range must be of positive values")
    require(low >= 0, f"{name} = [{low:g}, {high:g}]: ranges are of values ≥ 0 (they move by factors)")
    if kind in INTS:
        require(
            float(low).is_integer() and float(high).is_integer(),
            f"{name} = [{low:g}, {high:g}]: an int range must have integer bounds",
        )
        return int(low), int(high)
    return float(low), float(high)


def hyperparameter(key: str, spec, factors: tuple, resample_probability: float) -> Hyperparameter:
    """One ``pbt.space`` entry, checked: one line naming the key for anything wrong."""
    name = f"pbt.space.{key}"
    require(
        key in SEARCHABLE or (key.startswith(f"{MODEL_OPTIONS}.") and len(key) > len(MODEL_OPTIONS) + 1),
        f"{name}: unknown key: one of {', '.join(SEARCHABLE)} or model.options.NAME (a builder option)",
    )
    require(isinstance(spec, dict), f"{name} must be a mapping such as {{log: [low, high]}}, got {spec!r}")
    kinds = [k for k in spec if k in KINDS]
    require(len(kinds) == 1, f"{name} must have one kind of {', '.join(KINDS)}, got {sorted(spec)}")
    kind = kinds[0]
    unknown = set(spec) - {kind, "factors", "resample_probability"}
    require(
        not unknown, f"{name}: unknown setting {sorted(unknown or [''])[0]!r} (factors, resample_probability)"
    )
    factors = tuple(coerce(spec.get("factors", list(factors)), list[float], f"{name}.factors"))
    require(
        bool(factors) and all(f > 0 and f != 1 for f in factors),
        f"{name}.factors must be positive numbers other than 1, got {list(factors)!r}",
    )
    p = _number(spec.get("resample_probability", resample_probability), f"{name}.resample_probability")
    require(0 <= p <= 1, f"{name}.resample_probability must be in [0, 1], got {p!r}")
    value = spec[kind]
    if key == OPTIMIZER:
        require(kind == CHOICE, f"{name} must be a choice of optimizers ({', '.join(OPTIMIZER_NAMES)})")
    elif key in INT_KEYS:
        require(kind in (*INTS, *CHOICES), f"{name} must be an int range or a choice (it is an integer)")
    if kind in CHOICES:
        require(isinstance(value, list), f"{name}.{kind} must list the values, got {value!r}")
        values = [canonical_name(v) for v in value] if key == OPTIMIZER else value
        require(len({repr(v) for v in values}) == len(values), f"{name}.{kind} repeats a value: {value!r}")
        if key in INT_KEYS:
            require(
                all(isinstance(v, int) and v > 0 for v in values), f"{name}.{kind} must be positive integers"
            )
        out = Hyperparameter(key, kind, values=tuple(values), factors=factors, resample_probability=p)
        check_moves(out, f"{name}.{kind}")
        return out
    if isinstance(value, dict):  # a range per optimizer
        require(key == LR, f"{name}.{kind}: only lr's range may depend on the optimizer")
        by = tuple((canonical_name(o), _bounds(b, kind, f"{name}.{kind}.{o}")) for o, b in value.items())
        require(bool(by), f"{name}.{kind} names no optimizer")
        out = Hyperparameter(key, kind, bounds_by=by, factors=factors, resample_probability=p)
    else:
        out = Hyperparameter(
            key, kind, _bounds(value, kind, f"{name}.{kind}"), factors=factors, resample_probability=p
        )
    if key in UNIT_KEYS:
        require(all(high < 1 for _, high in out.ranges), f"{name}: {key} must stay below 1")
    check_moves(out, name)
    return out


def check_moves(h: Hyperparameter, name: str) -> None:
    """One line where PBT could not move ``h``: a choice of one value, an empty range, a range that a step
    reflected at its bound (× 1/f) would leave (each range must span the largest factor squared)."""
    if h.kind in CHOICES:
        require(len(h.values) >= 2, f"{name} is a choice of {len(h.values)} value: list at least two")
        return
    widest = max(max(h.factors), 1 / min(h.factors)) ** 2
    for low, high in h.ranges:
        require(low < high, f"{name} = [{low:g}, {high:g}] is empty: low must be below high")
        require(
            h.kind in INTS or low == 0 or high / low >= widest * (1 - 1e-9),
            f"{name} = [{low:g}, {high:g}] is narrower than the factors can move ({widest:.3g}×, the "
            f"largest factor squared): widen it or give the key smaller factors",
        )


def build_space(pbt, spec: dict) -> Space:
    """The space of a ``PBTConfig``: the study's optimizer (``pbt.optimizers``, switched with
    ``pbt.optimizer_switch_probability``) and a rate in its ``pbt.lr_ranges``, with ``spec``'s keys added
    or replacing them; checked as a whole. The optimizer comes first: a rate's range depends on it."""
    require(isinstance(spec, dict), f"pbt.space must map keys to kinds, got {spec!r}")
    factors, p = tuple(pbt.perturbation_factors), pbt.resample_probability
    given = {str(key): hyperparameter(str(key), entry, factors, p) for key, entry in spec.items()}
    optimizer = given.pop(OPTIMIZER, None) or Hyperparameter(
        OPTIMIZER,
        CHOICE,
        values=tuple(pbt.optimizers),
        factors=(),
        resample_probability=pbt.optimizer_switch_probability,
    )
    lr = given.pop(LR, None) or Hyperparameter(
        LR,
        LOG,
        bounds_by=tuple((o, tuple(pbt.lr_ranges[o])) for o in optimizer.values),
        factors=factors,
        resample_probability=p,
    )
    if lr.bounds_by:
        missing = [o for o in optimizer.values if o not in dict(lr.bounds_by)]
        require(not missing, f"pbt.space.lr has no range for {', '.join(missing)} (pbt.space.optimizer)")
    params = (optimizer, lr, *given.values())
    movable = [h for h in params if h.kind != CHOICE or (len(h.values) > 1 and h.resample_probability > 0)]
    require(bool(movable), "pbt.space: no key can change (every choice has resample_probability 0)")
    return Space(params)


def log_place(value: float, low: float, high: float) -> float:
    """Where ``value`` sits in [low, high] on a log scale: 0 at low, 1 at high (clamped)."""
    return min(max((math.log(value) - math.log(low)) / (math.log(high) - math.log(low)), 0.0), 1.0)


def segment_recipe(segment: dict) -> dict:
    """An ancestry segment's recipe; a run's from before the search space recorded the optimizer and
    rate only."""
    return segment.get(RECIPE) or {OPTIMIZER: segment[OPTIMIZER], LR: segment[LR]}
