"""A trial's config: what Tune searches or PBT mutates at its top level (``optimizer``, ``lr``, ``seed``
and any searched ``train`` key; a searched builder option nests under ``model.options``), and the
fixed rest of the experiment as plain dicts (``train``, ``model``), plus ``threads``,
``checkpoint_every`` and, under PBT, ``population`` settings. No TensorFlow here: the driver builds it.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from ray import tune

from pbt_lab.config import ModelConfig, TrainConfig
from pbt_lab.config.space import set_path
from pbt_lab.names import LR, LR_PLACE, LR_RANGES, OPTIMIZER, RECIPE, SEED, STEP

TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig))  # a trial config's top-level keys of its TrainConfig


def trial_space(
    train: TrainConfig, model: ModelConfig, threads: int, population: dict | None = None, **searched
) -> dict:
    """A Tune ``param_space``: the searched keys (values or Tune domains; a dotted key such as
    ``model.options.dropout`` nests) and the fixed rest (``Launch.fit`` adds ``checkpoint_every``)."""
    fixed = {k: v for k, v in asdict(train).items() if k not in searched}
    space = {"train": fixed, "model": asdict(model), "threads": threads, "population": population}
    for key, value in searched.items():
        space = set_path(space, key, value)
    return space


def points_space(points: list[dict]) -> dict:
    """Tune domains for the keys ``points_to_evaluate`` sets (dotted keys): each a choice of exactly the
    points' values, so Ray takes every point as given (a fixed value in the space that a point changes
    makes Ray warn, once per point and key)."""
    return {key: tune.choice(sorted({point[key] for point in points}, key=repr)) for key in points[0]}


def train_config(config: dict) -> TrainConfig:
    """The TrainConfig of one trial's config: its fixed ``train`` and the searched keys at its top level.
    Where it carries ``lr_place`` (PB2, which searches a bounded number), the rate is that place in its
    optimizer's range, in log space."""
    searched = {k: config[k] for k in TRAIN_KEYS if k in config}
    if config.get(LR_PLACE) is not None:
        low, high = config[LR_RANGES][config[OPTIMIZER]]
        searched[LR] = low * (high / low) ** min(1.0, max(0.0, config[LR_PLACE]))
    return TrainConfig(**{**config["train"], **searched})


def segment(step: int, recipe: dict, seed: int, trial: str) -> dict:
    """One stretch of a member's ancestry: from ``step`` on, the searched keys at ``recipe``'s values (the
    optimizer and rate also at the top, as runs before the search space recorded them), in ``trial``."""
    return {
        STEP: int(step),
        OPTIMIZER: recipe.get(OPTIMIZER),
        LR: recipe.get(LR),
        RECIPE: dict(recipe),
        SEED: int(seed),
        "trial": trial,
    }
