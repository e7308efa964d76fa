"""`CCAFLForTraining`: the CCAFL model plus every training-time state of stages 2–3, as one module.

Camera memories, the global cluster memory, the global-ID classifier, the stage-1 text features
and the pseudo-labels are registered modules/buffers, so `state_dict`, Trainer checkpoints and
resume carry them. The losses are computed inside `forward`, so DDP sees one forward per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..losses import (
    adversarial_identity_loss,
    batch_hard_triplet_loss,
    centroid_triplet_loss,
    inter_camera_image_text_loss,
    intra_camera_image_text_loss,
)
from ..memory import CameraMemory, ClusterMemory, IdentityClassifier
from ..modeling_ccafl import CCAFLModel
from .arguments import CCAFLTrainingArguments


@dataclass
class LossSwitches:
    """Which loss families are active in the current step (set per epoch by the trainers)."""

    memory: bool = True
    image_text: bool = True
    triplet: bool = True
    adversarial: bool = False
    classifier: bool = True


class CCAFLForTraining(nn.Module):
    """Training wrapper of stages 2–3 (METHOD.md §4–§5).

    Args:
        model: the `CCAFLModel` being trained (image tower + neck train; text tower frozen).
        identity_camids: ``[N]`` camera of every intra-camera identity.
        text_features: ``[N, P]`` stage-1 text feature of every identity (None disables image–text losses).
        args: hyper-parameters (temperatures, margins, memory sizes, …).
    """

    def __init__(
        self,
        model: CCAFLModel,
        identity_camids: torch.Tensor,
        text_features: torch.Tensor | None,
        args: CCAFLTrainingArguments,
    ):
        super().__init__()
        self.model = model
        self.args = args
        num_identities = int(identity_camids.numel())
        dim = model.reid_feature_dim
        self.register_buffer("identity_camids", identity_camids.long().clone())
        if text_features is None:
            text_features = torch.zeros(num_identities, model.projection_dim)
        self.has_text_features = bool(text_features.abs().sum() > 0)
        self.register_buffer("text_features", text_features.float().clone())
        self.register_buffer("pseudo_labels", torch.full((num_identities,), -1, dtype=torch.long))
        self.register_buffer("cluster_text_features", torch.zeros(0, model.projection_dim))
        self.camera_memory = CameraMemory(
            num_identities, dim, self.identity_camids, num_instances=args.memory_instances,
            momentum=args.memory_momentum, temperature=args.memory_temperature,
        )
        self.cluster_memory = ClusterMemory(dim, momentum=args.memory_momentum, temperature=args.memory_temperature)
        self.classifier = IdentityClassifier(num_identities, dim, scale=args.classifier_scale)
        self.stage = "icdl"
        self.switches = LossSwitches()

    def forward(
        self, pixel_values: torch.Tensor, intra_ids: torch.Tensor, camids: torch.Tensor, **unused
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch of the current stage.

        Args:
            pixel_values: ``[B, 3, H, W]``; intra_ids: ``[B]`` intra-camera identity; camids: ``[B]``.
        Returns:
            dict with ``loss`` (the total to back-propagate), each component (detached), and
            ``reid_features`` ``[B, D]`` (detached, for the memory update after the step).
        """
        args = self.args
        out = self.model.get_reid_outputs(pixel_values)
        feats = out.reid_features
        losses: dict[str, torch.Tensor] = {}
        on = self.switches

        if self.stage == "icdl":
            if on.memory:
                losses["memory"] = self.camera_memory.loss(feats, intra_ids, centroid_weight=args.memory_lambda)
            if on.image_text and self.has_text_features:
                losses["image_text"] = intra_camera_image_text_loss(
                    out.alignment_features, self.text_features, intra_ids, self.identity_camids,
                    label_smoothing=args.label_smoothing,
                )
            if on.triplet:
                losses["triplet"] = batch_hard_triplet_loss(
                    feats, intra_ids, margin=args.triplet_margin, groups=camids
                ) + centroid_triplet_loss(
                    feats, intra_ids, self.camera_memory.centroids, self.identity_camids, margin=args.triplet_margin
                )
        else:  # ical: only identities with an accepted cross-camera match take part
            labels = self.pseudo_labels[intra_ids]
            if on.memory and self.cluster_memory.num_clusters > 0:
                losses["memory"] = self.cluster_memory.loss(feats, labels)
            if on.image_text and self.cluster_text_features.shape[0] > 0:
                losses["image_text"] = inter_camera_image_text_loss(
                    out.alignment_features, self.cluster_text_features, labels, label_smoothing=args.label_smoothing
                )
            if on.triplet:
                losses["triplet"] = batch_hard_triplet_loss(feats, labels, margin=args.triplet_margin)
            if on.adversarial:
                associated = labels >= 0
                cosines = self.classifier.cosines(feats, detach_weight=True)
                losses["adversarial"] = adversarial_identity_loss(
                    cosines[associated], intra_ids[associated], self.identity_camids, self.pseudo_labels,
                    margin=args.adversarial_margin, scale=args.classifier_scale,
                    same_camera_tau=args.adversarial_tau, epsilon=args.adversarial_epsilon,
                ) if associated.any() else feats.sum() * 0.0
        # the global-ID classifier trains every iteration of stages 2 and 3, on detached features
        if on.classifier:
            losses["classifier"] = self.classifier.classification_loss(feats.detach(), intra_ids)

        total = sum(losses.values())
        result = {name: value.detach() for name, value in losses.items()}
        result["loss"] = total
        result["reid_features"] = feats.detach()
        return result

    @torch.no_grad()
    def update_memories(self, features: torch.Tensor, intra_ids: torch.Tensor) -> None:
        """Memory update after an optimiser step, with features gathered from every process."""
        if self.stage == "icdl":
            self.camera_memory.update(features, intra_ids)
        else:
            labels = self.pseudo_labels[intra_ids]
            if self.cluster_memory.num_clusters > 0:
                self.cluster_memory.update(features, labels)

    @torch.no_grad()
    def set_pseudo_labels(self, pseudo_labels: torch.Tensor, identity_features: torch.Tensor) -> None:
        """Install a new association: labels ``[N]`` (−1 = unassociated), cluster centroids from the
        L2-normalised mean identity features ``[N, D]``, and per-cluster mean text features."""
        device = self.pseudo_labels.device
        labels = pseudo_labels.to(device).long()
        self.pseudo_labels.copy_(labels)
        num_clusters = int(labels.max().item()) + 1 if labels.numel() and labels.max() >= 0 else 0
        keep = labels >= 0
        centroids = torch.zeros(num_clusters, identity_features.shape[1], device=device)
        centroids.index_add_(0, labels[keep], identity_features.to(device).float()[keep])
        self.cluster_memory.reset(torch.nn.functional.normalize(centroids, dim=1))
        text = torch.zeros(num_clusters, self.text_features.shape[1], device=device)
        counts = torch.zeros(num_clusters, device=device)
        text.index_add_(0, labels[keep], self.text_features[keep])
        counts.index_add_(0, labels[keep], torch.ones(int(keep.sum()), device=device))
        self.cluster_text_features = text / counts.clamp_min(1).unsqueeze(1) if self.has_text_features else text[:0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # the number of clusters changes every epoch: size the buffer from the checkpoint
        key = prefix + "cluster_text_features"
        if key in state_dict:
            self.cluster_text_features = torch.empty_like(state_dict[key], device=self.text_features.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


__all__ = ["CCAFLForTraining", "LossSwitches"]
