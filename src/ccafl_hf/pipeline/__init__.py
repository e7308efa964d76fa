"""The main job (`scripts/train.py`): the three stages end to end, owned by one run.

* `setup` — model and data arguments, the model to start from, the dataset, the resolved settings;
* `run` — `TrainingRun` (`plan`, `run_stage`, `finish`) and `run_training`;
* `run_directory` — the output folder: fingerprint by content, lock, plan, stage results;
* `checkpoints` — checkpoint manifests and where a stage resumes;
* `manifest` — content hashes, manifests written last, atomic writes, one line for a failed write;
* `artifacts` — the loadable model folder, its card, and the Hub upload.
"""

from .artifacts import push_output_dir, save_artifacts
from .constants import ADAPTER_DIR, EVAL_FILE, LOOP_CHECKPOINTS, SETTINGS_FILE, STATE_FILE, TEXT_FEATURES_FILE
from .run import TrainingRun, run_training
from .run_directory import (
    RESULT_NEUTRAL_ARGUMENTS,
    RUN_FILE,
    RUN_ONLY_ARGUMENTS,
    RunDirectory,
    RunDirectoryError,
)
from .setup import DataArguments, ModelArguments, RunError, build_model, resolved_settings

__all__ = [
    "ADAPTER_DIR",
    "EVAL_FILE",
    "LOOP_CHECKPOINTS",
    "RESULT_NEUTRAL_ARGUMENTS",
    "RUN_FILE",
    "RUN_ONLY_ARGUMENTS",
    "SETTINGS_FILE",
    "STATE_FILE",
    "TEXT_FEATURES_FILE",
    "DataArguments",
    "ModelArguments",
    "RunDirectory",
    "RunDirectoryError",
    "RunError",
    "TrainingRun",
    "build_model",
    "push_output_dir",
    "resolved_settings",
    "run_training",
    "save_artifacts",
]
