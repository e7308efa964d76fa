"""`Trainer` subclasses of the three CCAFL stages, their objectives and their arguments.

Stage 1: [`PromptLearningTrainer`]. Stages 2–3: [`CCAFLTrainer`], one loop of ICDL then ICAL epochs
([`ICDLObjective`], [`ICALObjective`]) over a [`CCAFLForTraining`] module; [`ICDLTrainer`] and
[`ICALTrainer`] run one of the two stages alone.
"""

from .arguments import MIXED_PRECISIONS, OPTIMIZERS, STAGES, CCAFLTrainingArguments, parse_stages
from .base import CCAFLTrainer, FixedLengthSampler, ICALTrainer, ICDLTrainer
from .objectives import ICALObjective, ICDLObjective, StageObjective
from .prompt_learning import FeatureCache, PromptLearningTrainer
from .training_module import CCAFLForTraining, set_image_stage_trainable

__all__ = [
    "MIXED_PRECISIONS",
    "OPTIMIZERS",
    "STAGES",
    "CCAFLForTraining",
    "CCAFLTrainer",
    "CCAFLTrainingArguments",
    "FeatureCache",
    "FixedLengthSampler",
    "ICALObjective",
    "ICALTrainer",
    "ICDLObjective",
    "ICDLTrainer",
    "PromptLearningTrainer",
    "StageObjective",
    "parse_stages",
    "set_image_stage_trainable",
]
