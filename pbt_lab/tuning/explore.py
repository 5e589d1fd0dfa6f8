"""PBT's choices as pure functions (no Ray, seeded): who is replaced and who donates (``truncate``),
and the new hyperparameters drawn from a donor's (``explore``). Unit-tested on hand-made inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pbt_lab.config import quantile_size
from pbt_lab.names import LR, OPTIMIZER


@dataclass(frozen=True)
class ExplorePolicy:
    """How an exploit's new hyperparameters are drawn from its donor's."""

    optimizers: tuple[str, ...]
    lr_ranges: dict  # optimizer -> (low, high)
    perturbation_factors: tuple[float, ...] = (0.8, 1.2)
    resample_probability: float = 0.25
    switch_probability: float = 0.0

    @classmethod
    def of(cls, pbt) -> ExplorePolicy:
        """The policy of a ``PBTConfig``."""
        return cls(
            tuple(pbt.optimizers),
            {o: tuple(pbt.lr_ranges[o]) for o in pbt.optimizers},
            tuple(pbt.perturbation_factors),
            pbt.resample_probability,
            pbt.optimizer_switch_probability,
        )


def _place(lr: float, low: float, high: float) -> float:
    """Where ``lr`` sits in [low, high] on a log scale: 0 at low, 1 at high (clamped)."""
    return min(max((math.log(lr) - math.log(low)) / (math.log(high) - math.log(low)), 0.0), 1.0)


def explore(optimizer: str, lr: float, policy: ExplorePolicy, rng: np.random.Generator) -> dict:
    """New hyperparameters from a donor's: ``{optimizer, lr, operation}``.

    With ``switch_probability`` another optimizer (any of the others: names have no neighbours),
    at the same relative place in its range. Then, with ``resample_probability``, a rate drawn
    log-uniform from that optimizer's own range; otherwise the rate × f for an f of the factors,
    reflected at the range's bound (× 1/f) when × f would leave it. A perturbed rate therefore
    never equals the donor's and never leaves its range.
    """
    new = optimizer
    others = [o for o in policy.optimizers if o != optimizer]
    if others and rng.random() < policy.switch_probability:
        new = others[rng.integers(len(others))]
    low, high = policy.lr_ranges[new]
    if new == optimizer:
        base = min(max(lr, low), high)
    else:
        place = _place(lr, *policy.lr_ranges[optimizer])
        base = math.exp(math.log(low) + place * (math.log(high) - math.log(low)))
    switch = f"switch {optimizer}->{new}, " if new != optimizer else ""
    if rng.random() < policy.resample_probability:
        return {
            OPTIMIZER: new,
            LR: float(math.exp(rng.uniform(math.log(low), math.log(high)))),
            "operation": f"{switch}resample",
        }
    factor = policy.perturbation_factors[rng.integers(len(policy.perturbation_factors))]
    if low <= base * factor <= high:
        return {OPTIMIZER: new, LR: base * factor, "operation": f"{switch}* {factor:g}"}
    # Reflected: the config check (ranges span max(f, 1/f)²) keeps base / factor inside.
    return {OPTIMIZER: new, LR: base / factor, "operation": f"{switch}* {1 / factor:g} (reflected)"}


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
