"""The memories of CCAFL (docs/method.md §4, §5); the global-ID classifier is in `ccafl_hf.classifier`.

* `CameraMemory` — the ICDL camera memories: a centroid and ``I`` instance slots per intra-camera
  identity, with centroid and hard-instance losses restricted to the sample's own camera.
* `ClusterMemory` — the ICAL global memory: one centroid per pseudo-identity.
* `cluster_features` — a new association's centroids and text features, weighted by image counts.

All state lives in registered buffers, so it is part of ``state_dict`` (checkpoints and resume carry
it). Updates are ``@torch.no_grad()``, vectorised, and deterministic given their inputs; under several
processes call them with features and labels gathered from every rank so all ranks stay identical.
Buffers are float32 whatever the feature dtype; losses are computed in fp32 with autocast disabled.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .losses import _check_labels, _check_matrix, _masked_mean, fp32_region, reduce_per_sample

logger = logging.getLogger(__name__)

__all__ = ["CameraMemory", "ClusterMemory", "cluster_features"]


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _rank_within_label(labels: torch.Tensor, num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Occurrence rank of every sample among the samples of its label, in batch order.

    Args:
        labels: ``[B]`` values in ``[0, num_labels)``.
    Returns:
        ``rank`` ``[B]`` (0 for the first sample of a label, 1 for the second, …) and
        ``counts`` ``[num_labels]`` (samples per label).
    """
    counts = torch.bincount(labels, minlength=num_labels)
    order = torch.sort(labels, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of every label
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]]
    return rank, counts


class CameraMemory(nn.Module):
    """Per-camera identity memory of ICDL (docs/method.md §4), for all cameras at once.

    Buffers: ``centroids`` ``[N, D]`` (L2-normalised), ``instances`` ``[N, I, D]``, ``identity_camids``
    ``[N]`` and ``initialized`` (bool).

    Instance update rule (the reference's): when an identity has ``k`` samples in a batch, its ``j``-th
    sample in batch order (``j = 0..k-1``) is written to slot ``j`` — always from the first slot — and
    slots ``k..I-1`` keep what they hold. With ``K <= I`` (8 <= 32 in every preset) the first ``K`` slots
    hold the identity's latest batch and the others the features sampled at the epoch's rebuild. If
    ``k > I`` (the reference would fail) only the first ``I`` samples are written.

    Loss reduction: every sample's cross-entropy runs over its own camera's identities (others masked
    with ``-inf``). ``reduction="camera_sum"`` is the reference's: per camera the mean over its samples,
    **summed** over the cameras in the batch (cameras count equally); ``"mean"`` averages over the batch.

    Args:
        num_identities: ``N``.
        feature_dim: ``D``.
        identity_camids: ``[N]`` camera of every identity.
        num_instances: ``I`` instance slots per identity.
        momentum: ``m`` of the centroid update ``c <- m c + (1 - m) mean``.
        temperature: ``tau`` of the similarity logits.
    """

    centroids: torch.Tensor
    instances: torch.Tensor
    identity_camids: torch.Tensor
    initialized: torch.Tensor

    def __init__(
        self,
        num_identities: int,
        feature_dim: int,
        identity_camids: torch.Tensor,
        num_instances: int = 32,
        momentum: float = 0.1,
        temperature: float = 0.05,
    ):
        super().__init__()
        if num_identities <= 0 or feature_dim <= 0 or num_instances <= 0:
            raise ValueError(
                f"num_identities, feature_dim and num_instances must be positive, got "
                f"{num_identities}, {feature_dim}, {num_instances}"
            )
        _check_labels(identity_camids, "identity_camids", num_identities)
        _check_momentum(momentum)
        _check_temperature(temperature)
        self.num_identities = num_identities
        self.feature_dim = feature_dim
        self.num_instances = num_instances
        self.momentum = momentum
        self.temperature = temperature
        device = identity_camids.device
        self.register_buffer("centroids", torch.zeros(num_identities, feature_dim, device=device))
        self.register_buffer("instances", torch.zeros(num_identities, num_instances, feature_dim, device=device))
        self.register_buffer("identity_camids", identity_camids.detach().long().clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self._cache_camera_blocks()
        # loading a state dict may bring other identity cameras: the cached blocks follow them
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module._cache_camera_blocks())

    def extra_repr(self) -> str:
        return (
            f"num_identities={self.num_identities}, feature_dim={self.feature_dim}, "
            f"num_instances={self.num_instances}, momentum={self.momentum}, temperature={self.temperature}"
        )

    def _check_batch(self, features: torch.Tensor, intra_ids: torch.Tensor) -> None:
        _check_matrix(features, "features", cols=self.feature_dim)
        _check_labels(intra_ids, "intra_ids", features.shape[0], upper=self.num_identities)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # checkpoints of the earlier cyclic slot rule carry its per-identity pointers: no longer state
        state_dict.pop(prefix + "pointers", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _require_initialized(self) -> None:
        if not bool(self.initialized):
            raise RuntimeError("CameraMemory is not initialised: call initialize() with features of every identity")

    @torch.no_grad()
    def initialize(
        self, features: torch.Tensor, intra_ids: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Rebuild the memory from the features of the whole training set.

        Centroid of identity ``n`` = L2-normalised mean of its features; its ``I`` instance slots are
        filled by sampling its features uniformly with replacement. Under several processes pass a generator seeded identically on every rank.

        Args:
            features: ``[M, D]`` retrieval features (L2-normalised).
            intra_ids: ``[M]`` identity of each feature; every identity must occur at least once.
            generator: RNG of the sampling; it decides the device the random numbers are drawn on.
        """
        self._check_batch(features, intra_ids)
        n = self.num_identities
        device = self.centroids.device
        x = features.detach().to(device=device, dtype=torch.float32)
        ids = intra_ids.to(device).long()
        counts = torch.bincount(ids, minlength=n)
        missing = int((counts == 0).sum())
        if missing:
            raise ValueError(f"{missing} of {n} identities have no feature; every identity needs at least one")
        sums = torch.zeros_like(self.centroids).index_add_(0, ids, x)
        self.centroids.copy_(F.normalize(sums / counts.unsqueeze(1).to(sums.dtype), dim=1))

        # slot s of identity n takes sorted row starts[n] + floor(u * counts[n]), u ~ U[0, 1)
        order = torch.sort(ids, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        rand_device = generator.device if generator is not None else device
        u = torch.rand(n, self.num_instances, generator=generator, device=rand_device).to(device)
        offset = torch.minimum((u * counts.unsqueeze(1)).long(), counts.unsqueeze(1) - 1)
        self.instances.copy_(x[order[starts.unsqueeze(1) + offset]])
        self.initialized.fill_(True)
        logger.debug("CameraMemory initialised from %d features of %d identities", x.shape[0], n)

    @torch.no_grad()
    def update(self, features: torch.Tensor, intra_ids: torch.Tensor) -> None:
        """Write a batch into the memory (in the training step: after the backward pass, before the optimiser
        step, with the step's detached features).

        Instance slots follow the reference's rule of the class docstring; for every identity in
        the batch, ``c <- normalize(m c + (1 - m) mean of its batch features)``.

        Args:
            features: ``[B, D]`` retrieval features (gathered from all processes under DDP).
            intra_ids: ``[B]`` identity of each feature.
        """
        self._check_batch(features, intra_ids)
        self._require_initialized()
        n, slots = self.num_identities, self.num_instances
        device = self.centroids.device
        x = features.detach().to(device=device, dtype=torch.float32)
        ids = intra_ids.to(device).long()
        rank, counts = _rank_within_label(ids, n)

        keep = rank < slots  # the j-th sample of an identity goes to slot j (the first I samples)
        self.instances[ids[keep], rank[keep]] = x[keep]

        present = counts > 0
        sums = torch.zeros_like(self.centroids).index_add_(0, ids, x)
        means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
        moved = F.normalize(self.momentum * self.centroids + (1.0 - self.momentum) * means, dim=1)
        self.centroids.copy_(torch.where(present.unsqueeze(1), moved, self.centroids))

    def _own_camera_mask(self, intra_ids: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` bool: identity ``n`` belongs to the camera of sample ``b``."""
        return self.identity_camids.unsqueeze(0) == self.identity_camids[intra_ids].unsqueeze(1)

    def centroid_logits(self, features: torch.Tensor, intra_ids: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` fp32 logits ``f . c_n / tau``, ``-inf`` outside the sample's camera."""
        self._check_batch(features, intra_ids)
        self._require_initialized()
        with fp32_region(features.device):
            logits = features.float() @ self.centroids.t() / self.temperature
            return logits.masked_fill(~self._own_camera_mask(intra_ids), float("-inf"))

    def _cache_camera_blocks(self) -> None:
        """Cache, once per layout of ``identity_camids``, the ``(start, end)`` identity range of every
        camera in identity order when each camera's identities are contiguous (the layout of
        `intra_camera_index`), else ``None``; and the ranges' ends as a buffer for `torch.bucketize`."""
        cams = self.identity_camids.cpu()
        values, counts = torch.unique_consecutive(cams, return_counts=True)
        ends = torch.cumsum(counts, 0)
        contiguous = values.numel() == torch.unique(cams).numel()
        self._camera_blocks = list(zip([0, *ends[:-1].tolist()], ends.tolist())) if contiguous else None
        self.register_buffer("camera_block_ends", ends.to(self.identity_camids.device), persistent=False)

    def hard_instance_logits(self, features: torch.Tensor, intra_ids: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` fp32 logits: the true identity's **least** similar instance, every other identity's
        **most** similar instance, divided by ``tau``; ``-inf`` outside the sample's camera.

        When each camera's identities are contiguous (always, for datasets built by this package)
        the similarities are computed camera by camera, ``[B_c, N_c * I]`` against that camera's
        instances only (about ``1 / cameras`` of the work); otherwise against all ``N * I`` instances,
        then masked. Either way the selection is made without gradient and the chosen entries are
        gathered, so autograd keeps no ``[B, N, I]`` tensor.
        """
        self._check_batch(features, intra_ids)
        self._require_initialized()
        blocks = self._camera_blocks
        with fp32_region(features.device):
            x = features.float()
            ids = intra_ids.long()
            if blocks is None or ids.numel() == 0:
                logits = self._hard_instance_block(x, ids, 0, self.num_identities)
                return logits.masked_fill(~self._own_camera_mask(ids), float("-inf"))
            # group the batch by camera (one host read: the group sizes), one block per camera present
            camera_index = torch.bucketize(ids, self.camera_block_ends, right=True)  # block of each sample
            order = torch.argsort(camera_index, stable=True)
            sizes = torch.bincount(camera_index, minlength=len(blocks)).tolist()
            pieces, offset = [], 0
            for (start, end), size in zip(blocks, sizes):
                if size == 0:
                    continue
                rows = order[offset:offset + size]
                offset += size
                block = self._hard_instance_block(x[rows], ids[rows] - start, start, end)
                pieces.append(F.pad(block, (start, self.num_identities - end), value=float("-inf")))
            return torch.cat(pieces)[torch.argsort(order)]

    def _hard_instance_block(self, x: torch.Tensor, local_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Hard-instance logits ``[b, end - start]`` of features ``x [b, D]`` (fp32) against identities
        ``start..end-1``; ``local_ids`` ``[b]`` are the samples' identities minus ``start``."""
        n, slots = end - start, self.num_instances
        sims = x @ self.instances[start:end].reshape(n * slots, -1).t()  # [b, n*I], a view of the buffer
        with torch.no_grad():
            per_identity = sims.detach().reshape(-1, n, slots)
            chosen = per_identity.argmax(2)  # hardest negatives
            hardest_positive = per_identity.gather(
                1, local_ids.view(-1, 1, 1).expand(-1, 1, slots)
            ).squeeze(1).argmin(1)
            chosen.scatter_(1, local_ids.unsqueeze(1), hardest_positive.unsqueeze(1))
            index = chosen + torch.arange(n, device=chosen.device).unsqueeze(0) * slots
        return sims.gather(1, index) / self.temperature

    def _reduce(self, logits: torch.Tensor, intra_ids: torch.Tensor, reduction: str) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, intra_ids.long(), reduction="none")
        return reduce_per_sample(per_sample, reduction, cameras=self.identity_camids[intra_ids])

    def centroid_loss(self, features: torch.Tensor, intra_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over own-camera centroids. ``[B, D]``, ``[B]`` → scalar (``reduction``: mean | camera_sum)."""
        return self._reduce(self.centroid_logits(features, intra_ids), intra_ids, reduction)

    def hard_instance_loss(self, features: torch.Tensor, intra_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of `hard_instance_logits`. ``[B, D]``, ``[B]`` → scalar (``reduction``: mean | camera_sum)."""
        return self._reduce(self.hard_instance_logits(features, intra_ids), intra_ids, reduction)

    def loss(
        self, features: torch.Tensor, intra_ids: torch.Tensor, centroid_weight: float = 0.6, reduction: str = "mean"
    ) -> torch.Tensor:
        """``lambda * centroid_loss + (1 - lambda) * hard_instance_loss`` with ``lambda = centroid_weight``."""
        if not 0.0 <= centroid_weight <= 1.0:
            raise ValueError(f"centroid_weight must lie in [0, 1], got {centroid_weight}")
        total = features.new_zeros((), dtype=torch.float32)
        if centroid_weight > 0.0:
            total = total + centroid_weight * self.centroid_loss(features, intra_ids, reduction)
        if centroid_weight < 1.0:
            total = total + (1.0 - centroid_weight) * self.hard_instance_loss(features, intra_ids, reduction)
        return total


class ClusterMemory(nn.Module):
    """Global pseudo-identity memory of ICAL (docs/method.md §5).

    Buffer ``centroids`` ``[C, D]``; ``C`` changes with every association, so `reset` replaces the
    buffer and loading a ``state_dict`` resizes it to the checkpoint's ``C``.

    Args:
        feature_dim: ``D``.
        momentum: ``m`` of ``c <- normalize(m c + (1 - m) f_hard)``.
        temperature: ``tau`` of the logits ``f . c / tau``.
        num_clusters: initial ``C`` (centroids start at zero; call `reset` before use).
    """

    centroids: torch.Tensor

    def __init__(self, feature_dim: int, momentum: float = 0.1, temperature: float = 0.05, num_clusters: int = 0):
        super().__init__()
        if feature_dim <= 0 or num_clusters < 0:
            raise ValueError(f"feature_dim must be positive and num_clusters >= 0, got {feature_dim}, {num_clusters}")
        _check_momentum(momentum)
        _check_temperature(temperature)
        self.feature_dim = feature_dim
        self.momentum = momentum
        self.temperature = temperature
        self.register_buffer("centroids", torch.zeros(num_clusters, feature_dim))

    @property
    def num_clusters(self) -> int:
        """``C``, the current number of pseudo-identities."""
        return self.centroids.shape[0]

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, num_clusters={self.num_clusters}, "
            f"momentum={self.momentum}, temperature={self.temperature}"
        )

    @torch.no_grad()
    def reset(self, centroids: torch.Tensor) -> None:
        """Replace the memory with ``centroids`` ``[C, D]`` (stored L2-normalised, fp32, on this module's device)."""
        _check_matrix(centroids, "centroids", cols=self.feature_dim)
        self.centroids = F.normalize(centroids.detach().to(device=self.centroids.device, dtype=torch.float32), dim=1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "centroids"
        if key in state_dict:
            saved = state_dict[key]
            if saved.dim() == 2 and saved.shape[1] == self.feature_dim:  # else the base class reports the mismatch
                self.centroids = torch.empty(saved.shape, dtype=self.centroids.dtype, device=self.centroids.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _check_batch(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if self.num_clusters == 0:
            raise RuntimeError("ClusterMemory is empty: call reset() with the pseudo-identity centroids")
        _check_matrix(features, "features", cols=self.feature_dim)
        _check_labels(labels, "labels", features.shape[0], upper=self.num_clusters, allow_unlabelled=True)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` → ``[B, C]`` fp32 logits ``f . c / tau``."""
        _check_matrix(features, "features", cols=self.feature_dim)
        with fp32_region(features.device):
            return features.float() @ self.centroids.t() / self.temperature

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over all ``C`` centroids, mean over samples with ``labels >= 0`` (0 if none).

        Args:
            features: ``[B, D]`` retrieval features.
            labels: ``[B]`` pseudo-identity, ``-1`` = unassociated (excluded).
        """
        self._check_batch(features, labels)
        per_sample = F.cross_entropy(self.logits(features), labels.long(), ignore_index=-1, reduction="none")
        return _masked_mean(per_sample, labels >= 0)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Move every cluster in the batch towards its **least** similar batch sample.

        ``c <- normalize(m c + (1 - m) f_hard)``, with ``f_hard`` the sample of that cluster with the
        smallest ``f . c`` (ties: the earliest in the batch). Samples labelled ``-1`` are ignored.

        Args:
            features: ``[B, D]`` retrieval features (gathered from all processes under DDP).
            labels: ``[B]`` pseudo-identity, ``-1`` = unassociated.
        """
        self._check_batch(features, labels)
        device = self.centroids.device
        x = features.detach().to(device=device, dtype=torch.float32)
        labels = labels.to(device).long()
        keep = labels >= 0
        x, labels = x[keep], labels[keep]
        if labels.numel() == 0:
            return
        c = self.num_clusters
        sims = (x * self.centroids[labels]).sum(1)  # [B']
        lowest = torch.full((c,), float("inf"), device=device).scatter_reduce(0, labels, sims, reduce="amin")
        positions = torch.arange(labels.numel(), device=device)
        candidate = torch.where(sims == lowest[labels], positions, labels.numel())
        hardest = torch.full((c,), labels.numel(), device=device).scatter_reduce(0, labels, candidate, reduce="amin")
        present = hardest < labels.numel()
        clusters = present.nonzero().squeeze(1)
        moved = self.momentum * self.centroids[clusters] + (1.0 - self.momentum) * x[hardest[clusters]]
        self.centroids[clusters] = F.normalize(moved, dim=1)


@torch.no_grad()
def cluster_features(
    pseudo_labels: torch.Tensor,
    image_features: torch.Tensor,
    image_intra_ids: torch.Tensor,
    text_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ICAL global memory's centroids and the per-cluster text features of an association (docs/method.md
    §5), both averaged over the cluster's **images**, as the reference: an identity weighs its image count.

    ``centroid_g = normalize(sum of the image features of g)``;
    ``text_g = sum_{i in g} n_i t_i / sum_{i in g} n_i`` (not normalised), ``n_i`` = images of identity ``i``.

    Args:
        pseudo_labels: ``[N]`` pseudo-identity of every intra-camera identity, ``0..C-1`` or ``-1``.
        image_features: ``[M, D]`` L2-normalised retrieval features of the training images.
        image_intra_ids: ``[M]`` intra-camera identity of each image.
        text_features: ``[N, P]`` stage-1 text feature of every identity, or None.
    Returns:
        ``centroids`` ``[C, D]`` (fp32, L2-normalised) and ``texts`` ``[C, P]`` (fp32; None without text
        features), on ``pseudo_labels``' device.
    """
    n = pseudo_labels.numel()
    _check_labels(pseudo_labels, "pseudo_labels", n, upper=n, allow_unlabelled=True)
    _check_matrix(image_features, "image_features")
    _check_labels(image_intra_ids, "image_intra_ids", image_features.shape[0], upper=n)
    device = pseudo_labels.device
    labels = pseudo_labels.long()
    num_clusters = int(labels.max()) + 1 if n and bool((labels >= 0).any()) else 0
    image_labels = labels[image_intra_ids.to(device).long()]
    keep = image_labels >= 0
    x = image_features.detach().to(device=device, dtype=torch.float32)[keep]
    sums = torch.zeros(num_clusters, x.shape[1], device=device).index_add_(0, image_labels[keep], x)
    centroids = F.normalize(sums, dim=1)
    if text_features is None:
        return centroids, None
    _check_matrix(text_features, "text_features", rows=n)
    counts = torch.bincount(image_intra_ids.to(device).long(), minlength=n).to(torch.float32)  # n_i
    associated = labels >= 0
    t = text_features.detach().to(device=device, dtype=torch.float32)
    weighted = torch.zeros(num_clusters, t.shape[1], device=device).index_add_(
        0, labels[associated], counts[associated].unsqueeze(1) * t[associated])
    totals = torch.zeros(num_clusters, device=device).index_add_(0, labels[associated], counts[associated])
    return centroids, weighted / totals.clamp_min(1).unsqueeze(1)
