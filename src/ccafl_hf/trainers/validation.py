"""Ranges of every numeric training setting, checked before any work (one `ArgumentError` naming the flag).

`check_ranges` checks whichever of the `ARGUMENT_RANGES` (and `ARGUMENT_CHOICES`) fields an arguments object
has, so the CLI-level [`CCAFLTrainingArguments`] and the per-trainer configs share one table. `epoch_window_problems` lists the
epoch windows that lie past the end of the stage-2/3 loop; `check_against_data` compares sizes with the
data and the memory with the RAM (or GPU memory) available, once the data is known.
"""

from __future__ import annotations

import math

from ..data.transforms import ERASING_STYLES, IMAGE_NORMALIZATIONS
from ..errors import ArgumentError
from .schedules import PROMPT_LR_SCHEDULES

#: the smallest memory temperature: logits grow as 1/τ (τ = 1e-30 gives a loss of 1e30 and infinite gradients)
MIN_TEMPERATURE = 1e-3


def _finite(value) -> bool:
    return value is not None and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low, high=math.inf):
    return lambda v: _finite(v) and low <= v <= high


def _above(low, high=math.inf):
    return lambda v: _finite(v) and low < v <= high


def _between(low, high):
    """The open interval (low, high)."""
    return lambda v: _finite(v) and low < v < high


def _optional(check):
    return lambda v: v is None or check(v)


#: (field, check, what a valid value is): every numeric setting has a range.
ARGUMENT_RANGES = (
    ("learning_rate", _above(0, 1), "a number in (0, 1]"),
    ("weight_decay", _at_least(0, 1), "a number in [0, 1]"),
    ("per_device_eval_batch_size", _at_least(1), "an integer >= 1"),
    ("seed", _at_least(0, 2**32 - 1), "an integer in [0, 2**32 - 1]"),
    ("prompt_epochs", _above(0), "> 0 (stages 2-3 need trained prompts; use --stages to stop earlier)"),
    ("prompt_batch_size", _at_least(1), "an integer >= 1"),
    ("prompt_learning_rate", _above(0, 1), "a number in (0, 1]"),
    ("prompt_weight_decay", _at_least(0, 1), "a number in [0, 1]"),
    ("prompt_warmup_epochs", _at_least(0), "a finite number >= 0"),
    ("prompt_init_std", _above(0, 1), "a number in (0, 1] (the reference: 0.02)"),
    ("prompt_warmup_lr", _at_least(0, 1), "a number in [0, 1]"),
    ("prompt_min_lr", _at_least(0, 1), "a number in [0, 1]"),
    ("num_identities_per_batch", _at_least(2), "an integer >= 2 (P: a batch needs two identities to contrast)"),
    ("num_instances", _at_least(2), "an integer >= 2 (K: batch-hard triplets need two images of an identity)"),
    ("iters_per_epoch", _optional(_at_least(1)), "an integer >= 1, or None for one sampler pass"),
    ("icdl_epochs", _at_least(0), "an integer >= 0 (0: no ICDL training)"),
    ("ical_epochs", _at_least(1), "an integer >= 1 (use --stages prompt,icdl to stop before ICAL)"),
    ("bias_lr_factor", _above(0, 100), "a number in (0, 100]"),
    ("warmup_epochs", _at_least(0), "an integer >= 0"),
    ("warmup_factor", _at_least(0, 1), "a number in [0, 1]"),
    ("lr_decay_gamma", _at_least(0, 1), "a number in [0, 1]"),
    ("sgd_momentum", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("max_grad_norm", _at_least(0), "a finite number >= 0 (0 = no clipping)"),
    ("random_erasing_prob", _at_least(0, 1), "a probability in [0, 1]"),
    ("color_jitter", _at_least(0, 2), "a number in [0, 2] (0 = off)"),
    ("memory_temperature", _at_least(MIN_TEMPERATURE, 10),
     f"a number in [{MIN_TEMPERATURE:g}, 10] (logits scale as 1/temperature: smaller overflows the loss)"),
    ("memory_momentum", _at_least(0, 1), "a number in [0, 1]"),
    ("memory_instances", _at_least(1), "an integer >= 1"),
    ("memory_lambda", _at_least(0, 1), "a number in [0, 1]"),
    ("triplet_margin", _at_least(0, 4), "a number in [0, 4] (distances of unit features are at most 2)"),
    ("label_smoothing", _at_least(0, 0.999), "a number in [0, 1)"),
    ("association_rate", _above(0, 100), "a number in (0, 100] (M = rate x N pairs)"),
    ("ical_image_text_start_epoch", _at_least(0), "an integer >= 0"),
    ("adversarial_start_epoch", _at_least(0), "an integer >= 0"),
    ("adversarial_end_epoch", _at_least(0), "an integer >= --adversarial_start_epoch"),
    ("adversarial_margin", _between(0, math.pi), "an angle in radians in (0, pi) (the reference: 0.7)"),
    ("adversarial_epsilon", _at_least(0, 1), "a number in [0, 1]"),
    ("adversarial_tau", _at_least(0, 10), "a number in [0, 10]"),
    ("classifier_scale", _above(0, 100), "a number in (0, 100] (logits scale with it: larger overflows the loss)"),
    ("classifier_learning_rate", _above(0, 1), "a number in (0, 1]"),
    ("classifier_weight_decay", _at_least(0, 1), "a number in [0, 1]"),
    ("eval_every_epochs", _at_least(0), "an integer >= 0 (0 = evaluate at the stage ends only)"),
)

#: (field, allowed values) of every setting with a fixed set of choices
ARGUMENT_CHOICES = (
    ("prompt_lr_schedule", PROMPT_LR_SCHEDULES),
    ("random_erasing_style", ERASING_STYLES),
    ("image_normalization", IMAGE_NORMALIZATIONS),
)


def check_ranges(args) -> None:
    """Check every `ARGUMENT_RANGES` field ``args`` has (and the relations between fields); an `ArgumentError`
    names the first bad flag, its value and what is expected."""
    for name, choices in ARGUMENT_CHOICES:
        if hasattr(args, name) and getattr(args, name) not in choices:
            raise ArgumentError(f"--{name} must be one of {', '.join(choices)}, got {getattr(args, name)!r}")
    for name, check, expected in ARGUMENT_RANGES:
        if hasattr(args, name) and not check(getattr(args, name)):
            raise ArgumentError(f"--{name} must be {expected}, got {getattr(args, name)}")
    start, end = getattr(args, "adversarial_start_epoch", 0), getattr(args, "adversarial_end_epoch", 0)
    if end < start:
        raise ArgumentError(f"--adversarial_end_epoch ({end}) must be >= --adversarial_start_epoch ({start})")


def epoch_window_problems(args) -> dict[str, str]:
    """``{flag: message}`` for every epoch setting that lies past the last epoch of the stage-2/3 loop (so
    it would never take effect, or never finish): the adversarial and image–text windows, the lr decay
    epochs and the warm-up. Loop epochs count from the first ICDL epoch."""
    total = args.icdl_epochs + args.ical_epochs
    last = total - 1
    problems: dict[str, str] = {}
    if args.ical_epochs and getattr(args, "use_adversarial_loss", True) and args.adversarial_start_epoch > last:
        problems["adversarial_start_epoch"] = (
            f"--adversarial_start_epoch {args.adversarial_start_epoch} is past the last loop epoch ({last} = "
            f"--icdl_epochs {args.icdl_epochs} + --ical_epochs {args.ical_epochs} - 1): the adversarial loss "
            "would never run")
    if args.ical_epochs and getattr(args, "use_image_text_loss", True) and args.ical_image_text_start_epoch > last:
        problems["ical_image_text_start_epoch"] = (
            f"--ical_image_text_start_epoch {args.ical_image_text_start_epoch} is past the last loop epoch "
            f"({last}): the inter-camera image-text loss would never run")
    late = [e for e in args.lr_decay_epochs if e > last]
    if late:
        problems["lr_decay_epochs"] = (
            f"--lr_decay_epochs {' '.join(map(str, late))} is past the last loop epoch ({last}): that decay "
            "would never apply")
    if args.warmup_epochs > total:
        problems["warmup_epochs"] = (
            f"--warmup_epochs {args.warmup_epochs} is longer than the stage-2/3 loop ({total} epochs): the "
            "learning rate would never reach --learning_rate")
    return problems


def camera_memory_bytes(num_identities: int, memory_instances: int, feature_dim: int) -> int:
    """Bytes of the fp32 camera memories: centroids ``[N, D]`` and instance slots ``[N, I, D]``."""
    return 4 * num_identities * feature_dim * (memory_instances + 1)


def available_memory_bytes(device) -> int:
    """Free memory of ``device``: the GPU's free memory for CUDA, else the RAM available to this process."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check_against_data(args, num_identities: int, feature_dim: int, device) -> None:
    """Sizes against the data: P against the number of training identities, and the camera memories
    (``--memory_instances`` slots per identity) against the memory free on ``device``."""
    if args.num_identities_per_batch > num_identities:
        raise ArgumentError(f"--num_identities_per_batch {args.num_identities_per_batch} is more than the "
                            f"{num_identities} intra-camera identities of the train split")
    needed = camera_memory_bytes(num_identities, args.memory_instances, feature_dim)
    free = available_memory_bytes(device)
    if needed > free:
        raise ArgumentError(
            f"--memory_instances {args.memory_instances}: the camera memories need {needed / 2**30:.1f} GiB "
            f"({num_identities} identities x {args.memory_instances + 1} x {feature_dim} fp32) but only "
            f"{free / 2**30:.1f} GiB is free on {device}; use fewer instance slots")


__all__ = [
    "ARGUMENT_CHOICES",
    "ARGUMENT_RANGES",
    "MIN_TEMPERATURE",
    "available_memory_bytes",
    "camera_memory_bytes",
    "check_against_data",
    "check_ranges",
    "epoch_window_problems",
]
