"""The objectives of stages 2 and 3: which losses one epoch trains with and how the memories follow each
step (docs/method.md §4–§6).

An objective holds explicit hyper-parameters only (its fields carry the names of the
[`CCAFLTrainerConfig`] fields they come from). The state it reads and writes (memories,
pseudo-labels, text features) lives in [`CCAFLForTraining`], so `state_dict` and checkpoints carry
it, and is handed to it explicitly; the [`CCAFLTrainer`] prepares that state at the start of each
epoch (memory rebuild, association) and asks the epoch's objective for the losses of each batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..association import associate_across_cameras, camera_centered
from ..losses import (
    adversarial_identity_loss,
    batch_hard_triplet_loss,
    centroid_triplet_loss,
    inter_camera_image_text_loss,
    intra_camera_image_text_loss,
)

if TYPE_CHECKING:
    from ..modeling_ccafl import CCAFLOutput
    from .training_module import CCAFLForTraining


@dataclass
class StageObjective:
    """One stage's losses. Subclasses define `losses` and `update_memories`."""

    name: ClassVar[str] = ""

    @classmethod
    def from_config(cls, config) -> StageObjective:
        """The objective with ``config``'s values of its fields (a [`CCAFLTrainerConfig`]: same names)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def losses(
        self, state: CCAFLForTraining, outputs: CCAFLOutput, intra_ids: torch.Tensor, camids: torch.Tensor,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        """Named scalar losses of one batch at loop epoch ``epoch`` (their sum is back-propagated).

        Args:
            state: the memories, pseudo-labels and text features (read only).
            outputs: the model's outputs of the batch (``reid_features [B, D]``, ``alignment_features [B, P]``).
            intra_ids: ``[B]`` intra-camera identity; camids: ``[B]`` camera of each image.
        """
        raise NotImplementedError

    @torch.no_grad()
    def update_memories(self, state: CCAFLForTraining, features: torch.Tensor, intra_ids: torch.Tensor) -> None:
        """Write one step's features ``[B, D]`` (gathered from every process) into the memories of ``state``."""


@dataclass
class ICDLObjective(StageObjective):
    """Stage 2 (ICDL): camera-memory, intra-camera image–text and triplet losses. Every loss is
    reduced per camera (mean over that camera's samples) and **summed over the cameras** in the
    batch, as the reference does. The trainer rebuilds the camera memories from fresh features at the
    start of every epoch."""

    name: ClassVar[str] = "icdl"
    memory_lambda: float = 0.6
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    use_memory_loss: bool = True
    use_image_text_loss: bool = True
    use_triplet_loss: bool = True

    def losses(self, state, outputs, intra_ids, camids, epoch):
        feats = outputs.reid_features
        losses: dict[str, torch.Tensor] = {}
        if self.use_memory_loss:
            losses["memory"] = state.camera_memory.loss(
                feats, intra_ids, centroid_weight=self.memory_lambda, reduction="camera_sum"
            )
        if self.use_image_text_loss and state.has_text_features:
            losses["image_text"] = intra_camera_image_text_loss(
                outputs.alignment_features, state.text_features, intra_ids, state.identity_camids,
                label_smoothing=self.label_smoothing, reduction="camera_sum",
            )
        if self.use_triplet_loss:
            losses["triplet"] = batch_hard_triplet_loss(
                feats, intra_ids, margin=self.triplet_margin, groups=camids, reduction="camera_sum"
            ) + centroid_triplet_loss(
                feats, intra_ids, state.camera_memory.centroids, state.identity_camids,
                margin=self.triplet_margin, reduction="camera_sum",
            )
        return losses

    @torch.no_grad()
    def update_memories(self, state, features, intra_ids):
        state.camera_memory.update(features, intra_ids)


@dataclass
class ICALObjective(StageObjective):
    """Stage 3 (ICAL): trains with the global-memory, triplet, inter-camera image–text (from
    ``ical_image_text_start_epoch``) and camera-adversarial (``adversarial_start_epoch`` to
    ``adversarial_end_epoch``) losses, each a mean over the batch, on pseudo-labels that `associate`
    computes at the start of every epoch (they live in a buffer indexed by intra-camera identity, so the
    dataloader is never rebuilt)."""

    name: ClassVar[str] = "ical"
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    association_rate: float = 1.7
    association_camera_centering: bool = False
    ical_image_text_start_epoch: int = 10
    adversarial_start_epoch: int = 40
    adversarial_end_epoch: int = 49
    adversarial_margin: float = 0.7
    adversarial_epsilon: float = 0.8
    adversarial_tau: float = 0.2
    classifier_scale: float = 16.0
    use_memory_loss: bool = True
    use_image_text_loss: bool = True
    use_triplet_loss: bool = True
    use_adversarial_loss: bool = True

    def image_text_active(self, epoch: int) -> bool:
        return self.use_image_text_loss and epoch >= self.ical_image_text_start_epoch

    def adversarial_active(self, epoch: int) -> bool:
        return self.use_adversarial_loss and self.adversarial_start_epoch <= epoch <= self.adversarial_end_epoch

    def associate(
        self, identity_features: torch.Tensor, identity_camids: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cross-camera association of ``[N, D]`` mean identity features: ``(labels [N], pairs)`` with the
        ``association_rate × N`` closest cross-camera pairs considered (−1 = unassociated)."""
        num_pairs = int(round(self.association_rate * identity_camids.numel()))
        search = camera_centered(identity_features, identity_camids) if self.association_camera_centering \
            else identity_features
        return associate_across_cameras(search, identity_camids.cpu().numpy(), num_pairs, return_pairs=True)

    def losses(self, state, outputs, intra_ids, camids, epoch):
        feats = outputs.reid_features
        labels = state.pseudo_labels[intra_ids]  # only identities with an accepted cross-camera match count
        losses: dict[str, torch.Tensor] = {}
        if self.use_memory_loss and state.cluster_memory.num_clusters > 0:
            losses["memory"] = state.cluster_memory.loss(feats, labels)
        if self.image_text_active(epoch) and state.cluster_text_features.shape[0] > 0:
            losses["image_text"] = inter_camera_image_text_loss(
                outputs.alignment_features, state.cluster_text_features, labels, label_smoothing=self.label_smoothing
            )
        if self.use_triplet_loss:
            losses["triplet"] = batch_hard_triplet_loss(feats, labels, margin=self.triplet_margin)
        if self.adversarial_active(epoch):
            associated = labels >= 0
            cosines = state.classifier.cosines(feats, detach_weight=True)
            losses["adversarial"] = adversarial_identity_loss(
                cosines[associated], intra_ids[associated], state.identity_camids, state.pseudo_labels,
                margin=self.adversarial_margin, scale=self.classifier_scale,
                same_camera_tau=self.adversarial_tau, epsilon=self.adversarial_epsilon,
            ) if associated.any() else feats.sum() * 0.0
        return losses

    @torch.no_grad()
    def update_memories(self, state, features, intra_ids):
        if state.cluster_memory.num_clusters > 0:
            state.cluster_memory.update(features, state.pseudo_labels[intra_ids.to(state.pseudo_labels.device)])


__all__ = ["ICALObjective", "ICDLObjective", "StageObjective"]
