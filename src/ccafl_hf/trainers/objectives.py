"""The objectives of stages 2 and 3: which losses one epoch trains with, how the state they read is
prepared at the start of the epoch, and how the memories follow each step (docs/method.md §4–§6).

An objective holds hyper-parameters only; the state it reads and writes (memories, pseudo-labels,
text features) lives in [`CCAFLForTraining`] so `state_dict` and checkpoints carry it. The
[`CCAFLTrainer`] picks the objective of each epoch of its loop: `ICDLObjective` for the ICDL epochs,
then `ICALObjective`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate.utils import broadcast

from ..association import (
    associate_across_cameras,
    association_diagnostics,
    camera_centered,
    identity_mean_features,
)
from ..evaluation import extract_features
from ..losses import (
    adversarial_identity_loss,
    batch_hard_triplet_loss,
    centroid_triplet_loss,
    inter_camera_image_text_loss,
    intra_camera_image_text_loss,
)
from ..modeling_ccafl import CCAFLOutput
from .arguments import CCAFLTrainingArguments

if TYPE_CHECKING:
    from .base import CCAFLTrainer
    from .training_module import CCAFLForTraining

logger = logging.getLogger(__name__)


class StageObjective:
    """One stage's losses. Subclasses define `prepare_epoch`, `losses` and `update_memories`.

    Args:
        args: the hyper-parameters (temperatures, margins, loss switches, epoch windows).
    """

    name: str = ""

    def __init__(self, args: CCAFLTrainingArguments):
        self.args = args

    def prepare_epoch(self, trainer: CCAFLTrainer, epoch: int) -> dict | None:
        """Rebuild what the epoch's losses read (called at the start of loop epoch ``epoch``, not when
        resuming inside it). Returns a record to log, or None."""
        return None

    def losses(
        self, module: CCAFLForTraining, outputs: CCAFLOutput, intra_ids: torch.Tensor, camids: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        """Named scalar losses of one batch at loop epoch ``epoch`` (their sum is back-propagated)."""
        raise NotImplementedError

    @torch.no_grad()
    def update_memories(self, module: CCAFLForTraining, features: torch.Tensor, intra_ids: torch.Tensor) -> None:
        """Write one step's features ``[B, D]`` (gathered from every process) into the memories."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ICDLObjective(StageObjective):
    """Stage 2 (ICDL): camera-memory, intra-camera image–text and triplet losses. Every loss is
    reduced per camera (mean over that camera's samples) and **summed over the cameras** in the
    batch, as the reference does; the camera memories are rebuilt from fresh features every epoch."""

    name = "icdl"

    def prepare_epoch(self, trainer: CCAFLTrainer, epoch: int) -> dict | None:
        module = trainer.training_module
        args = self.args
        extracted = extract_features(
            module.model, trainer.train_dataset, trainer.eval_collator, batch_size=args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers, mixed_precision=args.mixed_precision,
            accelerator=trainer.accelerator, desc=f"Epoch {epoch + 1}: ICDL memory features",
            progress=not args.disable_tqdm,
        )
        generator = torch.Generator(device="cpu").manual_seed(args.seed * 1000 + epoch)
        module.camera_memory.initialize(extracted.reid_features, extracted.labels["intra_ids"], generator=generator)
        return None

    def losses(self, module, outputs, intra_ids, camids, epoch):
        args = self.args
        feats = outputs.reid_features
        losses: dict[str, torch.Tensor] = {}
        if args.use_memory_loss:
            losses["memory"] = module.camera_memory.loss(
                feats, intra_ids, centroid_weight=args.memory_lambda, reduction="camera_sum"
            )
        if args.use_image_text_loss and module.has_text_features:
            losses["image_text"] = intra_camera_image_text_loss(
                outputs.alignment_features, module.text_features, intra_ids, module.identity_camids,
                label_smoothing=args.label_smoothing, reduction="camera_sum",
            )
        if args.use_triplet_loss:
            losses["triplet"] = batch_hard_triplet_loss(
                feats, intra_ids, margin=args.triplet_margin, groups=camids, reduction="camera_sum"
            ) + centroid_triplet_loss(
                feats, intra_ids, module.camera_memory.centroids, module.identity_camids,
                margin=args.triplet_margin, reduction="camera_sum",
            )
        return losses

    @torch.no_grad()
    def update_memories(self, module, features, intra_ids):
        module.camera_memory.update(features, intra_ids)


class ICALObjective(StageObjective):
    """Stage 3 (ICAL): re-associates identities across cameras at the start of every epoch (the
    pseudo-labels live in a buffer indexed by intra-camera identity, so the dataloader is never
    rebuilt) and trains with the global-memory, triplet, inter-camera image–text (from
    ``ical_image_text_start_epoch``) and camera-adversarial (``adversarial_start_epoch`` to
    ``adversarial_end_epoch``) losses, each a mean over the batch.

    Args:
        diagnostic_pids: ``[N]`` ground-truth person id of each intra-camera identity, used **only**
            to log association precision/purity; never seen by the losses.
    """

    name = "ical"

    def __init__(self, args: CCAFLTrainingArguments, diagnostic_pids: np.ndarray | None = None):
        super().__init__(args)
        self.diagnostic_pids = diagnostic_pids

    def image_text_active(self, epoch: int) -> bool:
        return self.args.use_image_text_loss and epoch >= self.args.ical_image_text_start_epoch

    def adversarial_active(self, epoch: int) -> bool:
        args = self.args
        return args.use_adversarial_loss and args.adversarial_start_epoch <= epoch <= args.adversarial_end_epoch

    @torch.no_grad()
    def prepare_epoch(self, trainer: CCAFLTrainer, epoch: int) -> dict:
        """Extract features, average per identity, associate across cameras (main process), broadcast."""
        module = trainer.training_module
        args = self.args
        num_identities = module.identity_camids.numel()
        extracted = extract_features(
            module.model, trainer.train_dataset, trainer.eval_collator, batch_size=args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers, mixed_precision=args.mixed_precision,
            accelerator=trainer.accelerator, desc=f"Epoch {epoch + 1}: ICAL association features",
            progress=not args.disable_tqdm,
        )
        identity_features = identity_mean_features(extracted.reid_features, extracted.labels["intra_ids"], num_identities)
        labels = torch.full((num_identities,), -1, dtype=torch.long, device=identity_features.device)
        pairs = None
        main = trainer.accelerator.is_main_process
        if main:
            num_pairs = int(round(args.association_rate * num_identities))
            search_features = (
                camera_centered(identity_features, module.identity_camids)
                if args.association_camera_centering
                else identity_features
            )
            result, pairs = associate_across_cameras(
                search_features, module.identity_camids.cpu().numpy(), num_pairs, return_pairs=True
            )
            labels = torch.as_tensor(result, dtype=torch.long, device=identity_features.device)
        labels = broadcast(labels, from_process=0)
        module.set_pseudo_labels(labels, extracted.reid_features, extracted.labels["intra_ids"])
        labels_np = labels.cpu().numpy()
        record = {"num_clusters": int(labels_np.max() + 1) if labels_np.size else 0,
                  "num_associated": int((labels_np >= 0).sum())}
        if self.diagnostic_pids is not None and main:
            record.update(association_diagnostics(labels_np, self.diagnostic_pids, pairs=pairs))
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}

    def losses(self, module, outputs, intra_ids, camids, epoch):
        args = self.args
        feats = outputs.reid_features
        labels = module.pseudo_labels[intra_ids]  # only identities with an accepted cross-camera match count
        losses: dict[str, torch.Tensor] = {}
        if args.use_memory_loss and module.cluster_memory.num_clusters > 0:
            losses["memory"] = module.cluster_memory.loss(feats, labels)
        if self.image_text_active(epoch) and module.cluster_text_features.shape[0] > 0:
            losses["image_text"] = inter_camera_image_text_loss(
                outputs.alignment_features, module.cluster_text_features, labels, label_smoothing=args.label_smoothing
            )
        if args.use_triplet_loss:
            losses["triplet"] = batch_hard_triplet_loss(feats, labels, margin=args.triplet_margin)
        if self.adversarial_active(epoch):
            associated = labels >= 0
            cosines = module.classifier.cosines(feats, detach_weight=True)
            losses["adversarial"] = adversarial_identity_loss(
                cosines[associated], intra_ids[associated], module.identity_camids, module.pseudo_labels,
                margin=args.adversarial_margin, scale=args.classifier_scale,
                same_camera_tau=args.adversarial_tau, epsilon=args.adversarial_epsilon,
            ) if associated.any() else feats.sum() * 0.0
        return losses

    @torch.no_grad()
    def update_memories(self, module, features, intra_ids):
        if module.cluster_memory.num_clusters > 0:
            module.cluster_memory.update(features, module.pseudo_labels[intra_ids.to(module.pseudo_labels.device)])


__all__ = ["ICALObjective", "ICDLObjective", "StageObjective"]
