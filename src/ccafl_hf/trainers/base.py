"""`CCAFLTrainer`: stages 2–3 (ICDL epochs, then ICAL epochs) as ONE training loop (docs/method.md §6).

One optimiser, one learning-rate schedule and one grad scaler run through the whole loop; the active
objective ([`ICDLObjective`] / [`ICALObjective`]) switches at the epoch boundary. The trainer owns its
setup: which parameters train, the DDP flags, the P×K sampler, the global-ID classifier's own Adam,
the per-epoch preparation (memory rebuild / association, handing the objective nothing but the state it
prepared), the losses of each batch (`compute_loss` asks the epoch's objective, with the module as explicit
state), the memory update after each step, the non-finite checks (a NaN loss, gradient norm or feature
stops the run with a `NonFiniteError` naming the stage and step), and the evaluation at the end of each
stage (through `evaluate`, so the metrics reach ``report_to``).
"""

from __future__ import annotations

import copy
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

from ..association import association_diagnostics, identity_mean_features
from ..data.samplers import FixedLengthSampler, RandomIdentitySampler
from ..errors import NonFiniteError
from ..evaluation import METRIC_KEYS, evaluate_splits, extract_features
from .arguments import CCAFLTrainingArguments
from .configs import IMAGE_STAGES, CCAFLTrainerConfig, derive, extraction_options
from .distributed import configure_processes, global_batch
from .objectives import ICALObjective, ICDLObjective, StageObjective
from .training_module import CCAFLForTraining, set_image_stage_trainable

logger = logging.getLogger(__name__)

CLASSIFIER_OPTIMIZER_NAME = "classifier_optimizer.pt"
BEST_ON_TEST_FILE = "best_on_test.json"
BEST_ON_TEST_DIR = "best_on_test"
BEST_ON_TEST_LABEL = "test set (optimistic: model selection on the test set, as the reference reports)"


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
        stage_end = epoch == self.trainer.stage_last_epoch(self.trainer.current_stage)
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
        args: the [`CCAFLTrainerConfig`] of the loop (a [`CCAFLTrainingArguments`] is turned into one with
            its `loop_config`).
        train_dataset: the train split (rows with ``image_path``, ``camid``, ``intra_id``, ``cam_pid``).
        data_collator: train-time collator (augmentation) producing ``pixel_values``, ``intra_ids``, ``camids``.
        eval_collator: test-transform collator (feature extraction of the train split and evaluation).
        stages: the stages of the loop, ``("icdl", "ical")``, ``("icdl",)`` or ``("ical",)`` (default: the
            config's); ICAL-only loops start at loop epoch ``icdl_epochs`` (windows and schedule count in the
            joint loop).
        eval_dataset: optional ``{"query": ..., "gallery": ...}``; evaluated at the end of each stage.
        diagnostic_pids: ``[N]`` ground-truth person of each intra-camera identity, for the association
            diagnostics only (never seen by the losses).
    """

    def __init__(
        self,
        model: CCAFLForTraining,
        args: CCAFLTrainerConfig,
        train_dataset,
        data_collator,
        eval_collator,
        stages: tuple[str, ...] | list[str] | None = None,
        eval_dataset: dict | None = None,
        diagnostic_pids: np.ndarray | None = None,
        **kwargs,
    ):
        if isinstance(args, CCAFLTrainingArguments):
            args = args.loop_config(stages)
        elif stages is not None and tuple(stages) != args.loop_stages:
            args = derive(CCAFLTrainerConfig, args, stages=list(stages))
        if not args.loop_stages:
            raise ValueError(f"the loop needs at least one of {IMAGE_STAGES}, got stages {args.stages}")
        self.stages = args.loop_stages
        self.objectives: dict[str, StageObjective] = {
            "icdl": ICDLObjective.from_config(args), "ical": ICALObjective.from_config(args)
        }
        self.diagnostic_pids = diagnostic_pids
        self.epoch_range = args.loop_epochs
        per_device_batch = configure_processes(model, args)  # global P×K split over processes, SyncBatchNorm
        if per_device_batch != args.per_device_train_batch_size:
            args = copy.copy(args)  # the caller's config stays as it was
            args.per_device_train_batch_size = per_device_batch
        self.trainable_parameters = set_image_stage_trainable(model.model, args.freeze_patch_embedding)
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                         eval_dataset=eval_dataset, **kwargs)
        self.eval_collator = eval_collator
        self.objective: StageObjective = self.objectives[self.stages[0]]
        self.loop_epoch = self.epoch_range[0]
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

    @property
    def current_stage(self) -> str:
        """``"icdl"`` or ``"ical"``: the stage of the running epoch (also ``trainer.objective.name``)."""
        return self.objective.name

    def progress_label(self) -> str:
        """``"ICAL epoch 7/15"``: the active stage and the 1-based loop epoch."""
        return f"{self.current_stage.upper()} epoch {self.loop_epoch + 1}/{self.epoch_range[1]}"

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
        the epoch, prepare its state (`prepare_epoch`); log the association once."""
        self.loop_epoch = self.epoch_range[0] + index
        self.objective = self.objectives[self.stage_of_epoch(self.loop_epoch)]
        if resumed_mid_epoch:  # the epoch's data order, augmentation and memory state are not all restorable there
            raise ValueError(f"cannot resume inside loop epoch {self.loop_epoch} exactly: resume from a checkpoint "
                             "saved at an epoch end")
        record = self.prepare_epoch(self.loop_epoch)
        if record is not None:
            self.association_log.append({"epoch": self.loop_epoch, **record})
            if self.accelerator.is_main_process:
                self.log({f"assoc_{k}": v for k, v in record.items() if isinstance(v, int | float)})

    @torch.no_grad()
    def prepare_epoch(self, epoch: int) -> dict | None:
        """What the epoch's losses read, from fresh features of the train split (test transform): ICDL rebuilds
        the camera memories; ICAL associates identities across cameras (on the main process, then broadcast)
        and installs the pseudo-labels and cluster centroids. Returns ICAL's association record."""
        module = self.training_module
        stage = self.stage_of_epoch(epoch)
        self._sync_from_main_process(module.model.buffers())
        args: CCAFLTrainerConfig = self.args
        extracted = extract_features(
            module.model, self.train_dataset, self.eval_collator, extraction_options(args), accelerator=self.accelerator,
            desc=f"Epoch {epoch + 1}: {stage.upper()} {'memory' if stage == 'icdl' else 'association'} features",
        )
        if not bool(torch.isfinite(extracted.reid_features).all()):
            raise NonFiniteError(f"the features of the train split hold NaN or infinite values at the start of "
                                 f"{stage.upper()} loop epoch {epoch} (step {self.state.global_step}): the image "
                                 "tower diverged; lower --learning_rate")
        intra_ids = extracted.labels["intra_ids"]
        if stage == "icdl":
            generator = torch.Generator(device="cpu").manual_seed(args.seed * 1000 + epoch)
            module.camera_memory.initialize(extracted.reid_features, intra_ids, generator=generator)
            return None
        from accelerate.utils import broadcast

        objective: ICALObjective = self.objectives["ical"]
        identity_features = identity_mean_features(extracted.reid_features, intra_ids, module.identity_camids.numel())
        labels = torch.full_like(module.pseudo_labels, -1).to(identity_features.device)
        pairs = None
        main = self.accelerator.is_main_process
        if main:
            result, pairs = objective.associate(identity_features, module.identity_camids)
            labels = torch.as_tensor(result, dtype=torch.long, device=identity_features.device)
        labels = broadcast(labels, from_process=0)
        module.set_pseudo_labels(labels, extracted.reid_features, intra_ids)
        labels_np = labels.cpu().numpy()
        record = {"num_clusters": int(labels_np.max() + 1) if labels_np.size else 0,
                  "num_associated": int((labels_np >= 0).sum())}
        if self.diagnostic_pids is not None and main:
            record.update(association_diagnostics(labels_np, self.diagnostic_pids, pairs=pairs))
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}

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
        args: CCAFLTrainerConfig = self.args
        # the stream of global P×K batches; Accelerate hands each process its P/N identities of every one
        # (per-device batch P·K/N), or whole batches with --scale_batch_with_processes
        sampler = RandomIdentitySampler(dataset["intra_id"], num_instances=args.num_instances,
                                        batch_size=args.pk_batch_size, seed=args.seed, sampling=args.pk_sampling)
        if args.iters_per_epoch is None:
            return sampler
        scale = args.world_size if args.scale_batch_with_processes else 1
        return FixedLengthSampler(sampler, args.iters_per_epoch * args.pk_batch_size * scale,
                                  first_epoch=self.epoch_range[0])

    # ---------------------------------------------------------------------------- optimiser / schedule
    def create_optimizer(self, model=None):
        """The image tower's optimiser (Adam or SGD with momentum; L2 weight decay; biases at
        ``bias_lr_factor`` × lr) and the global-ID classifier's own Adam (constant lr)."""
        args: CCAFLTrainerConfig = self.args
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
        args: CCAFLTrainerConfig = self.args
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
        """The epoch's objective on the model's outputs of the batch, with the module as explicit state. In
        training, the global-ID classifier's own Adam steps between the encoder's forward and the losses (on the
        detached features of every process), so the adversarial loss reads its updated weights (the reference's
        order, docs/method.md §5). With ``return_outputs``: ``(loss, {"losses": {name: loss}, "gathered":
        (features [N·B, D] detached, intra_ids [N·B]) of every process, or None outside training})``."""
        outputs = model(pixel_values=inputs["pixel_values"])
        gathered = None
        if model.training:  # one gather serves the classifier step here and the memory update after backward
            gathered = (self.accelerator.gather(outputs.reid_features.detach().contiguous()),
                        self.accelerator.gather(inputs["intra_ids"].contiguous()))
            self._classifier_loss = self.classifier_step(*gathered)
        module = self.training_module
        batch = (outputs, inputs["intra_ids"], inputs["camids"])
        if module.losses_on_global_batch:  # several processes: the losses of the whole global batch
            batch = global_batch(*batch)
        losses = self.objective.losses(module, *batch, self.loop_epoch)
        total = sum(losses.values()) if losses else outputs.reid_features.sum() * 0.0
        if not return_outputs:
            return total
        return total, {"losses": losses, "gathered": gathered}

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward of the active objective — the global-ID classifier's own Adam steps inside it, after the
        encoder and before the losses, as the reference (`compute_loss`) — and backward, the non-finite check
        of the losses and the gradient norm, then, with the features and labels of every process, the memory
        update."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._classifier_loss = None
        with self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        self.accelerator.backward(loss / self.current_gradient_accumulation_steps)
        losses = {name: value.detach() for name, value in outputs["losses"].items()}
        self._check_finite(losses)

        # every rank updates with the features of all ranks: identical memories and classifiers
        self.objective.update_memories(self.training_module, *outputs["gathered"])
        classifier_loss = self._classifier_loss

        for name, value in losses.items():
            self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value  # no host sync per step
        self._loss_sums["classifier"] = self._loss_sums.get("classifier", 0.0) + classifier_loss
        self._loss_counts += 1
        return loss.detach() / self.current_gradient_accumulation_steps

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """Stop with a `NonFiniteError` naming the stage, step and values when a loss or the gradient norm of
        the image tower is NaN or infinite on any process (one small gather and one host read per step; the
        gradients are not checked under an fp16 loss scaler, which skips such steps itself)."""
        values = {name: value.float().reshape(()) for name, value in losses.items()}
        if self.accelerator.scaler is None:
            grads = [p.grad for p in self.training_module.model.parameters() if p.grad is not None]
            if grads:
                values["gradient norm"] = torch.nn.utils.get_total_norm(grads).float()
        if not values:
            return
        stacked = torch.stack(list(values.values()))
        bad = self.accelerator.gather((~torch.isfinite(stacked)).view(1, -1)).view(-1, stacked.numel())
        if bool(bad.any()):
            flagged = bad.any(dim=0).tolist()
            shown = ", ".join(f"{name}={value:g}" for (name, value), hit in zip(
                ((n, float(v)) for n, v in values.items()), flagged, strict=True) if hit)
            raise NonFiniteError(
                f"non-finite {shown} at step {self.state.global_step + 1} ({self.current_stage.upper()}, loop epoch "
                f"{self.loop_epoch}): training stops here; lower --learning_rate (or set --max_grad_norm) and check "
                "the temperatures and margins")

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
        args: CCAFLTrainerConfig = self.args
        self._sync_from_main_process(self.training_module.model.buffers())
        mid_stage, self._mid_stage_evaluation = self._mid_stage_evaluation, False
        splits = eval_dataset if eval_dataset is not None else self.eval_dataset
        if splits is None:  # built without evaluation data (the pipeline's, for data without query/gallery)
            return {}
        # a periodic evaluation leaves the random state as it found it (its dataloaders draw a seed from it):
        # training with --eval_every_epochs follows the same course as without
        with torch.random.fork_rng(devices=[], enabled=mid_stage):
            summary = evaluate_splits(
                self.training_module.model, splits, self.eval_collator, extraction_options(args, flip=args.eval_flip),
                rerank=args.eval_rerank, accelerator=self.accelerator, stage=self.current_stage,
            )
        if not summary:
            return {}
        if not mid_stage:  # a periodic evaluation is not a stage's result
            self.stage_results[self.current_stage] = summary
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


__all__ = ["BEST_ON_TEST_DIR", "BEST_ON_TEST_FILE", "IMAGE_STAGES", "CCAFLTrainer", "FixedLengthSampler", "ICALTrainer",
           "ICDLTrainer", "LabelledProgressCallback", "best_logged_evaluation", "is_periodic_evaluation_epoch",
           "read_best_on_test"]
