"""`Trainer` subclasses of the three CCAFL stages and their arguments."""

from .arguments import STAGES, CCAFLTrainingArguments, parse_stages
from .base import CCAFLStageTrainer
from .ical import ICALTrainer
from .icdl import ICDLTrainer
from .prompt_learning import FeatureCache, PromptLearningTrainer
from .training_module import CCAFLForTraining, LossSwitches

__all__ = [
    "STAGES",
    "CCAFLForTraining",
    "CCAFLStageTrainer",
    "CCAFLTrainingArguments",
    "FeatureCache",
    "ICALTrainer",
    "ICDLTrainer",
    "LossSwitches",
    "PromptLearningTrainer",
    "parse_stages",
]
