"""`CCAFLTrainer`: stages 2–3 (ICDL epochs, then ICAL epochs) as ONE training loop (docs/method.md §6).

One optimiser, one learning-rate schedule and one grad scaler run through the whole loop; the active
objective ([`ICDLObjective`] / [`ICALObjective`]) switches at the epoch boundary. The trainer owns its
setup: which parameters train, the DDP flags, the P×K sampler, the global-ID classifier's own Adam,
the per-epoch preparation (memory rebuild / association), the memory update after each step, and the
evaluation at the end of each stage (through `evaluate`, so the metrics reach ``report_to``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..data import RandomIdentitySampler
from ..evaluation import METRIC_KEYS, evaluate_reid_model
from .arguments import CCAFLTrainingArguments
from .objectives import ICALObjective, ICDLObjective, StageObjective
from .training_module import CCAFLForTraining, set_image_stage_trainable

logger = logging.getLogger(__name__)

IMAGE_STAGES = ("icdl", "ical")
CLASSIFIER_OPTIMIZER_NAME = "classifier_optimizer.pt"
BEST_ON_TEST_FILE = "best_on_test.json"
BEST_ON_TEST_DIR = "best_on_test"
BEST_ON_TEST_LABEL = "test set (optimistic: model selection on the test set, as the reference reports)"


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


class _LoopCallback(TrainerCallback):
    """Per-epoch preparation at the start of every epoch; evaluation at the end of every stage."""

    def __init__(self, trainer: CCAFLTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._sync_from_main_process(self.trainer.training_module.classifier.parameters())
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._sync_from_main_process(self.trainer.training_module.model.buffers())  # rank 0's BN statistics
        return control

    def on_epoch_begin(self, args, state, control, **kwargs):
        steps = self.trainer.steps_per_epoch(state)
        self.trainer.begin_epoch(state.global_step // steps, resumed_mid_epoch=state.global_step % steps != 0)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = self.trainer.loop_epoch
        stage_end = epoch == self.trainer.stage_last_epoch(self.trainer.objective.name)
        if stage_end or is_periodic_evaluation_epoch(epoch, self.trainer.args.eval_every_epochs):
            self.trainer._mid_stage_evaluation = not stage_end  # periodic: not a stage's result
            control.should_evaluate = True  # the Trainer evaluates, then saves the epoch's checkpoint
        return control


class LabelledProgressCallback(ProgressCallback):
    """The Trainer's progress bar with a label, refreshed at every epoch (``label()`` gives it)."""

    def __init__(self, label):
        super().__init__()
        self.label = label

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.label())

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.set_description(self.label())


class CCAFLTrainer(Trainer):
    """Stages 2–3 of CCAFL in one loop: ``stages`` (a contiguous part of ``("icdl", "ical")``) run
    their epochs back to back with one optimiser, schedule and grad scaler.

    Args:
        model: the [`CCAFLForTraining`] module; its image tower is made trainable here
            (`set_image_stage_trainable`, honouring ``args.freeze_patch_embedding``).
        args: the run's arguments; the trainer derives the loop's epochs, batch size and DDP flags.
        train_dataset: the train split (rows with ``image_path``, ``camid``, ``intra_id``, ``cam_pid``).
        data_collator: train-time collator (augmentation) producing ``pixel_values``, ``intra_ids``, ``camids``.
        eval_collator: test-transform collator (feature extraction of the train split and evaluation).
        stages: the stages of the loop, ``("icdl", "ical")``, ``("icdl",)`` or ``("ical",)``; ICAL-only
            loops start at loop epoch ``icdl_epochs`` (windows and schedule count in the joint loop).
        eval_dataset: optional ``{"query": ..., "gallery": ...}``; evaluated at the end of each stage.
        diagnostic_pids: ``[N]`` ground-truth person of each intra-camera identity, for the association
            diagnostics only (never seen by the losses).
    """

    def __init__(
        self,
        model: CCAFLForTraining,
        args: CCAFLTrainingArguments,
        train_dataset,
        data_collator,
        eval_collator,
        stages: tuple[str, ...] | list[str] = IMAGE_STAGES,
        eval_dataset: dict | None = None,
        diagnostic_pids: np.ndarray | None = None,
        **kwargs,
    ):
        stages = tuple(stages)
        if not stages or stages != tuple(s for s in IMAGE_STAGES if s in stages):
            raise ValueError(f"stages must be a contiguous, ordered part of {IMAGE_STAGES}, got {stages}")
        self.stages = stages
        self.objectives: dict[str, StageObjective] = {
            "icdl": ICDLObjective(args), "ical": ICALObjective(args, diagnostic_pids=diagnostic_pids)
        }
        first = 0 if stages[0] == "icdl" else args.icdl_epochs
        last = first + sum(args.icdl_epochs if s == "icdl" else args.ical_epochs for s in stages)
        self.epoch_range = (first, last)
        loop_args = dataclasses.replace(
            args,
            num_train_epochs=last - first,
            max_steps=-1,
            per_device_train_batch_size=args.pk_batch_size,
            dataloader_drop_last=True,
            remove_unused_columns=False,
            ddp_find_unused_parameters=True,  # the visual projection idles while no image–text loss is active
        )
        self.trainable_parameters = set_image_stage_trainable(model.model, args.freeze_patch_embedding)
        super().__init__(model=model, args=loop_args, train_dataset=train_dataset, data_collator=data_collator,
                         eval_dataset=eval_dataset, **kwargs)
        self.eval_collator = eval_collator
        self.objective: StageObjective = self.objectives[stages[0]]
        self.loop_epoch = first
        self.classifier_optimizer: torch.optim.Optimizer | None = None
        self.stage_results: dict[str, dict[str, float]] = {}
        self.association_log: list[dict] = []
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._mid_stage_evaluation = False
        self._loss_counts = 0
        self.add_callback(_LoopCallback(self))
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(LabelledProgressCallback(self.progress_label))

    # ------------------------------------------------------------------------------------- loop plan
    @property
    def training_module(self) -> CCAFLForTraining:
        """The [`CCAFLForTraining`] module (unwrapped from DDP)."""
        return self.accelerator.unwrap_model(self.model)

    def progress_label(self) -> str:
        """``"ICAL epoch 7/15"``: the active stage and the 1-based loop epoch."""
        return f"{self.objective.name.upper()} epoch {self.loop_epoch + 1}/{self.epoch_range[1]}"

    def stage_of_epoch(self, epoch: int) -> str:
        """``"icdl"`` or ``"ical"``: the stage loop epoch ``epoch`` belongs to."""
        return "icdl" if epoch < self.args.icdl_epochs else "ical"

    def stage_last_epoch(self, stage: str) -> int:
        """Loop epoch at whose end ``stage`` is complete."""
        return self.args.icdl_epochs - 1 if stage == "icdl" else self.epoch_range[1] - 1

    def steps_per_epoch(self, state) -> int:
        return max(1, state.max_steps // max(1, math.ceil(self.args.num_train_epochs)))

    def begin_epoch(self, index: int, resumed_mid_epoch: bool) -> None:
        """Start the ``index``-th epoch of this trainer: pick the objective and, unless resuming inside
        the epoch, prepare it (memory rebuild / association); log the association once."""
        self.loop_epoch = self.epoch_range[0] + index
        self.objective = self.objectives[self.stage_of_epoch(self.loop_epoch)]
        if resumed_mid_epoch:
            logger.info("resumed inside epoch %d (%s): keeping the checkpointed memories and pseudo-labels",
                        self.loop_epoch, self.objective.name)
            return
        self._sync_from_main_process(self.training_module.model.buffers())
        record = self.objective.prepare_epoch(self, self.loop_epoch)
        if record is not None:
            self.association_log.append({"epoch": self.loop_epoch, **record})
            if self.accelerator.is_main_process:
                self.log({f"assoc_{k}": v for k, v in record.items() if isinstance(v, int | float)})

    @torch.no_grad()
    def _sync_from_main_process(self, tensors) -> None:
        """Copy rank 0's values of ``tensors`` to every rank. Used for the classifier, which DDP does not
        synchronise (it is trained on gathered features by its own optimiser), at the start of training,
        and for the model buffers (BN-neck running statistics) before features are extracted, so every
        rank embeds with the same model."""
        if self.accelerator.num_processes == 1:
            return
        from accelerate.utils import broadcast

        for tensor in tensors:
            if tensor.is_floating_point():
                tensor.copy_(broadcast(tensor.detach().clone(), from_process=0))

    # ------------------------------------------------------------------------------------------ data
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

    # ---------------------------------------------------------------------------- optimiser / schedule
    def create_optimizer(self, model=None):
        """The image tower's optimiser (Adam or SGD with momentum; L2 weight decay; biases at
        ``bias_lr_factor`` × lr) and the global-ID classifier's own Adam (constant lr)."""
        args: CCAFLTrainingArguments = self.args
        module = self.training_module
        if self.optimizer is None:
            weights, biases = [], []
            for name, param in module.model.named_parameters():
                if param.requires_grad:
                    (biases if name.endswith("bias") else weights).append(param)
            groups = [
                {"params": weights, "lr": args.learning_rate, "weight_decay": args.weight_decay},
                {"params": biases, "lr": args.learning_rate * args.bias_lr_factor, "weight_decay": args.weight_decay},
            ]
            groups = [g for g in groups if g["params"]]
            if args.optimizer == "sgd":
                self.optimizer = torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.sgd_momentum)
            else:
                self.optimizer = torch.optim.Adam(groups, lr=args.learning_rate)
        if self.classifier_optimizer is None:
            self.classifier_optimizer = torch.optim.Adam(
                module.classifier.parameters(), lr=args.classifier_learning_rate,
                weight_decay=args.classifier_weight_decay,
            )
        return self.optimizer

    def loop_lr_factor(self, loop_epoch: float) -> float:
        """Reference stage-2/3 schedule at a (fractional) loop epoch: linear warm-up from
        ``warmup_factor`` over ``warmup_epochs``, then ×gamma at each decay epoch."""
        args: CCAFLTrainingArguments = self.args
        if loop_epoch < args.warmup_epochs:
            alpha = loop_epoch / max(args.warmup_epochs, 1e-12)
            return args.warmup_factor * (1 - alpha) + alpha
        return args.lr_decay_gamma ** sum(loop_epoch >= e for e in args.lr_decay_epochs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            steps_per_epoch = max(1, num_training_steps // max(1, math.ceil(self.args.num_train_epochs)))
            first = self.epoch_range[0]
            self.lr_scheduler = LambdaLR(optimizer, lambda step: self.loop_lr_factor(first + step // steps_per_epoch))
        return self.lr_scheduler

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.classifier_optimizer is not None:
            torch.save(self.classifier_optimizer.state_dict(), os.path.join(output_dir, CLASSIFIER_OPTIMIZER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, CLASSIFIER_OPTIMIZER_NAME) if checkpoint else None
        if path and os.path.isfile(path):
            self.create_optimizer()
            self.classifier_optimizer.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))

    # -------------------------------------------------------------------------------------- training
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # in training, the global-ID classifier steps inside the forward, between the encoder and the losses
        step = self._classifier_step_on(inputs["intra_ids"]) if model.training else None
        outputs = model(pixel_values=inputs["pixel_values"], intra_ids=inputs["intra_ids"], camids=inputs["camids"],
                        objective=self.objective, epoch=self.loop_epoch, classifier_step=step)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _classifier_step_on(self, intra_ids: torch.Tensor):
        """The forward's ``classifier_step``: one step of the global-ID classifier on the detached features of
        every process (so all ranks keep identical classifiers), its loss kept for the log."""
        def step(features: torch.Tensor) -> None:
            gathered = self.accelerator.gather(features.contiguous())
            self._classifier_loss = self.classifier_step(gathered, self.accelerator.gather(intra_ids.contiguous()))
        return step

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward of the active objective — the global-ID classifier's own Adam steps inside it, after the
        encoder and before the losses, as the reference — and backward; then, with the features and labels
        of every process, the memory update."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._classifier_loss = None
        with self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        self.accelerator.backward(loss / self.current_gradient_accumulation_steps)

        # every rank updates with the features of all ranks: identical memories and classifiers
        features = self.accelerator.gather(outputs["reid_features"].contiguous())
        intra_ids = self.accelerator.gather(inputs["intra_ids"].contiguous())
        module = self.training_module
        self.objective.update_memories(module, features, intra_ids)
        classifier_loss = self._classifier_loss

        for name, value in outputs.items():
            if name not in ("loss", "reid_features"):
                self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value  # no host sync per step
        self._loss_sums["classifier"] = self._loss_sums.get("classifier", 0.0) + classifier_loss
        self._loss_counts += 1
        return loss.detach() / self.current_gradient_accumulation_steps

    def classifier_step(self, features: torch.Tensor, intra_ids: torch.Tensor) -> torch.Tensor:
        """One step of the global-ID classifier's own Adam on detached features ``[B, D]`` (fp32, no
        loss scaling, no clipping). Returns the (detached) loss."""
        module = self.training_module
        if self.classifier_optimizer is None:
            self.create_optimizer()
        with torch.enable_grad():
            loss = module.classifier.classification_loss(features.detach().float(), intra_ids)
            self.classifier_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.classifier_optimizer.step()
        return loss.detach()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._loss_counts and "loss" in logs:
            for name, total in self._loss_sums.items():
                logs[f"loss_{name}"] = round(float(total) / self._loss_counts, 4)
            self._loss_sums.clear()
            self._loss_counts = 0
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Market-1501-protocol metrics (mAP, rank-k, mINP) on ``{"query", "gallery"}``, logged (so they
        reach ``report_to``) and kept in ``stage_results`` under the active stage."""
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not datasets or len(datasets.get("query", ())) == 0 or len(datasets.get("gallery", ())) == 0:
            logger.warning("no query/gallery split: skipping the evaluation after %s", self.objective.name)
            return {}
        args: CCAFLTrainingArguments = self.args
        self._sync_from_main_process(self.training_module.model.buffers())
        # a periodic evaluation leaves the random state as it found it (its dataloaders draw a seed from it):
        # training with --eval_every_epochs follows the same course as without
        with torch.random.fork_rng(devices=[], enabled=self._mid_stage_evaluation):
            metrics = evaluate_reid_model(
                self.training_module.model, datasets["query"], datasets["gallery"], self.eval_collator,
                batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
                mixed_precision=args.mixed_precision, flip=args.eval_flip, rerank=args.eval_rerank,
                accelerator=self.accelerator, progress=not args.disable_tqdm,
            )
        summary = {k: float(metrics[k]) for k in METRIC_KEYS}
        if not self._mid_stage_evaluation:
            self.stage_results[self.objective.name] = summary
        self._mid_stage_evaluation = False
        logged = {f"{metric_key_prefix}_{k}": round(v, 4) for k, v in summary.items()}
        self.log({**logged, f"{metric_key_prefix}_loop_epoch": self.loop_epoch + 1})
        if args.eval_every_epochs or args.save_best_checkpoint:
            self._record_best_on_test(summary, metric_key_prefix)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, logged)
        return logged

    def _record_best_on_test(self, summary: dict[str, float], prefix: str) -> None:
        """Write ``best_on_test.json`` (and, with ``save_best_checkpoint``, the model of a new best in
        ``best_on_test/``) from the evaluations logged so far — ``state.log_history``, so a resumed loop
        remembers the evaluations before its checkpoint. Main process only."""
        best = best_logged_evaluation(self.state.log_history, prefix)
        if best is None or not self.args.should_save:
            return
        output_dir = self.args.output_dir
        if self.args.save_best_checkpoint:
            best["checkpoint"] = BEST_ON_TEST_DIR
            if best["epoch"] == self.loop_epoch + 1 and best["mAP"] == round(summary["mAP"], 4):  # this evaluation
                _save_model_atomically(self.training_module.model, os.path.join(output_dir, BEST_ON_TEST_DIR))
        os.makedirs(output_dir, exist_ok=True)
        temporary = os.path.join(output_dir, BEST_ON_TEST_FILE + ".tmp")
        with open(temporary, "w") as handle:
            json.dump(best, handle, indent=2)
        os.replace(temporary, os.path.join(output_dir, BEST_ON_TEST_FILE))


def is_periodic_evaluation_epoch(loop_epoch: int, every: int) -> bool:
    """``--eval_every_epochs``: whether the loop evaluates after (0-based) ``loop_epoch``, i.e. the 1-based
    epoch is a multiple of ``every`` (never when ``every`` is 0)."""
    return every > 0 and (loop_epoch + 1) % every == 0


def best_logged_evaluation(log_history: list[dict], prefix: str = "eval") -> dict | None:
    """The evaluation of highest mAP (the earliest on a tie) among those the loop logged, as
    ``{"epoch": 1-based loop epoch, <metric>: value, ..., "selected_on": ...}``; None if there is none."""
    evaluations = [e for e in log_history if f"{prefix}_mAP" in e and f"{prefix}_loop_epoch" in e]
    if not evaluations:
        return None
    best = max(evaluations, key=lambda e: (e[f"{prefix}_mAP"], -e[f"{prefix}_loop_epoch"]))
    metrics = {k: best[f"{prefix}_{k}"] for k in METRIC_KEYS if f"{prefix}_{k}" in best}
    return {"epoch": int(best[f"{prefix}_loop_epoch"]), **metrics, "selected_on": BEST_ON_TEST_LABEL,
            "num_evaluations": len(evaluations)}


def read_best_on_test(output_dir: str | os.PathLike) -> dict | None:
    """The ``best_on_test.json`` record a loop trainer wrote in ``output_dir``, or None."""
    path = os.path.join(output_dir, BEST_ON_TEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _save_model_atomically(model, folder: str) -> None:
    """``model.save_pretrained`` into a temporary sibling, then swapped in for ``folder``."""
    temporary, previous = folder + ".tmp", folder + ".old"
    for path in (temporary, previous):
        shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(temporary)
    if os.path.isdir(folder):
        os.replace(folder, previous)
    os.replace(temporary, folder)
    shutil.rmtree(previous, ignore_errors=True)


class ICDLTrainer(CCAFLTrainer):
    """Stage 2 alone: a [`CCAFLTrainer`] whose loop holds the ICDL epochs only."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("stages", ("icdl",))
        super().__init__(*args, **kwargs)


class ICALTrainer(CCAFLTrainer):
    """Stage 3 alone: a [`CCAFLTrainer`] whose loop holds the ICAL epochs only (loop epochs
    ``icdl_epochs`` onwards)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("stages", ("ical",))
        super().__init__(*args, **kwargs)


__all__ = ["CCAFLTrainer", "FixedLengthSampler", "ICALTrainer", "ICDLTrainer", "LabelledProgressCallback",
           "best_logged_evaluation", "is_periodic_evaluation_epoch", "read_best_on_test"]
