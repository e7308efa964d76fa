"""`CCAFLForTraining`: the CCAFL model plus every training-time state of stages 2–3, as one module.

Camera memories, the global cluster memory, the global-ID classifier, the stage-1 text features
and the pseudo-labels are registered modules/buffers, so `state_dict`, Trainer checkpoints and
resume carry them. `forward` runs the image tower (the one forward DDP sees per step); the trainer
asks the active objective for the losses of those outputs, with this module as their state. The
memories and the classifier are kept out of DDP's synchronisation: the memories are made identical
on every rank by updating them with gathered features, and the classifier is trained by its own
optimiser on gathered (detached) features.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..classifier import IdentityClassifier
from ..errors import NonFiniteError
from ..memory import CameraMemory, ClusterMemory, cluster_features
from ..modeling_ccafl import CCAFLModel, CCAFLOutput

logger = logging.getLogger(__name__)


def set_image_stage_trainable(model: CCAFLModel, freeze_patch_embedding: bool = False) -> list[str]:
    """Stages 2–3: the image tower, the neck weight and the visual projection train; the text tower is
    frozen. With ``freeze_patch_embedding`` the ViT patch projection
    (``vision_model.embeddings.patch_embedding``) stays frozen too; a tower without one gets a warning.

    Returns:
        names of the trainable parameters.
    """
    model.requires_grad_(False)
    model.vision_model.requires_grad_(True)
    model.visual_projection.requires_grad_(True)
    if isinstance(model.neck, nn.BatchNorm1d):
        model.neck.weight.requires_grad_(True)
    if freeze_patch_embedding:
        patch = getattr(getattr(model.vision_model, "embeddings", None), "patch_embedding", None)
        if isinstance(patch, nn.Module):
            patch.requires_grad_(False)
        else:
            logger.warning("--freeze_patch_embedding: the image tower %s has no patch projection; nothing frozen",
                           type(model.vision_model).__name__)
    return [name for name, param in model.named_parameters() if param.requires_grad]


class CCAFLForTraining(nn.Module):
    """Training wrapper of stages 2–3 (docs/method.md §4–§5).

    Args:
        model: the `CCAFLModel` being trained (image tower + neck train; text tower frozen).
        identity_camids: ``[N]`` camera of every intra-camera identity.
        text_features: ``[N, P]`` stage-1 text feature of every identity (None disables image–text losses;
            a non-finite value is a `NonFiniteError`).
        memory_instances: I, instance slots per identity in the camera memories.
        memory_momentum, memory_temperature: m and τ of the camera and global memories.
        classifier_scale: scale of the global-ID cosine classifier.
    """

    def __init__(
        self,
        model: CCAFLModel,
        identity_camids: torch.Tensor,
        text_features: torch.Tensor | None,
        *,
        memory_instances: int = 32,
        memory_momentum: float = 0.1,
        memory_temperature: float = 0.05,
        classifier_scale: float = 16.0,
    ):
        super().__init__()
        if text_features is not None and not bool(torch.isfinite(text_features).all()):
            raise NonFiniteError("the stage-1 text features (prompt stage, after its last step) hold NaN or "
                                 "infinite values: the prompts diverged; lower --prompt_learning_rate or "
                                 "--prompt_init_std")
        self.model = model
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
            num_identities, dim, self.identity_camids, num_instances=memory_instances,
            momentum=memory_momentum, temperature=memory_temperature,
        )
        self.cluster_memory = ClusterMemory(dim, momentum=memory_momentum, temperature=memory_temperature)
        self.classifier = IdentityClassifier(num_identities, dim, scale=classifier_scale)
        self.losses_on_global_batch = True  # several processes: losses over the gathered batch (trainers/distributed.py)
        # DDP neither broadcasts these buffers nor reduces the classifier's gradients (see the module docstring)
        self._ddp_params_and_buffers_to_ignore = [
            name for name, _ in [*self.named_buffers(), *self.classifier.named_parameters(prefix="classifier")]
            if not name.startswith("model.")
        ]

    def forward(self, pixel_values: torch.Tensor, **unused) -> CCAFLOutput:
        """The image tower on a batch ``[B, 3, H, W]``: `CCAFLOutput` with ``reid_features [B, D]`` and
        ``alignment_features [B, P]`` (the losses are the objective's, computed by the trainer)."""
        return self.model.get_reid_outputs(pixel_values)

    @torch.no_grad()
    def set_pseudo_labels(
        self, pseudo_labels: torch.Tensor, image_features: torch.Tensor, image_intra_ids: torch.Tensor
    ) -> None:
        """Install a new association: labels ``[N]`` (−1 = unassociated), and the cluster centroids and
        per-cluster text features of `cluster_features` (averages over the cluster's images) from the
        L2-normalised retrieval features ``[M, D]`` of the training images and their identities ``[M]``."""
        device = self.pseudo_labels.device
        labels = pseudo_labels.to(device).long()
        self.pseudo_labels.copy_(labels)
        centroids, text = cluster_features(labels, image_features, image_intra_ids, self.text_features)
        self.cluster_memory.reset(centroids)
        self.cluster_text_features = text if self.has_text_features else text[:0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # the number of clusters changes every epoch: size the buffer from the checkpoint
        key = prefix + "cluster_text_features"
        if key in state_dict:
            self.cluster_text_features = torch.empty_like(state_dict[key], device=self.text_features.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


__all__ = ["CCAFLForTraining", "set_image_stage_trainable"]
