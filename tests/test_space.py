"""The search space on hand-made inputs (no Ray run, no training): explore by each key's kind, the
spaces PBT refuses, Ray's ``hyperparam_mutations`` forms, and the builder options that would change a
weight's shape."""

import math

import numpy as np
import pytest
from ray import tune

from pbt_lab import UserError
from pbt_lab.config import PBTConfig
from pbt_lab.config.space import CHOICE, INT, LINEAR, LOG, LOG_INT, ORDERED, Hyperparameter, Space
from pbt_lab.names import LR, OPTIMIZER
from pbt_lab.tuning.explore import explore, sample
from pbt_lab.tuning.ray_space import mutations_of, space_of_mutations


def one(kind, key="k", p=0.0, factors=(0.8, 1.2), **kw) -> Space:
    return Space((Hyperparameter(key, kind, factors=factors, resample_probability=p, **kw),))


def draws(space: Space, donor: dict, n=300, seed=0) -> list[tuple[dict, dict]]:
    rng = np.random.default_rng(seed)
    return [explore(donor, space, rng) for _ in range(n)]


# --- explore by kind -------------------------------------------------------------------------


@pytest.mark.parametrize("kind, bounds", [(LOG, (1e-4, 1e-2)), (LINEAR, (0.1, 0.6))])
@pytest.mark.parametrize("at", [0.0, 0.3, 1.0])  # the low end, inside, the high end
def test_a_range_moves_by_a_factor_stays_inside_and_reflects_at_its_bounds(kind, bounds, at):
    low, high = bounds
    value = low + at * (high - low)
    for new, ops in draws(one(kind, bounds=bounds), {"k": value}):
        assert low <= new["k"] <= high and new["k"] != value
        ratio = new["k"] / value
        assert any(math.isclose(ratio, f) for f in (0.8, 1.2, 1 / 0.8, 1 / 1.2))
        factor = float(ops["k"].split()[1])
        assert math.isclose(ratio, factor, rel_tol=1e-5)  # the operation says the factor applied
        if "reflected" in ops["k"]:  # × 1/factor was outside: the step came back inside
            assert not low <= value / factor <= high
    reflected = [ops["k"] for _, ops in draws(one(kind, bounds=bounds, factors=(1.2,)), {"k": high}, n=5)]
    assert all("reflected" in op for op in reflected)  # × 1.2 would leave: × 1/1.2


def test_a_range_at_zero_that_no_factor_moves_is_redrawn_inside_it():
    for new, ops in draws(one(LINEAR, bounds=(0.0, 0.2)), {"k": 0.0}, n=50):
        assert 0 < new["k"] <= 0.2 and ops["k"].startswith("resample")


def test_resampled_values_spread_over_the_whole_range_on_the_kinds_scale():
    values = np.array([n["k"] for n, _ in draws(one(LOG, p=1.0, bounds=(1e-4, 1e-2)), {"k": 1e-3}, n=3000)])
    counts, _ = np.histogram(np.log10(values), bins=4, range=(-4, -2))
    assert counts.min() > 0.8 * 3000 / 4  # log-uniform: as many per decade half
    ints = [n["k"] for n, _ in draws(one(INT, p=1.0, bounds=(1, 4)), {"k": 2}, n=500)]
    assert set(ints) == {1, 3, 4}  # any value but the donor's (never a no-op)


@pytest.mark.parametrize("kind", [INT, LOG_INT])
@pytest.mark.parametrize("value", [32, 33, 100, 255, 256])
def test_an_int_is_rounded_always_changes_and_stays_inside(kind, value):
    for new, _ in draws(one(kind, bounds=(32, 256), factors=(0.99, 1.01)), {"k": value}):
        assert isinstance(new["k"], int) and 32 <= new["k"] <= 256 and new["k"] != value


def test_an_int_range_of_two_values_moves_to_the_other():
    assert {n["k"] for n, _ in draws(one(INT, bounds=(1, 2)), {"k": 1})} == {2}


def test_an_ordered_choice_moves_to_a_neighbour_and_an_end_to_its_only_one():
    values = (0.0, 0.05, 0.1, 0.2)
    middle = {n["k"] for n, _ in draws(one(ORDERED, values=values), {"k": 0.05})}
    assert middle == {0.0, 0.1}
    assert {n["k"] for n, _ in draws(one(ORDERED, values=values), {"k": 0.2})} == {0.1}
    resampled = {n["k"] for n, _ in draws(one(ORDERED, p=1.0, values=values), {"k": 0.05})}
    assert resampled == {0.0, 0.1, 0.2}  # any other value, never the same


def test_an_unordered_choice_is_resampled_to_another_value_or_kept():
    space = Space(
        (
            Hyperparameter("act", CHOICE, values=("relu", "tanh", "gelu"), resample_probability=0.5),
            Hyperparameter("k", LOG, bounds=(1e-4, 1e-2), resample_probability=0.0),
        )
    )
    kinds = {n["act"] for n, _ in draws(space, {"act": "relu", "k": 1e-3})}
    assert kinds == {"relu", "tanh", "gelu"}


def test_explore_is_never_a_no_op_even_when_only_a_choice_can_change():
    space = one(CHOICE, p=0.3, values=("a", "b"))
    assert all(n["k"] == "b" for n, _ in draws(space, {"k": "a"}, n=100))


def test_a_rate_after_a_switch_keeps_its_place_in_the_new_optimizers_range():
    lr = Hyperparameter(LR, LOG, bounds_by=(("adam", (1e-4, 1e-2)), ("gd", (1e-2, 1.0))), factors=(1.2,))
    space = Space((Hyperparameter(OPTIMIZER, CHOICE, values=("adam", "gd"), resample_probability=1.0), lr))
    new, ops = explore({OPTIMIZER: "adam", LR: 1e-3}, space, np.random.default_rng(0))
    assert (
        new[OPTIMIZER] == "gd" and new[LR] == pytest.approx(0.1 * 1.2) and ops[OPTIMIZER] == "switch adam->gd"
    )


def test_explore_and_sample_are_functions_of_their_generator():
    space = PBTConfig(
        space={"batch_size": {"log_int": [32, 256]}, "weight_decay": {"log": [1e-6, 1e-3]}}
    ).search_space
    one_run = [
        sample(space, np.random.default_rng(3)),
        *draws(space, sample(space, np.random.default_rng(3)), 20, 3),
    ]
    again = [
        sample(space, np.random.default_rng(3)),
        *draws(space, sample(space, np.random.default_rng(3)), 20, 3),
    ]
    other = [
        sample(space, np.random.default_rng(4)),
        *draws(space, sample(space, np.random.default_rng(4)), 20, 4),
    ]
    assert one_run == again and one_run != other


def test_the_default_space_is_the_studys_optimizer_and_its_own_rate_range():
    p = PBTConfig(optimizers=["adam", "gd"], optimizer_switch_probability=0.2)
    assert p.search_space.keys == [OPTIMIZER, LR]
    assert p.search_space[OPTIMIZER].resample_probability == 0.2
    assert p.search_space[LR].range_for("gd") == (1e-2, 1.0)
    for _ in range(50):
        point = sample(p.search_space, np.random.default_rng(_))
        low, high = p.lr_ranges[point[OPTIMIZER]]
        assert low <= point[LR] <= high


# --- spaces PBT refuses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "space, message",
    [
        ({"dropout": {"linear": [0.1, 0.5]}}, r"pbt\.space\.dropout: unknown key.*model\.options\.NAME"),
        ({"weight_decay": {"log": [1e-3, 1e-4]}}, "is empty"),
        ({"weight_decay": {"log": [1e-3, 1e-3]}}, "is empty"),
        ({"weight_decay": {"log": [0.0, 1e-3]}}, "positive values"),
        ({"optimizer": {"choice": ["adam"]}}, "choice of 1 value"),
        ({"label_smoothing": {"ordered": [0.1]}}, "choice of 1 value"),
        ({"weight_decay": {"log": [1e-4, 1.2e-4]}}, "narrower than the factors can move"),
        ({"model.options.dropout": {"linear": [0.5, 0.6]}}, "narrower than the factors can move"),
        ({"batch_size": {"linear": [32, 256]}}, "int range or a choice"),
        ({"batch_size": {"int": [32.5, 256]}}, "integer bounds"),
        ({"momentum": {"linear": [0.5, 1.0]}}, "must stay below 1"),
        ({"optimizer": {"linear": [0, 1]}}, "choice of optimizers"),
        ({"weight_decay": [1e-4, 1e-2]}, r"must be a mapping such as \{log"),
        ({"weight_decay": {"log": [1e-4, 1e-2], "linear": [0, 1]}}, "one kind"),
        ({"weight_decay": {"log": [1e-4, 1e-2], "factor": [0.5]}}, "unknown setting 'factor'"),
        ({"weight_decay": {"log": [1e-4, 1e-2], "factors": [1.0]}}, "other than 1"),
        ({"weight_decay": {"log": [1e-4, 1e-2], "resample_probability": 2}}, r"in \[0, 1\]"),
        ({"lr": {"log": {"adam": [1e-4, 1e-2]}}}, "no range for"),
        ({"weight_decay": {"log": {"adam": [1e-4, 1e-2]}}}, "only lr's range may depend"),
        (
            {
                "optimizer": {"choice": ["adam", "gd"], "resample_probability": 0},
                "lr": {"choice": [0.1, 0.2], "resample_probability": 0},
            },
            "no key can change",
        ),
        ({"label_smoothing": {"ordered": [0.1, 0.1]}}, "repeats a value"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_key(space, message):
    with pytest.raises(UserError, match=message):
        PBTConfig(space=space)


def test_factors_of_a_key_make_a_narrow_range_searchable():
    p = PBTConfig(space={"beta_1": {"linear": [0.85, 0.95], "factors": [0.97, 1.03]}})
    assert p.search_space["beta_1"].factors == (0.97, 1.03)


def test_metric_and_mode():
    assert PBTConfig(metric="val_loss").mode == "min" and PBTConfig().mode == "max"
    assert PBTConfig(metric="train_loss", mode="max").mode == "max"
    with pytest.raises(UserError, match=r"pbt\.mode must be max or min"):
        PBTConfig(mode="lowest")
    with pytest.raises(UserError, match=r"pbt\.metric must be one of"):
        PBTConfig(metric="accuracy")


# --- Ray's hyperparam_mutations --------------------------------------------------------------


def test_rays_forms_become_kinds_nested_keys_dotted():
    space = space_of_mutations(
        {
            "lr": tune.loguniform(1e-4, 1e-1),
            "opt": {"momentum": [0.8, 0.9, 0.99], "nesterov": tune.choice([True, False])},
            "layers": tune.randint(1, 5),
            "width": tune.lograndint(16, 257),
            "drop": tune.uniform(0.0, 0.5),
        },
        0.25,
        (1.2, 0.8),
    )
    kinds = {h.key: h.kind for h in space.params}
    assert kinds == {
        "lr": LOG,
        "opt.momentum": ORDERED,
        "opt.nesterov": CHOICE,
        "layers": INT,
        "width": LOG_INT,
        "drop": LINEAR,
    }
    assert space["layers"].bounds == (1, 4) and space["width"].bounds == (
        16,
        256,
    )  # Ray excludes the upper bound
    back = mutations_of(space)
    assert back["opt"]["momentum"] == [0.8, 0.9, 0.99] and isinstance(back["lr"], tune.search.sample.Float)
    new, _ = explore(
        {"lr": 1e-3, "opt.momentum": 0.9, "opt.nesterov": True, "layers": 2, "width": 64, "drop": 0.2},
        space,
        np.random.default_rng(0),
    )
    assert new["opt.momentum"] in (0.8, 0.99) and new["layers"] != 2


@pytest.mark.parametrize(
    "mutations, message",
    [
        ({"lr": lambda: 0.1}, "cannot be seeded"),
        ({"lr": tune.randn(0, 1)}, "not a searchable kind"),
        ({}, "at least one"),
        ({"lr": [0.1]}, "choice of 1 value"),
        ({"lr": tune.loguniform(0.1, 0.11)}, "narrower than the factors"),
    ],
)
def test_rays_forms_the_lab_cannot_explore_are_refused_in_one_line(mutations, message):
    with pytest.raises(UserError, match=message):
        space_of_mutations(mutations, 0.25, (1.2, 0.8))


# --- builder options ------------------------------------------------------------------------


def test_a_searched_builder_option_that_changes_a_weights_shape_is_refused(bundled):
    from pbt_lab.config import ModelConfig
    from pbt_lab.training.model import build_model, check_options_keep_shapes

    cfg = ModelConfig(scale=0.25)
    model = build_model(cfg.builder, bundled.input_shape, bundled.num_classes, cfg.scale)
    check_options_keep_shapes(cfg.builder, bundled, cfg, model, {"model.options.dropout": (0.1, 0.6)})
    with pytest.raises(
        UserError, match=r"dense_units=256 changes the model's weights.*weights must transfer"
    ):
        check_options_keep_shapes(
            cfg.builder, bundled, cfg, model, {"model.options.dense_units": (256, 1024)}
        )
    check_options_keep_shapes(cfg.builder, bundled, cfg, model, {"lr": (1e-4, 1e-2)})  # not a builder option
