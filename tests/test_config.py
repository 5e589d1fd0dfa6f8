"""Configs: defaults are the study's, YAML and --set layer on top, every bad value is one clear line."""

from pathlib import Path

import pytest

from pbt_lab import UserError
from pbt_lab.config import GridExperiment, PBTExperiment, load_config, read_yaml, study_learning_rates


def test_defaults_are_the_study():
    cfg = load_config(GridExperiment)
    assert len(cfg.grid.optimizers) == 6 and len(cfg.grid.lrs) == 48
    assert cfg.grid.lrs[0] == pytest.approx(1e-6) and cfg.grid.lrs[-1] == pytest.approx(100)
    assert 1.0 not in study_learning_rates()  # k = 0 is left out, as in the study
    assert (cfg.model.scale, cfg.train.target, cfg.train.max_seconds, cfg.train.batch_size) == (
        1.0,
        0.97,
        120.0,
        100,
    )
    assert cfg.train.seed == 3141592


def test_yaml_then_set_override_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  target: 0.9\nmodel:\n  scale: 0.5\n")
    cfg = load_config(GridExperiment, path, ["train.target=0.95", "grid.optimizers=[Adam, GD]"])
    assert (cfg.train.lr, cfg.train.target, cfg.model.scale) == (
        1e-3,
        0.95,
        0.5,
    )  # "1e-3" is a string in YAML
    assert cfg.grid.optimizers == ["adam", "gd"]


@pytest.mark.parametrize(
    "cls, text, sets, message",
    [
        (GridExperiment, "train: [1, 2", [], r"not valid YAML \(line"),
        (GridExperiment, "- a\n- b\n", [], "must hold a mapping"),
        (GridExperiment, "trian:\n  lr: 0.1\n", [], r"unknown config key 'trian' \(did you mean 'train'\?\)"),
        (
            GridExperiment,
            "",
            ["train.optimzer=adam"],
            r"unknown config key 'train.optimzer' \(did you mean 'train.optimizer'\?\)",
        ),
        (GridExperiment, "", ["train.optimizer=adamw"], "unknown optimizer 'adamw'"),
        (GridExperiment, "", ["train.lr=0"], "train.lr must be a positive number"),
        (GridExperiment, "", ["train.lr=.nan"], "train.lr must be a positive number"),
        (GridExperiment, "", ["train.lr=fast"], "train.lr must be a number, got 'fast'"),
        (GridExperiment, "", ["train.target=1.01"], r"train.target must be in \(0, 1\]"),
        (GridExperiment, "", ["model.scale=-1"], "model.scale must be a positive number"),
        (GridExperiment, "", ["train.max_steps=2.5"], "train.max_steps must be an integer"),
        (GridExperiment, "", ["train.stop_at_target=maybe"], "train.stop_at_target must be true or false"),
        (GridExperiment, "", ["grid.lrs=0.1"], "grid.lrs must be a list"),
        (GridExperiment, "", ["resources.gpu=-0.5"], "resources.gpu must be ≥ 0"),
        (GridExperiment, "", ["novalue"], "--set expects key=value"),
        (PBTExperiment, "", ["pbt.population=1"], "pbt.population must be an integer ≥ 2"),
        (PBTExperiment, "", ["pbt.seed=-1"], "pbt.seed must be a non-negative integer"),
        (PBTExperiment, "", ["pbt.quantile_fraction=0.6"], r"pbt.quantile_fraction must be in \(0, 0.5\]"),
        (PBTExperiment, "", ["pbt.quantile_fraction=0"], r"pbt.quantile_fraction must be in \(0, 0.5\]"),
        (
            PBTExperiment,
            "",
            ["pbt.perturbation_interval=0"],
            "pbt.perturbation_interval must be a positive integer",
        ),
        (PBTExperiment, "", ["pbt.lr_ranges.adam=[1e-2, 1e-4]"], r"pbt.lr_ranges.adam must be \[low, high\]"),
    ],
)
def test_bad_values_are_one_line(tmp_path, cls, text, sets, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        load_config(cls, path, sets)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match=r"config file .*nope\.yaml does not exist"):
        load_config(GridExperiment, tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_loads(path):
    """Each file in configs/ is a valid config of the command its name begins with."""
    from pbt_lab.config import CompareExperiment, ScalingExperiment, TraceExperiment

    kinds = {
        "grid": GridExperiment,
        "pbt": PBTExperiment,
        "scaling": ScalingExperiment,
        "trace": TraceExperiment,
        "compare": CompareExperiment,
    }
    cfg = load_config(kinds[path.stem.split("-")[0]], path)
    # What the file says is what the config holds (scalars; lists and mappings are normalised).
    for section, values in read_yaml(path).items():
        for key, value in values.items():
            if isinstance(value, (int, float, bool, str)) or value is None:
                assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_the_optimizers_an_experiment_trains_are_those_optimizer_args_must_suit():
    from pbt_lab.config import CompareConfig, CompareExperiment, GridConfig, PBTConfig, PBTExperiment

    grid_only = CompareExperiment(
        compare=CompareConfig(methods=["grid"]), grid=GridConfig(optimizers=["adam"])
    )
    assert grid_only.optimizers == {"adam"}  # the population's optimizers are never trained here
    both = CompareExperiment(
        grid=GridConfig(optimizers=["adam"]), pbt=PBTConfig(optimizers=["gd", "momentum"])
    )
    assert both.optimizers == {"adam", "gd", "momentum"}
    assert PBTExperiment(pbt=PBTConfig(optimizers=["RMSProp"])).optimizers == {"rmsprop"}
