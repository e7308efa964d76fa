"""`Trainer` subclasses of the three CCAFL stages, their configs, objectives and the command line's arguments.

Stage 1: [`PromptLearningTrainer`] with a [`PromptLearningConfig`]. Stages 2–3: [`CCAFLTrainer`] with a
[`CCAFLTrainerConfig`], one loop of ICDL then ICAL epochs ([`ICDLObjective`], [`ICALObjective`]) over a
[`CCAFLForTraining`] module; [`ICDLTrainer`] and [`ICALTrainer`] run one of the two stages alone.
[`CCAFLTrainingArguments`] (the command line's) builds both configs once: `prompt_config()`, `loop_config()`.
"""

from .arguments import (
    MIXED_PRECISIONS,
    OPTIMIZERS,
    REPLACED_TRAINER_FLAGS,
    STAGES,
    CCAFLTrainingArguments,
    parse_stages,
)
from .base import CCAFLTrainer, FixedLengthSampler, ICALTrainer, ICDLTrainer
from .configs import IMAGE_STAGES, CCAFLTrainerConfig, PromptLearningConfig
from .objectives import ICALObjective, ICDLObjective, StageObjective
from .prompt_learning import FeatureCache, PromptLearningTrainer
from .training_module import CCAFLForTraining, set_image_stage_trainable

__all__ = [
    "IMAGE_STAGES",
    "MIXED_PRECISIONS",
    "OPTIMIZERS",
    "REPLACED_TRAINER_FLAGS",
    "STAGES",
    "CCAFLForTraining",
    "CCAFLTrainer",
    "CCAFLTrainerConfig",
    "CCAFLTrainingArguments",
    "FeatureCache",
    "FixedLengthSampler",
    "ICALObjective",
    "ICALTrainer",
    "ICDLObjective",
    "ICDLTrainer",
    "PromptLearningConfig",
    "PromptLearningTrainer",
    "StageObjective",
    "parse_stages",
    "set_image_stage_trainable",
]
