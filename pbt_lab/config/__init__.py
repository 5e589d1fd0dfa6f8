"""Typed dataclass configs: defaults live here once, each field with a one-line docstring, and
every dataclass validates itself, so a bad value fails with one clear line before any work starts.

- ``checks``: the optimizer names, one-line errors, typed coercion of YAML and ``--set`` values;
- ``shared``: what every experiment has (model, training, data, resources, Tune's run settings);
- ``experiments``: the grid, PBT, the width study and the trace.

(Loading a YAML file and ``--set`` overrides into them: ``cli.load_config``.)
"""

from pbt_lab.config.checks import OPTIMIZER_NAMES, TARGET_METRICS, canonical_name, coerce, require
from pbt_lab.config.experiments import (
    DEFAULT_LR_RANGES,
    GRID_CPU_BEST_LRS,
    SCALING_MODES,
    GridConfig,
    GridExperiment,
    PBTConfig,
    PBTExperiment,
    ScalingConfig,
    ScalingExperiment,
    TraceConfig,
    TraceExperiment,
    quantile_size,
    study_learning_rates,
    study_rates_between,
)
from pbt_lab.config.shared import (
    DataConfig,
    Experiment,
    ModelConfig,
    ResourcesConfig,
    TrainConfig,
    TuneRunConfig,
)

__all__ = [
    "DEFAULT_LR_RANGES",
    "GRID_CPU_BEST_LRS",
    "OPTIMIZER_NAMES",
    "SCALING_MODES",
    "TARGET_METRICS",
    "DataConfig",
    "Experiment",
    "GridConfig",
    "GridExperiment",
    "ModelConfig",
    "PBTConfig",
    "PBTExperiment",
    "ResourcesConfig",
    "ScalingConfig",
    "ScalingExperiment",
    "TraceConfig",
    "TraceExperiment",
    "TrainConfig",
    "TuneRunConfig",
    "canonical_name",
    "coerce",
    "quantile_size",
    "require",
    "study_learning_rates",
    "study_rates_between",
]
