"""The main job (`scripts/train.py`): the three stages end to end, owned by one run folder.

* `setup` — model and data arguments, the model to start from, the dataset, the resolved settings;
* `run_directory` — the output folder: fingerprint, lock, plan (fresh / resume / refuse), atomic files;
* `checkpoints` — complete, cut-off and explicit Trainer checkpoints, resume messages;
* `run` — `run_training`: stage 1, the stage-2/3 loop, evaluation after each stage;
* `artifacts` — the loadable model folder, its card, and the Hub upload.
"""

from .artifacts import push_output_dir, save_artifacts
from .checkpoints import last_complete_checkpoint
from .constants import ADAPTER_DIR, EVAL_FILE, LOOP_CHECKPOINTS, SETTINGS_FILE, STATE_FILE, TEXT_FEATURES_FILE
from .run import run_training
from .run_directory import RUN_FILE, RUN_ONLY_ARGUMENTS, RunDirectory, RunDirectoryError
from .setup import DataArguments, ModelArguments, RunError, build_model, resolved_settings

__all__ = [
    "ADAPTER_DIR",
    "EVAL_FILE",
    "LOOP_CHECKPOINTS",
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
    "build_model",
    "last_complete_checkpoint",
    "push_output_dir",
    "resolved_settings",
    "run_training",
    "save_artifacts",
]
