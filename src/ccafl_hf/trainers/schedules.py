"""Learning-rate schedules of the CCAFL stages that `transformers` has no name for (docs/method.md §3).

The stage-2/3 loop's warm-up-then-step schedule is the loop trainer's `loop_lr_factor`; this module holds
the stage-1 (prompt learning) schedule the reference intends.
"""

from __future__ import annotations

import math

PROMPT_LR_SCHEDULES = ("cosine", "epoch_cosine")


def prompt_epoch_lr(
    epoch: int, base_lr: float, epochs: float, warmup_epochs: float = 5, warmup_lr: float = 1e-5, min_lr: float = 1e-6
) -> float:
    """The reference's stage-1 learning rate for (1-based) epoch ``epoch``, constant within the epoch.

    Warm-up, linear from ``warmup_lr`` (reached at epoch 0, which never trains) to ``base_lr`` over
    ``warmup_epochs``; then a half cosine from ``base_lr`` to ``min_lr`` at epoch ``epochs``, no restart::

        lr(e) = warmup_lr + e (base_lr - warmup_lr) / warmup_epochs              e < warmup_epochs
        lr(e) = min_lr + (base_lr - min_lr) (1 + cos(pi e / epochs)) / 2         otherwise (min_lr past ``epochs``)

    (timm's ``CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs, warmup_lr_init=warmup_lr,
    lr_min=min_lr)`` stepped once before each epoch ``e = 1..epochs``.) Market-1501's epochs 1–5 train at
    7.8e-5, 1.46e-4, 2.14e-4, 2.82e-4, 3.44e-4.
    """
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base_lr - warmup_lr) / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs))


def prompt_epoch_lr_factor(step: int, steps_per_epoch: int, **schedule) -> float:
    """`prompt_epoch_lr` of the epoch optimiser step ``step`` (0-based) falls in, as a factor of ``base_lr``
    (for `torch.optim.lr_scheduler.LambdaLR`): steps ``0..steps_per_epoch-1`` train epoch 1."""
    return prompt_epoch_lr(step // max(1, steps_per_epoch) + 1, **schedule) / schedule["base_lr"]


__all__ = ["PROMPT_LR_SCHEDULES", "prompt_epoch_lr", "prompt_epoch_lr_factor"]
