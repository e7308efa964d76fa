"""The command line's training arguments (`CCAFLTrainingArguments`): every setting of the three stages.

Defaults are the reference settings for Market-1501; per-dataset values come from the packaged presets
(`ccafl_hf/presets/*.json`), never from `if dataset == ...` branches. The arguments are the stage-2/3
config ([`CCAFLTrainerConfig`], whose fields they inherit) plus the stage-1, augmentation and precision
flags; each trainer runs with its own config, built once from them: `prompt_config()` and
`loop_config()`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ArgumentError
from ..utils.precision import MIXED_PRECISIONS, resolve_mixed_precision
from .configs import IMAGE_STAGES, OPTIMIZERS, CCAFLTrainerConfig, PromptLearningConfig, _help, _items, derive
from .validation import epoch_window_problems

logger = logging.getLogger(__name__)

STAGES = ("prompt", *IMAGE_STAGES)

#: `transformers.TrainingArguments` flags that CCAFL's stages set themselves or never read (their own optimisers
#: and schedules): refused on the command line naming the flags that do the job, hidden from ``--help`` and
#: absent from ``--print_settings``
REPLACED_TRAINER_FLAGS = {
    "num_train_epochs": "--prompt_epochs, --icdl_epochs and --ical_epochs",
    "max_steps": "--prompt_epochs, --icdl_epochs, --ical_epochs and --iters_per_epoch",
    "per_device_train_batch_size": "--prompt_batch_size (stage 1) and --num_identities_per_batch x --num_instances "
                                   "(stages 2-3)",
    "lr_scheduler_type": "--warmup_epochs, --warmup_factor, --lr_decay_epochs and --lr_decay_gamma (stages 2-3; "
                         "stage 1: --prompt_lr_schedule and --prompt_warmup_epochs)",
    "lr_scheduler_kwargs": "--warmup_epochs, --warmup_factor, --lr_decay_epochs and --lr_decay_gamma",
    "warmup_steps": "--warmup_epochs and --warmup_factor (stage 1: --prompt_warmup_epochs)",
    "warmup_ratio": "--warmup_epochs and --warmup_factor (stage 1: --prompt_warmup_epochs)",
    "optim": "--optimizer {adam,sgd}",
    "optim_args": "--optimizer {adam,sgd} and --sgd_momentum",
    "adam_beta1": "--optimizer {adam,sgd} (Adam with the reference betas 0.9, 0.999)",
    "adam_beta2": "--optimizer {adam,sgd} (Adam with the reference betas 0.9, 0.999)",
    "adam_epsilon": "--optimizer {adam,sgd} (Adam with the reference epsilon 1e-8)",
}
# the run evaluates at each stage's end and every --eval_every_epochs loop epochs, never on a step schedule
REPLACED_TRAINER_FLAGS.update(dict.fromkeys(
    ("eval_strategy", "eval_steps"), "--eval_every_epochs N (the run evaluates at each stage's end and every N loop epochs)"
))


@dataclass
class CCAFLTrainingArguments(CCAFLTrainerConfig):
    """The settings of a whole run, as the command line gives them: `TrainingArguments`, the stage-2/3
    fields of [`CCAFLTrainerConfig`], and the stage-1, augmentation and precision flags.

    The shared fields (output_dir, seed, bf16/fp16, logging, report_to, push_to_hub, …) apply to all
    stages; `prompt_config()` and `loop_config()` build the config each stage's `Trainer` runs with.
    """

    overwrite_output_dir: bool = field(
        default=False, **_help("Start over: replace the run found in output_dir (deleted only once arguments, data "
                               "and model are checked and training starts) instead of resuming or refusing it.")
    )
    stages: list[str] = field(
        default_factory=lambda: list(STAGES),
        **_help("The stages to run: a prefix of prompt icdl ical (e.g. --stages prompt icdl; prompt,icdl also works)."),
    )

    # ------------------------------------------------------------------ stage 1: prompt learning
    prompt_epochs: float = field(default=60, **_help("Stage-1 epochs over the cached features (> 0: stages 2-3 need "
                                                      "trained prompts; use --stages to stop earlier)."))
    prompt_batch_size: int = field(default=64, **_help("Stage-1 batch size (random batches of cached features)."))
    prompt_learning_rate: float = field(default=3.5e-4, **_help("Stage-1 Adam learning rate."))
    prompt_weight_decay: float = field(default=1e-4, **_help("Stage-1 Adam weight decay."))
    prompt_warmup_epochs: float = field(default=5, **_help("Stage-1 linear warm-up epochs before cosine decay."))
    prompt_lr_schedule: Literal["cosine", "epoch_cosine"] = field(
        default="cosine",
        **_help("Stage-1 schedule: cosine (per step, warm-up from 0, decay to 0) or epoch_cosine (the reference's, "
                "per epoch: warm-up from --prompt_warmup_lr, cosine to --prompt_min_lr at the last epoch; the "
                "full-scale presets)."),
    )
    prompt_warmup_lr: float = field(default=1e-5, **_help("Stage-1 warm-up start lr of --prompt_lr_schedule epoch_cosine."))
    prompt_min_lr: float = field(default=1e-6, **_help("Stage-1 final lr of --prompt_lr_schedule epoch_cosine."))
    prompt_init_std: float = field(default=0.02, **_help("Std of the N(0, std) prompt vector initialisation."))

    # ------------------------------------------------------------------ augmentation (docs/method.md §6)
    random_erasing_prob: float = field(default=0.5, **_help("Probability of random erasing in the train transform."))
    random_erasing_style: Literal["torchvision", "reference"] = field(
        default="torchvision",
        **_help("torchvision (aspect ratio log-uniform, erased pixels set to the mean colour) or reference (the "
                "authors' code: aspect uniform in [0.3, 1/0.3], pixels set to 0.485/0.456/0.406 after normalising)."),
    )
    image_normalization: Literal["processor", "imagenet"] = field(
        default="processor",
        **_help("Input normalisation, stored with the trained model's processor: processor (the base model's, "
                "CLIP's statistics for CLIP weights) or imagenet (the authors' code)."),
    )
    color_jitter: float = field(
        default=0.0,
        **_help("Extension (not in the paper): brightness/contrast/saturation jitter of this strength (hue a "
                "quarter of it) in the train transform; 0 = off."),
    )

    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = field(
        default="no",
        **_help("no, fp16, bf16 or auto (bf16 where the GPU supports it, else fp16 with a loss scaler; fp32 on a "
                "CPU). --bf16/--fp16 still work. Losses are always computed in fp32."),
    )


    def __post_init__(self):
        self._resolve_mixed_precision()
        if not _cuda_available() and not self.use_cpu and (self.bf16 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            # bf16 autocast or several processes (gloo) on a machine without CUDA: accelerate must be told
            logger.info("no CUDA device: running on the CPU (use_cpu=True) for %s",
                        "bf16 autocast" if self.bf16 else "several processes")
            self.use_cpu = True
        if self.dataloader_pin_memory and not _cuda_available():
            logger.info("no CUDA device: dataloader_pin_memory=False (pinning needs an accelerator)")
            self.dataloader_pin_memory = False
        self.stages = parse_stages(self.stages)
        super().__post_init__()  # the stage-2/3 config: ranges of every field, the loop's derived fields
        for message in epoch_window_problems(self).values():
            logger.warning(message)

    def _resolve_mixed_precision(self) -> None:
        """Turn ``mixed_precision`` (no|fp16|bf16|auto) and ``--bf16``/``--fp16`` into one concrete choice."""
        try:
            explicit = resolve_mixed_precision(self.mixed_precision, bf16=self.bf16, fp16=self.fp16,
                                               device="cpu" if self.use_cpu else None)
        except ValueError as error:
            raise ArgumentError(str(error)) from None
        self.bf16, self.fp16 = explicit == "bf16", explicit == "fp16"
        self.mixed_precision = explicit

    def to_dict(self) -> dict:
        """The settings a run uses (``--print_settings``): without the `REPLACED_TRAINER_FLAGS` fields, which
        each stage sets itself."""
        return {k: v for k, v in super().to_dict().items() if k not in REPLACED_TRAINER_FLAGS}

    def prompt_config(self, **overrides) -> PromptLearningConfig:
        """The stage-1 config: ``prompt_*`` flags as its epochs, batch size, learning rate, weight decay and
        warm-up (a fraction of the steps); the shared fields as they are; never pushed (the run pushes once)."""
        warm = self.prompt_warmup_epochs / self.prompt_epochs if self.prompt_epochs else 0.0
        values = {
            "num_train_epochs": self.prompt_epochs,
            "per_device_train_batch_size": self.prompt_batch_size,
            "learning_rate": self.prompt_learning_rate,
            "weight_decay": self.prompt_weight_decay,
            "warmup_steps": min(warm, 0.999),
            "dataloader_drop_last": False,
            "push_to_hub": False,
            **overrides,
        }
        return derive(PromptLearningConfig, self, skip=REPLACED_TRAINER_FLAGS, **values)

    def loop_config(self, stages: tuple[str, ...] | list[str] | None = None, **overrides) -> CCAFLTrainerConfig:
        """The stage-2/3 config of a loop over ``stages`` (default: the image stages of ``stages``); never
        pushed (the run pushes once)."""
        stages = list(stages) if stages is not None else [s for s in self.stages if s in IMAGE_STAGES]
        return derive(CCAFLTrainerConfig, self, skip=REPLACED_TRAINER_FLAGS,
                      **{"stages": stages, "push_to_hub": False, **overrides})

    def stage_arguments(self, stage: str) -> PromptLearningConfig | CCAFLTrainerConfig:
        """The config of one stage's trainer, checkpointing into ``output_dir/checkpoints/<stage>``."""
        if stage not in STAGES:
            raise ArgumentError(f"unknown stage {stage!r}; expected one of {STAGES}")
        if stage == "prompt":
            return self.prompt_config(output_dir=self.stage_output_dir(stage))
        return self.loop_config((stage,), output_dir=self.stage_output_dir(stage))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_stages(stages: str | list[str] | tuple[str, ...]) -> list[str]:
    """Validate ``stages`` (a prefix of ``prompt icdl ical``, as a list or a comma-separated string) and return
    it as a list."""
    items = _items(stages)
    if not items or items != list(STAGES[: len(items)]):
        shown = " ".join(_items(stages)) if not isinstance(stages, str) else stages
        raise ArgumentError(f"--stages must be a prefix of {' '.join(STAGES)} (e.g. --stages prompt icdl), got {shown!r}")
    return items


def validate_training_arguments(args: CCAFLTrainingArguments) -> None:
    """Check every range of ``args`` again (as its construction does); `ArgumentError` naming the first bad flag."""
    from .validation import check_ranges

    check_ranges(args)


__all__ = ["MIXED_PRECISIONS", "OPTIMIZERS", "REPLACED_TRAINER_FLAGS", "STAGES", "CCAFLTrainingArguments",
           "parse_stages", "validate_training_arguments"]
