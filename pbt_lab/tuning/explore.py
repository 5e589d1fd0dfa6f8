"""PBT's choices as pure functions (no Ray, seeded): who is replaced and who donates (``truncate``),
the new hyperparameters drawn from a donor's (``explore``, by each key's kind in the search space) and
a population's starting points (``sample``). Unit-tested on hand-made inputs.
"""

from __future__ import annotations

import math

import numpy as np

from pbt_lab.config import quantile_size
from pbt_lab.config.space import (
    CHOICES,
    INTS,
    LINEAR,
    LOG,
    LOG_INT,
    ORDERED,
    Hyperparameter,
    Space,
    log_place,
)
from pbt_lab.names import OPTIMIZER

KEPT_VALUE = "kept"  # an operation: the key keeps the donor's value


def _uniform(h: Hyperparameter, low: float, high: float, rng: np.random.Generator):
    """A value drawn uniformly (on a log scale for log kinds) from [low, high]."""
    if h.kind == LOG:
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if h.kind == LINEAR:
        return float(rng.uniform(low, high))
    if h.kind == LOG_INT:
        return int(min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high)))))))
    return int(rng.integers(low, high + 1))


def sample(space: Space, rng: np.random.Generator) -> dict:
    """A starting point: each key drawn from its kind ({key: value}, dotted keys), the optimizer first."""
    out: dict = {}
    for h in space.params:
        if h.kind in CHOICES:
            out[h.key] = h.values[rng.integers(len(h.values))]
        else:
            out[h.key] = _uniform(h, *h.range_for(out.get(OPTIMIZER)), rng)
    return out


def _perturbed(h: Hyperparameter, value, low, high, rng: np.random.Generator) -> tuple:
    """(value × f, operation), reflected (× 1/f) where × f would leave [low, high]; ints rounded and
    moved at least one, then kept inside."""
    factor = h.factors[rng.integers(len(h.factors))]
    new, operation = value * factor, f"* {factor:g}"
    if not low <= new <= high:
        new, operation = value / factor, f"* {1 / factor:g} (reflected)"
    if h.kind in INTS:
        up = (new > value) if new != value else factor > 1
        new = round(new)
        if new == value:
            new = value + (1 if up else -1)
        if not low <= new <= high:
            new = value - (1 if up else -1)
        return int(min(high, max(low, new))), operation
    return float(new), operation


def _explore_one(h: Hyperparameter, value, old_optimizer, optimizer, rng: np.random.Generator) -> tuple:
    """(new value, operation) of one key from the donor's ``value``."""
    if h.kind in CHOICES:
        others = [v for v in h.values if v != value]
        if others and rng.random() < h.resample_probability:
            new = others[rng.integers(len(others))]
            return new, (f"switch {value}->{new}" if h.key == OPTIMIZER else "resample")
        if h.kind == ORDERED and value in h.values:
            i = h.values.index(value)
            neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(h.values)]
            j = neighbours[rng.integers(len(neighbours))]
            return h.values[j], f"{'down' if j < i else 'up'} one"
        return value, KEPT_VALUE
    low, high = h.range_for(optimizer)
    if optimizer != old_optimizer and h.bounds_by:  # the same relative place in the new optimizer's range
        value = math.exp(math.log(low) + log_place(value, *h.range_for(old_optimizer)) * math.log(high / low))
    else:
        value = min(max(value, low), high)
    if rng.random() < h.resample_probability:
        return _uniform(h, low, high, rng), "resample"
    new, operation = _perturbed(h, value, low, high, rng)
    if new == value:  # × f of 0 is 0: a perturbation that changes nothing is redrawn
        return _uniform(h, low, high, rng), "resample (× f changed nothing)"
    return new, operation


def explore(donor: dict, space: Space, rng: np.random.Generator) -> tuple[dict, dict]:
    """New hyperparameters from a donor's: ({key: value}, {key: operation}) for every key of ``space``
    (the donor's ``donor`` values by dotted key).

    Ranges: × f for an f of the key's factors, reflected at the range's bound (× 1/f) when × f would
    leave it, or with the key's ``resample_probability`` drawn from the range (log-uniform for log
    kinds); ints rounded and always changed. A rate's range is its optimizer's: after a switch the rate
    keeps its relative place. Choices: with ``resample_probability`` another value; otherwise an ordered
    choice moves to a neighbour and an unordered one is kept. Never a no-op: a draw that changes no key
    is redrawn.
    """
    for _ in range(1000):
        new, operations = {}, {}
        for h in space.params:
            new[h.key], operations[h.key] = _explore_one(
                h, donor[h.key], donor.get(OPTIMIZER), new.get(OPTIMIZER, donor.get(OPTIMIZER)), rng
            )
        if any(new[k] != donor[k] for k in new):
            return new, operations
    raise RuntimeError("explore: 1000 draws changed nothing (a space whose keys cannot change)")


def operation_text(operations: dict) -> str:
    """One line of an exploit's operations: ``optimizer: switch adam->gd, lr: * 1.2``."""
    return ", ".join(f"{k}: {op}" for k, op in operations.items() if op != KEPT_VALUE)


def ranked_members(scores: dict, diverged: set) -> list:
    """The members a decision ranks: those with a score, and every diverged one."""
    return [m for m, s in scores.items() if m in diverged or (s is not None and not math.isnan(s))]


def truncate(
    scores: dict,
    diverged: set,
    fraction: float,
    rng: np.random.Generator,
    name=str,
    population: int | None = None,
) -> tuple[list, list]:
    """(lower, upper): who is replaced and who may donate, from ``scores`` (member -> score, higher
    better; ``None`` or NaN: not ranked) in a population of ``population`` members (default: those
    ranked; the others have no fresh score).

    ``n = quantile_size(fraction, ranked, population)``: floor(fraction × ranked), at least one only
    in a population smaller than 1 / fraction. Diverged members rank last and are all replaced, even
    when there are more than ``n``; the top ``n`` healthy members donate (at least one where a
    diverged member needs a donor). Ties break in an order drawn from ``rng`` over the members sorted
    by ``name`` (not by how they happen to be listed). Empty lists when fewer than two are ranked or
    no healthy member is left to copy.
    """
    ranked = sorted(ranked_members(scores, diverged), key=name)
    if len(ranked) < 2:
        return [], []
    n = quantile_size(fraction, len(ranked), population)
    order = [ranked[i] for i in rng.permutation(len(ranked))]
    order.sort(
        key=lambda m: (m not in diverged, scores[m] if m not in diverged else 0.0)
    )  # stable: ties stay shuffled
    lower = order[: max(n, sum(m in diverged for m in order))]
    upper = [m for m in order if m not in diverged and m not in lower][-max(n, bool(lower)) :]
    return (lower, upper) if upper and lower else ([], [])
