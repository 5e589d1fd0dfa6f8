"""Typed dataclass configs: defaults live here once, each field with a one-line docstring, and
every dataclass validates itself, so a bad value fails with one clear line before any work starts.

- ``checks``: the optimizer names, one-line errors, typed coercion of YAML and ``--set`` values;
- ``shared``: what every experiment has (model, training, data, resources, Tune's run settings);
- ``experiments``: the grid, PBT, the width study and the trace.

- ``loading``: a YAML file, the Python API's sections and ``--set`` overrides, built into them.
"""

from pbt_lab.config.checks import OPTIMIZER_NAMES, TARGET_METRICS, canonical_name, coerce, require
from pbt_lab.config.experiments import (
    COMPARE_METHODS,
    DEFAULT_LR_RANGES,
    GRID_CPU_BEST_LRS,
    SCALING_MODES,
    CompareConfig,
    CompareExperiment,
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
from pbt_lab.config.loading import load_config, merge, read_yaml
from pbt_lab.config.shared import (
    STUDY_CNN,
    DataConfig,
    Experiment,
    ModelConfig,
    ResourcesConfig,
    TrainConfig,
    TuneRunConfig,
)

__all__ = [
    "COMPARE_METHODS",
    "DEFAULT_LR_RANGES",
    "GRID_CPU_BEST_LRS",
    "OPTIMIZER_NAMES",
    "SCALING_MODES",
    "STUDY_CNN",
    "TARGET_METRICS",
    "CompareConfig",
    "CompareExperiment",
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
    "load_config",
    "merge",
    "quantile_size",
    "read_yaml",
    "require",
    "study_learning_rates",
    "study_rates_between",
]
