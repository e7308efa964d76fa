"""The per-trainer configs: `PromptLearningConfig` (stage 1) and `CCAFLTrainerConfig` (stages 2–3).

Each is a `TrainingArguments` subclass holding what its `Trainer` runs with, TRL-style
(``SFTConfig`` → ``SFTTrainer``). The command line's [`CCAFLTrainingArguments`] builds them once
(`prompt_config()`, `loop_config()`); they can also be made directly in Python. The stage-2/3 config
derives the Trainer's own schedule fields (epochs, batch size) from the CCAFL ones, so those are never
set twice.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from ..errors import ArgumentError
from .validation import check_ranges

#: the stages of the stage-2/3 loop, in order
IMAGE_STAGES = ("icdl", "ical")
OPTIMIZERS = ("adam", "sgd")


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


def _items(value: str | list | tuple) -> list[str]:
    """``"a,b"``, ``["a", "b"]`` or ``["a,b"]`` -> ``["a", "b"]``."""
    values = [value] if isinstance(value, str) else list(value)
    return [item.strip() for v in values for item in str(v).split(",") if item.strip()]


def parse_int_list(value: str | list[int], flag: str) -> list[int]:
    """A list of integers >= 0 (also given as ``"40,50"``); an `ArgumentError` naming ``flag`` otherwise."""
    items = _items(value)
    if not all(e.isdigit() for e in items):
        raise ArgumentError(f"{flag} must be integers >= 0 (e.g. {flag} 40 50), got {value!r}")
    return [int(e) for e in items]


def precision_of(args: TrainingArguments) -> str:
    """``"bf16"``, ``"fp16"`` or ``"no"``: the autocast of a resolved arguments object (feature extraction)."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "no"


def extraction_options(args: TrainingArguments, flip: bool = False):
    """The `ExtractionOptions` of a resolved arguments object: its eval batch size, workers, autocast and
    progress bar."""
    from ..evaluation.extraction import ExtractionOptions

    return ExtractionOptions(batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
                             mixed_precision=precision_of(args), flip=flip, progress=not args.disable_tqdm)


def derive(cls, source: TrainingArguments, skip=(), **overrides):
    """An instance of the `TrainingArguments` subclass ``cls`` with every field ``source`` shares with it
    except ``skip`` (those keep ``cls``'s defaults), then ``overrides`` (built once: ``__post_init__`` runs once
    on the result)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init} - set(skip)
    values = {f.name: getattr(source, f.name) for f in dataclasses.fields(source) if f.init and f.name in names}
    return cls(**{**values, **overrides})


@dataclass
class PromptLearningConfig(TrainingArguments):
    """Stage 1 ([`PromptLearningTrainer`]): Adam on the identity prompts over cached features, cosine schedule
    with a linear warm-up (``warmup_steps`` below 1 is a fraction of the steps). The defaults are the
    reference settings."""

    output_dir: str | None = field(default="outputs/ccafl-prompt", **_help("Checkpoints of stage 1."))
    num_train_epochs: float = field(default=60, **_help("Epochs over the cached features."))
    per_device_train_batch_size: int = field(default=64, **_help("Random batches of cached features."))
    learning_rate: float = field(default=3.5e-4, **_help("Adam learning rate."))
    weight_decay: float = field(default=1e-4, **_help("Adam (L2) weight decay."))
    lr_scheduler_type: str = field(default="cosine", **_help("Cosine decay after the warm-up."))
    warmup_steps: float = field(default=5 / 60, **_help("Warm-up: a fraction of the steps (< 1) or a count."))
    remove_unused_columns: bool = field(default=False, **_help("Must stay False."))
    dataloader_drop_last: bool = field(default=False, **_help("Keep the last, smaller batch."))
    logging_strategy: str = field(default="epoch", **_help("Log once per epoch."))
    save_strategy: str = field(default="epoch", **_help("Checkpoint every epoch."))
    save_total_limit: int | None = field(default=2, **_help("Checkpoints kept."))
    logging_nan_inf_filter: bool = field(default=False, **_help("Never drop a NaN loss from the log."))
    prompt_lr_schedule: Literal["cosine", "epoch_cosine"] = field(
        default="cosine",
        **_help("cosine: the Trainer's per-step cosine after the warmup_steps warm-up (from 0, decay to 0); "
                "epoch_cosine: the reference's per-epoch schedule (`prompt_epoch_lr`), warm-up from "
                "prompt_warmup_lr over prompt_warmup_epochs, cosine to prompt_min_lr at the last epoch."),
    )
    prompt_warmup_epochs: float = field(default=5, **_help("Warm-up epochs of prompt_lr_schedule epoch_cosine "
                                                           "(cosine: warmup_steps)."))
    prompt_warmup_lr: float = field(default=1e-5, **_help("Warm-up start lr of prompt_lr_schedule epoch_cosine."))
    prompt_min_lr: float = field(default=1e-6, **_help("Final lr of prompt_lr_schedule epoch_cosine."))

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self)

    @property
    def extraction_precision(self) -> str:
        """Autocast of the feature cache: ``"bf16"``, ``"fp16"`` or ``"no"``."""
        return precision_of(self)


@dataclass
class CCAFLTrainerConfig(TrainingArguments):
    """Stages 2–3 ([`CCAFLTrainer`]): the P×K sampling, the loop schedule, the optimisers, the loss
    hyper-parameters and the stage-end evaluation. Loop epochs count from the first ICDL epoch (ICDL
    epochs, then ICAL), so the paper's "adversarial epochs 40–49" is written as it is.

    ``num_train_epochs`` and ``per_device_train_batch_size`` are derived (the epochs of ``stages``; P × K).
    """

    output_dir: str | None = field(default="outputs/ccafl-demo", metadata={"help": "Where checkpoints and the final model go."})
    remove_unused_columns: bool = field(default=False, **_help("Keep camera/identity columns (must stay False)."))
    learning_rate: float = field(default=3.5e-4, **_help("Stages 2–3 base learning rate (Adam; biases ×2)."))
    weight_decay: float = field(default=5e-4, **_help("Stages 2–3 weight decay (L2, as the reference Adam)."))
    logging_strategy: str = field(default="epoch", **_help("Log once per epoch by default."))
    logging_nan_inf_filter: bool = field(default=False, **_help("Never drop a NaN loss from the log (a non-finite "
                                                                 "loss stops the run with one error line)."))
    save_strategy: str = field(default="epoch", **_help("Checkpoint every epoch (resume continues mid-stage)."))
    save_total_limit: int | None = field(default=2, **_help("Checkpoints kept per stage."))
    dataloader_drop_last: bool = field(default=True, **_help("Whole P×K batches only."))
    max_grad_norm: float = field(
        default=0.0, **_help("Gradient clipping norm of stages 2–3; 0 = no clipping (the reference clips nothing).")
    )
    stages: list[str] = field(
        default_factory=lambda: list(IMAGE_STAGES),
        **_help("The stages to run: a prefix of prompt icdl ical (e.g. --stages prompt icdl; prompt,icdl also works)."),
    )

    # ------------------------------------------------------------------ sampling and schedule
    num_identities_per_batch: int = field(default=16, **_help("P: intra-camera identities per batch."))
    num_instances: int = field(default=8, **_help("K: images per identity per batch."))
    pk_sampling: Literal["identity", "image"] = field(
        default="identity",
        **_help("P×K sampler rule: identity (every identity gives one K-image chunk per pass, whatever its image "
                "count: the authors' rule) or image (max(1, n // K) chunks per identity: nearly every image once "
                "per pass, identities with many images drawn more often, torchreid's rule)."),
    )
    scale_batch_with_processes: bool = field(
        default=False,
        **_help("Several processes: every process draws a whole P×K batch, so N processes train with N×P×K images "
                "per step and see N× the images per epoch at the same learning rate and iterations: another recipe "
                "than the preset's (to keep the images per epoch divide --iters_per_epoch by N; a larger batch "
                "usually also wants a retuned --learning_rate). Default (off): P×K is the global batch, each process "
                "draws P/N identities, and the recipe is the same on any number of processes."),
    )
    sync_batchnorm: bool = field(
        default=True,
        **_help("Several processes: synchronise the BatchNorm layers (RN50 tower, BN neck) across processes so "
                "their statistics are those of the global batch (--sync_batchnorm False: per-process "
                "statistics). No effect with one process."),
    )
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
    optimizer: Literal["adam", "sgd"] = field(
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
    adversarial_margin: float = field(default=0.7, **_help("Additive angular margin m on the own identity (radians)."))
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
        self._check_process_split()  # before the distributed state is set up by TrainingArguments
        super().__post_init__()
        self.lr_decay_epochs = parse_int_list(self.lr_decay_epochs, "--lr_decay_epochs")
        if self.optimizer not in OPTIMIZERS:
            raise ArgumentError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.remove_unused_columns:
            raise ArgumentError("remove_unused_columns must be False: camera and identity columns feed the losses")
        check_ranges(self)
        self._derive_loop_fields()

    def _check_process_split(self) -> None:
        """Before any work: with several processes (``WORLD_SIZE`` of the launcher), P divisible by their
        number unless every process draws a whole batch (one line naming P, N and the nearest valid P)."""
        from ..data.samplers import SAMPLING_RULES, identities_per_process

        if self.pk_sampling not in SAMPLING_RULES:
            raise ArgumentError(f"--pk_sampling must be one of {', '.join(SAMPLING_RULES)}, got {self.pk_sampling!r}")
        if not self.scale_batch_with_processes and isinstance(self.num_identities_per_batch, int) \
                and self.num_identities_per_batch > 0:  # other values: one line from the range checks
            identities_per_process(self.num_identities_per_batch, int(os.environ.get("WORLD_SIZE", "1")))

    def _derive_loop_fields(self) -> None:
        """The Trainer's own schedule fields, from the CCAFL ones: one epoch count, P×K batches, no step cap."""
        loop = self.loop_stages
        self.num_train_epochs = self.loop_epochs[1] - self.loop_epochs[0] if loop else 0
        self.max_steps = -1
        self.per_device_train_batch_size = self.pk_batch_size
        self.ddp_find_unused_parameters = True  # the visual projection idles while no image–text loss is active

    @property
    def loop_stages(self) -> tuple[str, ...]:
        """The stages of the loop (``stages`` without ``prompt``); a contiguous, ordered part of ``("icdl", "ical")``."""
        stages = tuple(s for s in self.stages if s != "prompt")
        if stages and stages != tuple(s for s in IMAGE_STAGES if s in stages):
            raise ArgumentError(f"the stages of the loop must be a contiguous, ordered part of {IMAGE_STAGES}, "
                                f"got {stages}")
        return stages

    @property
    def loop_epochs(self) -> tuple[int, int]:
        """``(first, end)`` loop epochs of ``stages`` (an ICAL-only loop starts at ``icdl_epochs``)."""
        stages = self.loop_stages
        first = 0 if not stages or stages[0] == "icdl" else self.icdl_epochs
        return first, first + sum(self.icdl_epochs if s == "icdl" else self.ical_epochs for s in stages)

    @property
    def pk_batch_size(self) -> int:
        """P × K images per batch of stages 2–3."""
        return self.num_identities_per_batch * self.num_instances

    @property
    def extraction_precision(self) -> str:
        """Autocast of feature extraction and evaluation: ``"bf16"``, ``"fp16"`` or ``"no"``."""
        return precision_of(self)

    def stage_output_dir(self, stage: str) -> str:
        """Checkpoint folder of one stage: ``output_dir/checkpoints/<stage>``."""
        return os.path.join(self.output_dir, "checkpoints", stage)


__all__ = [
    "IMAGE_STAGES",
    "OPTIMIZERS",
    "CCAFLTrainerConfig",
    "PromptLearningConfig",
    "derive",
    "extraction_options",
    "parse_int_list",
    "precision_of",
]
