"""The global-ID classifier of CCAFL: a cosine classifier over all intra-camera identities.

It is trained on detached features with its own optimiser; its cosines of non-detached features drive
the camera-adversarial loss (`ccafl_hf.losses`). Its weights are a parameter, so ``state_dict`` carries them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import _check_labels, _check_matrix, fp32_region


class IdentityClassifier(nn.Module):
    """Cosine classifier over all ``N`` intra-camera identities (the global-ID classifier).

    Trained every iteration of stages 2–3 on *detached* features (scale ``s``, margin 0) with its own
    optimiser; its cosines of non-detached features drive the camera-adversarial loss.

    Args:
        num_identities: ``N``.
        feature_dim: ``D``.
        scale: ``s`` of the classification loss.
    """

    def __init__(self, num_identities: int, feature_dim: int, scale: float = 16.0):
        super().__init__()
        if num_identities <= 0 or feature_dim <= 0:
            raise ValueError(f"num_identities and feature_dim must be positive, got {num_identities}, {feature_dim}")
        self.num_identities = num_identities
        self.feature_dim = feature_dim
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_identities, feature_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform, ``U(-a, a)`` with ``a = sqrt(6 / (N + D))``, as the reference. The weights are
        L2-normalised in use, but their norm still matters: Adam moves every weight by about lr per step,
        so the row norm (about ``a sqrt(D / 3)``) sets how fast a class direction turns."""
        nn.init.xavier_uniform_(self.weight)

    def extra_repr(self) -> str:
        return f"num_identities={self.num_identities}, feature_dim={self.feature_dim}, scale={self.scale}"

    def cosines(self, features: torch.Tensor, detach_weight: bool = False) -> torch.Tensor:
        """``[B, D]`` → ``[B, N]`` fp32 cosines between features and class weights.

        With ``detach_weight`` no gradient reaches the classifier (used by the adversarial loss, whose
        gradient must only move the encoder).
        """
        _check_matrix(features, "features", cols=self.feature_dim)
        weight = self.weight.detach() if detach_weight else self.weight
        with fp32_region(features.device):
            return F.normalize(features.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` → ``[B, N]`` cosines (see `cosines`)."""
        return self.cosines(features)

    def classification_loss(self, features: torch.Tensor, intra_ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``s * cos`` (margin 0) on **detached** features ``[B, D]``; ``[B]`` labels.

        The features are detached here, so this loss only trains the classifier weights.
        """
        _check_matrix(features, "features", cols=self.feature_dim)
        _check_labels(intra_ids, "intra_ids", features.shape[0], upper=self.num_identities)
        logits = self.scale * self.cosines(features.detach())
        return F.cross_entropy(logits, intra_ids.long())


__all__ = ["IdentityClassifier"]
