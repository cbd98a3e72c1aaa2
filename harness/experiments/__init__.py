"""The experiment registry: YAML files → validated, expanded run configs with canonical hashes.

An experiment names the model(s), the layers, the corpus, the evaluation, and a grid over quantization
axes. ``schema`` validates the file (unknown keys are errors; every enumeration comes from its owner),
``config`` holds ``RunConfig`` (one measurement, defaults resolved, and its hash), ``grid`` expands an
``Experiment`` into configs, and ``loader`` finds and reads the files, every error on one line.
"""

from harness.experiments.config import DEFAULT_BLOCK_SIZE, DTYPE_LABELS, LayerOverride, RunConfig
from harness.experiments.grid import COUNTED, Experiment
from harness.experiments.loader import (
    LOCAL_DIR,
    SHIPPED_DIR,
    experiment_path,
    experiment_paths,
    list_experiments,
    load_experiment,
)
from harness.experiments.schema import (
    AXES,
    DEFAULT_MENU,
    DEFAULT_PROBES,
    MODEL_DTYPES,
    REFERENCE_DTYPES,
    UNIT_KINDS,
    Choice,
    DataSettings,
    DoubleQuantSpec,
    EvalSettings,
    ExperimentError,
    ExperimentFile,
    LayerRule,
    SensitivitySettings,
)

__all__ = [
    "AXES",
    "COUNTED",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MENU",
    "DEFAULT_PROBES",
    "DTYPE_LABELS",
    "LOCAL_DIR",
    "MODEL_DTYPES",
    "REFERENCE_DTYPES",
    "SHIPPED_DIR",
    "UNIT_KINDS",
    "Choice",
    "DataSettings",
    "DoubleQuantSpec",
    "EvalSettings",
    "Experiment",
    "ExperimentError",
    "ExperimentFile",
    "LayerOverride",
    "LayerRule",
    "RunConfig",
    "SensitivitySettings",
    "experiment_path",
    "experiment_paths",
    "list_experiments",
    "load_experiment",
]
