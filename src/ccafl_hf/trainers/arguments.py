"""Training arguments of the three CCAFL stages (METHOD.md §3–§6), as a `TrainingArguments` subclass.

Defaults are the reference settings for Market-1501; per-dataset values come from the packaged
presets (`ccafl_hf/presets/*.json`), never from `if dataset == ...` branches. Epoch numbers of the
ICAL windows count in the joint stage-2/3 loop of the paper (ICDL epochs first, then ICAL), so the
paper's "adversarial epochs 40–49" is written as it is.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

STAGES = ("prompt", "icdl", "ical")
OPTIMIZERS = ("adam", "sgd")
MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")


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
        default=False, **_help("Replace the checkpoints of another run found in output_dir instead of refusing.")
    )
    stages: str = field(default="prompt,icdl,ical", **_help("Comma-separated prefix of prompt,icdl,ical to run."))
    remove_unused_columns: bool = field(default=False, **_help("Keep camera/identity columns (must stay False)."))
    learning_rate: float = field(default=3.5e-4, **_help("Stages 2–3 base learning rate (Adam; biases ×2)."))
    weight_decay: float = field(default=5e-4, **_help("Stages 2–3 weight decay (L2, as the reference Adam)."))
    logging_strategy: str = field(default="epoch", **_help("Log once per epoch by default."))
    save_strategy: str = field(default="epoch", **_help("Checkpoint every epoch (resume continues mid-stage)."))
    save_total_limit: int | None = field(default=2, **_help("Checkpoints kept per stage."))
    dataloader_drop_last: bool = field(default=True, **_help("Whole P×K batches only."))

    # ------------------------------------------------------------------ stage 1: prompt learning
    prompt_epochs: float = field(default=60, **_help("Stage-1 epochs over the cached features."))
    prompt_batch_size: int = field(default=64, **_help("Stage-1 batch size (random batches of cached features)."))
    prompt_learning_rate: float = field(default=3.5e-4, **_help("Stage-1 Adam learning rate."))
    prompt_weight_decay: float = field(default=1e-4, **_help("Stage-1 Adam weight decay."))
    prompt_warmup_epochs: float = field(default=5, **_help("Stage-1 linear warm-up epochs before cosine decay."))
    prompt_init_std: float = field(default=0.02, **_help("Std of the N(0, std) prompt vector initialisation."))

    # ------------------------------------------------------------------ stages 2–3: sampling and schedule
    num_identities_per_batch: int = field(default=16, **_help("P: intra-camera identities per batch."))
    num_instances: int = field(default=8, **_help("K: images per identity per batch."))
    iters_per_epoch: int | None = field(default=200, **_help("Steps per stage-2/3 epoch (reference 200); None = one sampler pass."))
    icdl_epochs: int = field(default=5, **_help("Stage-2 (ICDL) epochs."))
    ical_epochs: int = field(default=75, **_help("Stage-3 (ICAL) epochs (epochs icdl_epochs..icdl_epochs+ical_epochs-1)."))
    bias_lr_factor: float = field(default=2.0, **_help("Learning-rate factor of bias parameters."))
    warmup_epochs: int = field(default=10, **_help("Linear warm-up epochs of the stage-2/3 loop."))
    warmup_factor: float = field(default=0.01, **_help("Warm-up starts at this fraction of the learning rate."))
    lr_decay_epochs: str = field(default="40,50", **_help("Epochs of the stage-2/3 loop where the lr is multiplied by gamma."))
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

    # ------------------------------------------------------------------ augmentation (METHOD.md §6)
    random_erasing_prob: float = field(default=0.5, **_help("Probability of random erasing in the train transform."))
    color_jitter: float = field(
        default=0.0,
        **_help("Extension (not in the paper): brightness/contrast/saturation jitter of this strength (hue a "
                "quarter of it) in the train transform; 0 = off."),
    )

    # ------------------------------------------------------------------ losses (METHOD.md §4–§5)
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

    # ------------------------------------------------------------------ resources
    torch_num_threads: int | None = field(
        default=None,
        **_help("CPU threads of torch's intra-op pool (torch.set_num_threads, process-wide) for the run; None = "
                "torch's default. The demo preset sets 1: the tiny model gains ~20% from a 2nd thread on an idle "
                "2-core CPU but runs 2.5-10x slower with it when another job holds the other core (spin-waits)."),
    )

    # ------------------------------------------------------------------ evaluation
    eval_flip: bool = field(default=False, **_help("Average features with the horizontal flip at evaluation."))
    eval_rerank: bool = field(default=False, **_help("k-reciprocal re-ranking at evaluation."))

    # ------------------------------------------------------------------ optimiser recipe and precision
    optimizer: str = field(default="adam", **_help("Stages 2–3 optimiser: adam (the paper's RN50 recipe) or sgd."))
    sgd_momentum: float = field(default=0.9, **_help("Momentum of --optimizer sgd."))
    freeze_patch_embedding: bool = field(default=False, **_help("Keep the ViT patch projection frozen in stages 2–3."))
    max_grad_norm: float = field(default=0.0, **_help("Gradient clipping norm; 0 = no clipping (the reference)."))
    mixed_precision: str = field(
        default="no", **_help("no, bf16, fp16 or auto (bf16 where supported, else fp16 on a GPU; fp32 on a CPU).")
    )

    def __post_init__(self):
        self._resolve_mixed_precision()
        if not _cuda_available() and (self.bf16 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            self.use_cpu = True  # bf16 autocast or several processes (gloo) on a CPU: accelerate needs to be told
        if self.dataloader_pin_memory and not _cuda_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator
        super().__post_init__()
        self.stage_list = parse_stages(self.stages)
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: camera and identity columns feed the losses")
        for name in ("num_identities_per_batch", "num_instances", "icdl_epochs", "prompt_batch_size"):
            if getattr(self, name) < (0 if name == "icdl_epochs" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1 or None, got {self.iters_per_epoch}")
        if self.torch_num_threads is not None and self.torch_num_threads < 1:
            raise ValueError(f"torch_num_threads must be >= 1 or None, got {self.torch_num_threads}")
        if not 0.0 <= self.random_erasing_prob <= 1.0:
            raise ValueError(f"random_erasing_prob must lie in [0, 1], got {self.random_erasing_prob}")
        if self.color_jitter < 0.0:
            raise ValueError(f"color_jitter must be >= 0, got {self.color_jitter}")
        if not 0.0 <= self.memory_lambda <= 1.0:
            raise ValueError(f"memory_lambda must lie in [0, 1], got {self.memory_lambda}")
        if self.adversarial_end_epoch < self.adversarial_start_epoch:
            raise ValueError("adversarial_end_epoch must be >= adversarial_start_epoch")
        self.lr_decay_epoch_list = [int(e) for e in str(self.lr_decay_epochs).split(",") if e.strip()]
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0.0 <= self.sgd_momentum < 1.0:
            raise ValueError(f"--sgd_momentum must lie in [0, 1), got {self.sgd_momentum}")
        if self.max_grad_norm is None or self.max_grad_norm < 0:
            raise ValueError(f"--max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")

    def _resolve_mixed_precision(self) -> None:
        """Turn ``mixed_precision`` (no|fp16|bf16|auto) and ``--bf16``/``--fp16`` into one concrete choice."""
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 exclude each other")
        explicit = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        if explicit is None and self.mixed_precision == "auto" and _cuda_available():
            import torch

            explicit = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif explicit is None and self.mixed_precision in ("bf16", "fp16"):
            explicit = self.mixed_precision
        elif explicit is not None and self.mixed_precision in ("bf16", "fp16") and self.mixed_precision != explicit:
            raise ValueError(f"--mixed_precision {self.mixed_precision} contradicts --{explicit}")
        self.bf16, self.fp16 = explicit == "bf16", explicit == "fp16"
        self.mixed_precision = explicit or "no"

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


def parse_stages(stages: str | list[str] | tuple[str, ...]) -> list[str]:
    """Validate ``stages`` (a comma-separated prefix of ``prompt,icdl,ical``) and return it as a list."""
    items = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    if not items or items != list(STAGES[: len(items)]):
        raise ValueError(
            f"--stages must be a prefix of {','.join(STAGES)} (e.g. 'prompt' or 'prompt,icdl'), got {stages!r}"
        )
    return items


__all__ = ["MIXED_PRECISIONS", "OPTIMIZERS", "STAGES", "CCAFLTrainingArguments", "parse_stages"]
