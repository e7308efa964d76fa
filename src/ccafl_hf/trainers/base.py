"""What the stage-2 and stage-3 trainers share: P×K batches, the reference optimiser and schedule,
per-epoch preparation, memory updates after each step, and per-loss logging."""

from __future__ import annotations

import logging
import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

from ..data import RandomIdentitySampler
from .arguments import CCAFLTrainingArguments
from .training_module import CCAFLForTraining

logger = logging.getLogger(__name__)


class FixedLengthSampler(Sampler[int]):
    """Repeats a P×K identity sampler (a new seed per pass) and cuts it to ``num_samples`` indices,
    so an epoch has exactly ``iters_per_epoch`` whole batches (the reference's 200 iterations)."""

    def __init__(self, sampler: RandomIdentitySampler, num_samples: int):
        self.sampler = sampler
        self.num_samples = int(num_samples)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        produced, repeat = 0, 0
        while produced < self.num_samples:
            self.sampler.set_epoch(self.epoch * 1_000_003 + repeat)
            for index in self.sampler:
                yield index
                produced += 1
                if produced == self.num_samples:
                    return
            repeat += 1


class EpochPreparationCallback(TrainerCallback):
    """Calls ``trainer.prepare_epoch`` at the start of every epoch (memory rebuild / re-association)."""

    def __init__(self, trainer: CCAFLStageTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        steps_per_epoch = max(1, state.max_steps // max(1, math.ceil(args.num_train_epochs)))
        epoch = state.global_step // steps_per_epoch
        resumed_mid_epoch = state.global_step % steps_per_epoch != 0
        self.trainer.prepare_epoch(epoch, resumed_mid_epoch=resumed_mid_epoch)
        return control


class CCAFLStageTrainer(Trainer):
    """Base `Trainer` of stages 2–3: the model is a [`CCAFLForTraining`] module.

    Args:
        model: the training wrapper.
        args: the stage's arguments (`CCAFLTrainingArguments.stage_arguments`).
        train_dataset: the train split (rows with ``image_path``, ``camid``, ``intra_id``, ``cam_pid``).
        data_collator: train-time collator (augmentation) producing ``pixel_values``, ``intra_ids``, ``camids``.
        eval_collator: test-transform collator used to extract features of the train split.
        epoch_offset: index of this stage's first epoch in the joint stage-2/3 loop (schedule, windows).
    """

    stage: str = ""

    def __init__(
        self,
        model: CCAFLForTraining,
        args: CCAFLTrainingArguments,
        train_dataset,
        data_collator,
        eval_collator,
        epoch_offset: int = 0,
        **kwargs,
    ):
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator, **kwargs)
        self.eval_collator = eval_collator
        self.epoch_offset = int(epoch_offset)
        self.current_epoch = 0
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_counts = 0
        self._pending_update: tuple[torch.Tensor, torch.Tensor] | None = None
        self.add_callback(EpochPreparationCallback(self))
        model.stage = self.stage

    # --------------------------------------------------------------------------------- data
    def _get_train_sampler(self, train_dataset=None) -> Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args: CCAFLTrainingArguments = self.args
        sampler = RandomIdentitySampler(
            dataset["intra_id"], num_instances=args.num_instances, batch_size=args.pk_batch_size, seed=args.seed
        )
        if args.iters_per_epoch is None:
            return sampler
        total = args.iters_per_epoch * args.pk_batch_size * args.world_size
        return FixedLengthSampler(sampler, total)

    # ----------------------------------------------------------------------- optimiser / schedule
    def create_optimizer(self, model=None):
        """Adam (L2 weight decay, as the reference): biases at ``bias_lr_factor``× lr, the global-ID
        classifier in its own group with its own lr and weight decay."""
        if self.optimizer is None:
            args: CCAFLTrainingArguments = self.args
            module: CCAFLForTraining = self.model
            weights, biases = [], []
            for name, param in module.model.named_parameters():
                if param.requires_grad:
                    (biases if name.endswith("bias") else weights).append(param)
            groups = [
                {"params": weights, "lr": args.learning_rate, "weight_decay": args.weight_decay, "name": "weights"},
                {"params": biases, "lr": args.learning_rate * args.bias_lr_factor, "weight_decay": args.weight_decay,
                 "name": "biases"},
                {"params": list(module.classifier.parameters()), "lr": args.classifier_learning_rate,
                 "weight_decay": args.classifier_weight_decay, "name": "classifier"},
            ]
            self.optimizer = torch.optim.Adam([g for g in groups if g["params"]])
        return self.optimizer

    def loop_lr_factor(self, loop_epoch: float) -> float:
        """Reference stage-2/3 schedule at a (fractional) loop epoch: linear warm-up from
        ``warmup_factor`` over ``warmup_epochs``, then ×gamma at each decay epoch."""
        args: CCAFLTrainingArguments = self.args
        if loop_epoch < args.warmup_epochs:
            alpha = loop_epoch / max(args.warmup_epochs, 1e-12)
            return args.warmup_factor * (1 - alpha) + alpha
        return args.lr_decay_gamma ** sum(loop_epoch >= e for e in args.lr_decay_epoch_list)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            steps_per_epoch = max(1, num_training_steps // max(1, math.ceil(self.args.num_train_epochs)))

            def image_groups(step: int) -> float:
                return self.loop_lr_factor(self.epoch_offset + step // steps_per_epoch)

            lambdas = [(lambda step: 1.0) if g.get("name") == "classifier" else image_groups for g in optimizer.param_groups]
            self.lr_scheduler = LambdaLR(optimizer, lambdas)
        return self.lr_scheduler

    # ------------------------------------------------------------------------------- training
    @property
    def loop_epoch(self) -> int:
        """Index of the current epoch in the joint stage-2/3 loop."""
        return self.epoch_offset + self.current_epoch

    def prepare_epoch(self, epoch: int, resumed_mid_epoch: bool) -> None:
        """Per-epoch preparation of the stage (memory rebuild / association). Overridden."""
        self.current_epoch = epoch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(pixel_values=inputs["pixel_values"], intra_ids=inputs["intra_ids"], camids=inputs["camids"])
        self._pending_update = (outputs["reid_features"], inputs["intra_ids"])
        for name, value in outputs.items():
            if name not in ("loss", "reid_features"):
                self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value  # no host sync per step
        self._loss_counts += 1
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._pending_update is not None:
            features, intra_ids = self._pending_update
            # every rank updates its memories with the features of all ranks: identical memories
            features = self.accelerator.gather(features.contiguous())
            intra_ids = self.accelerator.gather(intra_ids.contiguous())
            self.accelerator.unwrap_model(model).update_memories(features, intra_ids)
            self._pending_update = None
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._loss_counts and "loss" in logs:
            for name, total in self._loss_sums.items():
                logs[f"loss_{name}"] = round(float(total) / self._loss_counts, 4)
            self._loss_sums.clear()
            self._loss_counts = 0
        logs.setdefault("loop_epoch", self.loop_epoch)
        super().log(logs, *args, **kwargs)


__all__ = ["CCAFLStageTrainer", "EpochPreparationCallback", "FixedLengthSampler"]
