"""Training arguments of the three CCAFL stages (docs/method.md §3–§6), as a `TrainingArguments` subclass.

Defaults are the reference settings for Market-1501; per-dataset values come from the packaged
presets (`ccafl_hf/presets/*.json`), never from `if dataset == ...` branches. Epoch numbers of the
ICAL windows count in the joint stage-2/3 loop of the paper (ICDL epochs first, then ICAL), so the
paper's "adversarial epochs 40–49" is written as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..data.transforms import ERASING_STYLES, IMAGE_NORMALIZATIONS
from ..precision import MIXED_PRECISIONS, resolve_mixed_precision
from ..schedules import PROMPT_LR_SCHEDULES

logger = logging.getLogger(__name__)

STAGES = ("prompt", "icdl", "ical")
OPTIMIZERS = ("adam", "sgd")


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class CCAFLTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the CCAFL hyper-parameters of every stage.

    The shared fields (output_dir, seed, bf16/fp16, logging, report_to, push_to_hub, …) apply to all
    stages; `stage_arguments(stage)` derives the arguments one stage's `Trainer` runs with.
    """

    output_dir: str | None = field(default="outputs/ccafl-demo", metadata={"help": "Where checkpoints and the final model go."})
    overwrite_output_dir: bool = field(
        default=False, **_help("Start over: replace the run found in output_dir (deleted only once arguments, data "
                               "and model are checked and training starts) instead of resuming or refusing it.")
    )
    stages: list[str] = field(
        default_factory=lambda: list(STAGES),
        **_help("The stages to run: a prefix of prompt icdl ical (e.g. --stages prompt icdl; prompt,icdl also works)."),
    )
    remove_unused_columns: bool = field(default=False, **_help("Keep camera/identity columns (must stay False)."))
    learning_rate: float = field(default=3.5e-4, **_help("Stages 2–3 base learning rate (Adam; biases ×2)."))
    weight_decay: float = field(default=5e-4, **_help("Stages 2–3 weight decay (L2, as the reference Adam)."))
    logging_strategy: str = field(default="epoch", **_help("Log once per epoch by default."))
    save_strategy: str = field(default="epoch", **_help("Checkpoint every epoch (resume continues mid-stage)."))
    save_total_limit: int | None = field(default=2, **_help("Checkpoints kept per stage."))
    dataloader_drop_last: bool = field(default=True, **_help("Whole P×K batches only."))

    # ------------------------------------------------------------------ stage 1: prompt learning
    prompt_epochs: float = field(default=60, **_help("Stage-1 epochs over the cached features (> 0: stages 2-3 need "
                                                      "trained prompts; use --stages to stop earlier)."))
    prompt_batch_size: int = field(default=64, **_help("Stage-1 batch size (random batches of cached features)."))
    prompt_learning_rate: float = field(default=3.5e-4, **_help("Stage-1 Adam learning rate."))
    prompt_weight_decay: float = field(default=1e-4, **_help("Stage-1 Adam weight decay."))
    prompt_warmup_epochs: float = field(default=5, **_help("Stage-1 linear warm-up epochs before cosine decay."))
    prompt_lr_schedule: str = field(
        default="cosine",
        **_help("Stage-1 schedule: cosine (per step, warm-up from 0, decay to 0) or epoch_cosine (the reference's, "
                "per epoch: warm-up from --prompt_warmup_lr, cosine to --prompt_min_lr at the last epoch; the "
                "full-scale presets)."),
    )
    prompt_warmup_lr: float = field(default=1e-5, **_help("Stage-1 warm-up start lr of --prompt_lr_schedule epoch_cosine."))
    prompt_min_lr: float = field(default=1e-6, **_help("Stage-1 final lr of --prompt_lr_schedule epoch_cosine."))
    prompt_init_std: float = field(default=0.02, **_help("Std of the N(0, std) prompt vector initialisation."))

    # ------------------------------------------------------------------ stages 2–3: sampling and schedule
    num_identities_per_batch: int = field(default=16, **_help("P: intra-camera identities per batch."))
    num_instances: int = field(default=8, **_help("K: images per identity per batch."))
    iters_per_epoch: int | None = field(default=200, **_help("Steps per stage-2/3 epoch (reference 200); None = one sampler pass."))
    icdl_epochs: int = field(default=5, **_help("Stage-2 (ICDL) epochs (0: no ICDL training, ICAL starts from the "
                                                "stage-1 model)."))
    ical_epochs: int = field(default=75, **_help("Stage-3 (ICAL) epochs (epochs icdl_epochs..icdl_epochs+ical_epochs-1)."))
    bias_lr_factor: float = field(default=2.0, **_help("Learning-rate factor of bias parameters."))
    warmup_epochs: int = field(default=10, **_help("Linear warm-up epochs of the stage-2/3 loop."))
    warmup_factor: float = field(default=0.01, **_help("Warm-up starts at this fraction of the learning rate."))
    lr_decay_epochs: list[int] = field(
        default_factory=lambda: [40, 50],
        **_help("Epochs of the stage-2/3 loop where the lr is multiplied by gamma (e.g. --lr_decay_epochs 40 50)."),
    )
    lr_decay_gamma: float = field(default=0.1, **_help("Step decay factor."))
    optimizer: str = field(
        default="adam",
        **_help("Stages 2–3 optimiser of the image tower: adam (the paper's RN50 recipe) or sgd (momentum "
                "--sgd_momentum; the ViT-B/16 recipe). L2 weight decay in both; the global-ID classifier always "
                "has its own Adam."),
    )
    sgd_momentum: float = field(default=0.9, **_help("Momentum of --optimizer sgd."))
    freeze_patch_embedding: bool = field(
        default=False,
        **_help("Stages 2–3: keep the ViT patch projection (vision_model.embeddings.patch_embedding) frozen; "
                "a warning and no effect on a tower without one."),
    )
    max_grad_norm: float = field(
        default=0.0, **_help("Gradient clipping norm of stages 2–3; 0 = no clipping (the reference clips nothing).")
    )
    mixed_precision: str = field(
        default="no",
        **_help("no, fp16, bf16 or auto (bf16 where the GPU supports it, else fp16 with a loss scaler; fp32 on a "
                "CPU). --bf16/--fp16 still work. Losses are always computed in fp32."),
    )

    # ------------------------------------------------------------------ augmentation (docs/method.md §6)
    random_erasing_prob: float = field(default=0.5, **_help("Probability of random erasing in the train transform."))
    random_erasing_style: str = field(
        default="torchvision",
        **_help("torchvision (aspect ratio log-uniform, erased pixels set to the mean colour) or reference (the "
                "authors' code: aspect uniform in [0.3, 1/0.3], pixels set to 0.485/0.456/0.406 after normalising)."),
    )
    image_normalization: str = field(
        default="processor",
        **_help("Input normalisation, stored with the trained model's processor: processor (the base model's, "
                "CLIP's statistics for CLIP weights) or imagenet (the authors' code)."),
    )
    color_jitter: float = field(
        default=0.0,
        **_help("Extension (not in the paper): brightness/contrast/saturation jitter of this strength (hue a "
                "quarter of it) in the train transform; 0 = off."),
    )

    # ------------------------------------------------------------------ losses (docs/method.md §4–§5)
    memory_temperature: float = field(default=0.05, **_help("τ of camera and global memories."))
    memory_momentum: float = field(default=0.1, **_help("m: centroid ← m·old + (1−m)·new."))
    memory_instances: int = field(default=32, **_help("I: instance slots per identity in the camera memories."))
    memory_lambda: float = field(default=0.6, **_help("λ: λ·centroid + (1−λ)·hard-instance loss (0.0 for MSMT17)."))
    triplet_margin: float = field(default=0.3, **_help("Margin of the triplet losses."))
    label_smoothing: float = field(default=0.1, **_help("Label smoothing of the image–text losses."))
    association_rate: float = field(default=1.7, **_help("M = rate × N closest cross-camera pairs considered."))
    association_camera_centering: bool = field(
        default=False,
        **_help("Extension (not in the paper): subtract each camera's mean identity feature before association. "
                "Helps towers without CLIP's camera robustness (the random tiny demo model)."),
    )
    ical_image_text_start_epoch: int = field(default=10, **_help("First loop epoch of the inter-camera image–text loss."))
    adversarial_start_epoch: int = field(default=40, **_help("First loop epoch of the adversarial loss."))
    adversarial_end_epoch: int = field(default=49, **_help("Last loop epoch (inclusive) of the adversarial loss."))
    adversarial_margin: float = field(default=0.7, **_help("Additive angular margin m on the own identity."))
    adversarial_epsilon: float = field(default=0.8, **_help("ε: target mass spread over the positives."))
    adversarial_tau: float = field(default=0.2, **_help("τ of the same-camera negative re-weighting (1+τ)·z + τ."))
    classifier_scale: float = field(default=16.0, **_help("Scale of the global-ID cosine classifier."))
    classifier_learning_rate: float = field(default=3.5e-4, **_help("Adam lr of the global-ID classifier."))
    classifier_weight_decay: float = field(default=5e-4, **_help("Weight decay of the global-ID classifier."))

    # ------------------------------------------------------------------ ablations (one switch per loss family)
    use_memory_loss: bool = field(default=True, **_help("Camera-memory (stage 2) and global-memory (stage 3) losses."))
    use_image_text_loss: bool = field(default=True, **_help("Intra- (stage 2) and inter-camera (stage 3) image–text losses."))
    use_triplet_loss: bool = field(default=True, **_help("Triplet losses (batch-hard and centroid)."))
    use_adversarial_loss: bool = field(default=True, **_help("Camera-adversarial loss of stage 3."))

    # ------------------------------------------------------------------ evaluation
    eval_flip: bool = field(default=False, **_help("Average features with the horizontal flip at evaluation."))
    eval_rerank: bool = field(default=False, **_help("k-reciprocal re-ranking at evaluation."))
    eval_every_epochs: int = field(
        default=0,
        **_help("Also evaluate on query/gallery after every N-th epoch of the stage-2/3 loop (loop epochs N, 2N, ... "
                "counted from 1; the full-scale presets: 10, as the reference); 0 = at the stage ends only. Every "
                "evaluation is logged (report_to); eval_results.json reports the final model and records the best "
                "evaluation under best_on_test (chosen on the test set: optimistic, as the reference reports)."),
    )
    save_best_checkpoint: bool = field(
        default=False,
        **_help("Keep the model of the best_on_test evaluation in checkpoints/icdl_ical/best_on_test/ (a model "
                "folder, loadable with from_pretrained); chosen on the test set."),
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
        super().__post_init__()
        self.stages = parse_stages(self.stages)
        self.lr_decay_epochs = parse_int_list(self.lr_decay_epochs, "--lr_decay_epochs")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: camera and identity columns feed the losses")
        validate_training_arguments(self)

    def _resolve_mixed_precision(self) -> None:
        """Turn ``mixed_precision`` (no|fp16|bf16|auto) and ``--bf16``/``--fp16`` into one concrete choice."""
        explicit = resolve_mixed_precision(self.mixed_precision, bf16=self.bf16, fp16=self.fp16,
                                           device="cpu" if self.use_cpu else None)
        self.bf16, self.fp16 = explicit == "bf16", explicit == "fp16"
        self.mixed_precision = explicit

    @property
    def pk_batch_size(self) -> int:
        """P × K images per batch of stages 2–3."""
        return self.num_identities_per_batch * self.num_instances

    def stage_output_dir(self, stage: str) -> str:
        """Checkpoint folder of one stage: ``output_dir/checkpoints/<stage>``."""
        return os.path.join(self.output_dir, "checkpoints", stage)

    def stage_arguments(self, stage: str) -> CCAFLTrainingArguments:
        """A copy configured for one stage's `Trainer` (its epochs, batch size, lr and checkpoint folder)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        common = {
            "output_dir": self.stage_output_dir(stage),
            "push_to_hub": False,  # the whole output folder is pushed once at the end
            "remove_unused_columns": False,
        }
        if stage == "prompt":
            warm = self.prompt_warmup_epochs / self.prompt_epochs if self.prompt_epochs else 0.0
            specific = {
                "num_train_epochs": self.prompt_epochs,
                "per_device_train_batch_size": self.prompt_batch_size,
                "learning_rate": self.prompt_learning_rate,
                "weight_decay": self.prompt_weight_decay,
                "lr_scheduler_type": "cosine",
                "warmup_steps": min(warm, 0.999),
                "dataloader_drop_last": False,
            }
        else:
            specific = {
                "num_train_epochs": self.icdl_epochs if stage == "icdl" else self.ical_epochs,
                "per_device_train_batch_size": self.pk_batch_size,
                "dataloader_drop_last": True,
            }
        return dataclasses.replace(self, **common, **specific)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _items(value: str | list | tuple) -> list[str]:
    """``"a,b"``, ``["a", "b"]`` or ``["a,b"]`` -> ``["a", "b"]``."""
    values = [value] if isinstance(value, str) else list(value)
    return [item.strip() for v in values for item in str(v).split(",") if item.strip()]


def parse_stages(stages: str | list[str] | tuple[str, ...]) -> list[str]:
    """Validate ``stages`` (a prefix of ``prompt icdl ical``, as a list or a comma-separated string) and return
    it as a list."""
    items = _items(stages)
    if not items or items != list(STAGES[: len(items)]):
        shown = " ".join(_items(stages)) if not isinstance(stages, str) else stages
        raise ValueError(f"--stages must be a prefix of {' '.join(STAGES)} (e.g. --stages prompt icdl), got {shown!r}")
    return items


# ------------------------------------------------------------------------------------- validation
def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _at_least(low):
    return lambda v: _finite(v) and v >= low


def _above(low):
    return lambda v: _finite(v) and v > low


def _within(low, high):
    return lambda v: _finite(v) and low <= v <= high


def _optional(check):
    return lambda v: v is None or check(v)


#: (field, check, what a valid value is): every numeric setting has a range, checked before any work.
ARGUMENT_RANGES = (
    ("learning_rate", _above(0), "a finite number > 0"),
    ("weight_decay", _at_least(0), "a finite number >= 0"),
    ("per_device_eval_batch_size", _at_least(1), "an integer >= 1"),
    ("seed", _within(0, 2**32 - 1), "an integer in [0, 2**32 - 1]"),
    ("prompt_epochs", _above(0), "> 0 (stages 2-3 need trained prompts; use --stages to stop earlier)"),
    ("prompt_batch_size", _at_least(1), "an integer >= 1"),
    ("prompt_learning_rate", _above(0), "a finite number > 0"),
    ("prompt_weight_decay", _at_least(0), "a finite number >= 0"),
    ("prompt_warmup_epochs", _at_least(0), "a finite number >= 0"),
    ("prompt_init_std", _above(0), "a finite number > 0"),
    ("prompt_warmup_lr", _at_least(0), "a finite number >= 0"),
    ("prompt_min_lr", _at_least(0), "a finite number >= 0"),
    ("num_identities_per_batch", _at_least(2), "an integer >= 2 (P: a batch needs two identities to contrast)"),
    ("num_instances", _at_least(1), "an integer >= 1 (K)"),
    ("iters_per_epoch", _optional(_at_least(1)), "an integer >= 1, or None for one sampler pass"),
    ("icdl_epochs", _at_least(0), "an integer >= 0 (0: no ICDL training)"),
    ("ical_epochs", _at_least(1), "an integer >= 1 (use --stages prompt,icdl to stop before ICAL)"),
    ("bias_lr_factor", _above(0), "a finite number > 0"),
    ("warmup_epochs", _at_least(0), "an integer >= 0"),
    ("warmup_factor", _within(0, 1), "a number in [0, 1]"),
    ("lr_decay_gamma", _within(0, 1), "a number in [0, 1]"),
    ("sgd_momentum", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("max_grad_norm", _at_least(0), ">= 0 (0 = no clipping)"),
    ("random_erasing_prob", _within(0, 1), "a probability in [0, 1]"),
    ("color_jitter", _within(0, 2), "a number in [0, 2] (0 = off)"),
    ("memory_temperature", _above(0), "a finite number > 0"),
    ("memory_momentum", _within(0, 1), "a number in [0, 1]"),
    ("memory_instances", _at_least(1), "an integer >= 1"),
    ("memory_lambda", _within(0, 1), "a number in [0, 1]"),
    ("triplet_margin", _at_least(0), "a finite number >= 0"),
    ("label_smoothing", _within(0, 0.999), "a number in [0, 1)"),
    ("association_rate", _above(0), "a finite number > 0 (M = rate x N pairs)"),
    ("ical_image_text_start_epoch", _at_least(0), "an integer >= 0"),
    ("adversarial_start_epoch", _at_least(0), "an integer >= 0"),
    ("adversarial_end_epoch", _at_least(0), "an integer >= --adversarial_start_epoch"),
    ("adversarial_margin", _at_least(0), "a finite number >= 0"),
    ("adversarial_epsilon", _within(0, 1), "a number in [0, 1]"),
    ("adversarial_tau", _at_least(0), "a finite number >= 0"),
    ("classifier_scale", _above(0), "a finite number > 0"),
    ("classifier_learning_rate", _above(0), "a finite number > 0"),
    ("classifier_weight_decay", _at_least(0), "a finite number >= 0"),
    ("eval_every_epochs", _at_least(0), "an integer >= 0 (0 = evaluate at the stage ends only)"),
)


def validate_training_arguments(args: CCAFLTrainingArguments) -> None:
    """Check every `ARGUMENT_RANGES` entry (and the relations between fields); raise `ValueError` naming the
    first bad flag, its value and what is expected."""
    for name, choices in (("random_erasing_style", ERASING_STYLES), ("image_normalization", IMAGE_NORMALIZATIONS)):
        if getattr(args, name) not in choices:
            raise ValueError(f"--{name} must be one of {', '.join(choices)}, got {getattr(args, name)!r}")
    if args.prompt_lr_schedule not in PROMPT_LR_SCHEDULES:
        raise ValueError(f"--prompt_lr_schedule must be one of {', '.join(PROMPT_LR_SCHEDULES)}, "
                         f"got {args.prompt_lr_schedule!r}")
    if args.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {args.optimizer!r}")
    for name, check, expected in ARGUMENT_RANGES:
        value = getattr(args, name)
        if not check(value):
            raise ValueError(f"--{name} must be {expected}, got {value}")
    if args.adversarial_end_epoch < args.adversarial_start_epoch:
        raise ValueError(f"--adversarial_end_epoch ({args.adversarial_end_epoch}) must be >= "
                         f"--adversarial_start_epoch ({args.adversarial_start_epoch})")


def parse_int_list(value: str | list[int], flag: str) -> list[int]:
    """A list of integers >= 0 (also given as ``"40,50"``); a `ValueError` naming ``flag`` otherwise."""
    items = _items(value)
    if not all(e.isdigit() for e in items):
        raise ValueError(f"{flag} must be integers >= 0 (e.g. {flag} 40 50), got {value!r}")
    return [int(e) for e in items]


__all__ = ["ARGUMENT_RANGES", "MIXED_PRECISIONS", "OPTIMIZERS", "STAGES", "CCAFLTrainingArguments", "parse_int_list",
           "parse_stages", "validate_training_arguments"]
