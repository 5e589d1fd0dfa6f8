"""Ray Tune's ``hyperparam_mutations`` and the lab's search space, each in the other's form.

    space_of_mutations({"lr": tune.loguniform(1e-4, 1e-1), "opt": {"momentum": [0.8, 0.9, 0.99]},
                        "act": tune.choice(["relu", "tanh"])}, 0.25, (1.2, 0.8))

Ray's forms, as Ray's PBT explores them: a list is an ordered choice (a perturbation moves to a
neighbour); ``tune.choice`` an unordered one; ``tune.uniform`` / ``tune.loguniform`` a linear / log
range; ``tune.randint`` / ``tune.lograndint`` an int range (upper bound excluded, as in Ray); a nested
dict nests keys (``opt.momentum``). A function is refused: PBT's draws are seeded, a function's are not.
"""

from __future__ import annotations

from ray import tune
from ray.tune.search import sample

from pbt_lab import UserError
from pbt_lab.config.space import (
    CHOICE,
    CHOICES,
    INT,
    INTS,
    LINEAR,
    LOG,
    LOG_INT,
    ORDERED,
    Hyperparameter,
    Space,
    check_moves,
    get_path,
    set_path,
)
from pbt_lab.names import OPTIMIZER


def values_at(config: dict, space: Space) -> dict:
    """``config``'s value of every searched key ({dotted key: value})."""
    return {key: get_path(config, key) for key in space.keys}


def _flat(mutations: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mutations.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _hyperparameter(key: str, value, factors: tuple, p: float) -> Hyperparameter:
    if isinstance(value, list):
        return Hyperparameter(key, ORDERED, values=tuple(value), factors=factors, resample_probability=p)
    if isinstance(value, sample.Categorical):
        return Hyperparameter(
            key, CHOICE, values=tuple(value.categories), factors=factors, resample_probability=p
        )
    if isinstance(value, (sample.Float, sample.Integer)):
        log = isinstance(value.sampler, sample.LogUniform)
        if isinstance(value, sample.Float) and isinstance(value.sampler, (sample.Uniform, sample.LogUniform)):
            bounds = (float(value.lower), float(value.upper))
            return Hyperparameter(
                key, LOG if log else LINEAR, bounds, factors=factors, resample_probability=p
            )
        if isinstance(value, sample.Integer) and isinstance(
            value.sampler, (sample.Uniform, sample.LogUniform)
        ):
            bounds = (int(value.lower), int(value.upper) - 1)  # Ray's randint excludes its upper bound
            return Hyperparameter(
                key, LOG_INT if log else INT, bounds, factors=factors, resample_probability=p
            )
    raise UserError(
        f"hyperparam_mutations[{key!r}]: {type(value).__name__} is not a searchable kind here: a list, "
        f"tune.choice, tune.uniform, tune.loguniform, tune.randint or tune.lograndint (a function's draws "
        f"cannot be seeded)"
    )


def space_of_mutations(mutations: dict | None, resample_probability: float, factors) -> Space:
    """The lab's space of Ray's ``hyperparam_mutations`` (one line for a form it cannot explore)."""
    if not isinstance(mutations, dict) or not mutations:
        raise UserError("hyperparam_mutations must map at least one config key to its values (Ray's form)")
    params = []
    for key, value in _flat(mutations).items():
        h = _hyperparameter(key, value, tuple(factors), float(resample_probability))
        check_moves(h, f"hyperparam_mutations[{key!r}]")
        params.append(h)
    params.sort(key=lambda h: h.key != OPTIMIZER)  # a rate's range may depend on the optimizer
    return Space(tuple(params))


def mutations_of(space: Space) -> dict:
    """Ray's form of the lab's ``space`` (what Ray's PBT tags trials and logs changes with)."""
    out: dict = {}
    for h in space.params:
        if h.kind in CHOICES:
            value = list(h.values)
        elif h.kind in INTS:
            low, high = h.bounds
            value = (tune.lograndint if h.kind == LOG_INT else tune.randint)(low, high + 1)
        else:
            low, high = min(r[0] for r in h.ranges), max(r[1] for r in h.ranges)
            value = (tune.loguniform if h.kind == LOG else tune.uniform)(low, high)
        out = set_path(out, h.key, value)
    return out
