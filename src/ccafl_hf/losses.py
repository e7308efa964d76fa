"""Loss functions of CCAFL (docs/method.md §3–§5), as pure functions.

Every function casts its inputs to float32 and runs with autocast disabled, so the losses are exact
under bf16/fp16 mixed precision; gradients flow back in the inputs' dtype. Nothing here loops over
samples, identities or cameras: per-camera terms are expressed with ``[B, B]`` or ``[B, N]`` masks.

Conventions:

* ``B`` batch size, ``N`` intra-camera identities, ``C`` pseudo-identities (clusters),
  ``D`` retrieval-feature width, ``P`` CLIP projection width.
* ``intra_ids`` ``[B]`` intra-camera identity of each sample (``0..N-1``); ``identity_camids`` ``[N]``
  camera of each identity; ``camids`` ``[B]`` camera of each sample.
* Label ``-1`` means "no label" where a function says so; such samples contribute nothing.
* A loss with no contributing sample is an exact zero that stays connected to the autograd graph.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = [
    "adversarial_identity_loss",
    "angular_margin_cosine",
    "batch_hard_triplet_loss",
    "centroid_triplet_loss",
    "fp32_region",
    "reduce_per_sample",
    "inter_camera_image_text_loss",
    "intra_camera_image_text_loss",
    "prompt_contrastive_loss",
]


# ----------------------------------------------------------------------------------------------
# shared helpers (also used by `memory.py`)
# ----------------------------------------------------------------------------------------------


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Context in which autocast is off on ``device``, so ``x.float() @ y.float()`` really is fp32."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_matrix(x: torch.Tensor, name: str, rows: int | None = None, cols: int | None = None) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating ``[rows, cols]`` tensor (``None`` = any size)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got shape {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(x.shape)}")


def _check_labels(labels: torch.Tensor, name: str, size: int, upper: int | None = None, allow_unlabelled: bool = False) -> None:
    """Raise ``ValueError`` unless ``labels`` is an integer ``[size]`` tensor with values in range.

    Values must lie in ``[0, upper)`` (``[-1, upper)`` when ``allow_unlabelled``); on an accelerator the
    range is asserted on the device, without a host sync.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != size:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length {size}, got shape {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {labels.dtype}")
    if upper is None or labels.numel() == 0:
        return
    low = -1 if allow_unlabelled else 0
    if labels.device.type != "cpu":
        # on an accelerator a host-side check would stall every step: assert on the device instead
        # (the step fails with a device-side assertion rather than computing a wrong loss)
        torch._assert_async(((labels >= low) & (labels < upper)).all(), f"{name} out of range [{low}, {upper - 1}]")
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < low or hi >= upper:
        raise ValueError(f"{name} must lie in [{low}, {upper - 1}], got values in [{lo}, {hi}]")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[mask]`` (``[B]`` each) without a host sync; exactly 0 (with grad) if empty."""
    total = values.masked_fill(~mask, 0.0).sum()
    return total / mask.sum().clamp_min(1).to(total.dtype)


REDUCTIONS = ("mean", "camera_sum")


def reduce_per_sample(
    values: torch.Tensor, reduction: str = "mean", cameras: torch.Tensor | None = None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Reduce per-sample losses ``[B]`` to a scalar.

    * ``"mean"``: mean over the valid samples of the batch;
    * ``"camera_sum"``: for every camera present, the mean over its valid samples, **summed** over the
      cameras (the reference's ICDL reduction: cameras count equally, whatever their share of the
      batch). A camera without valid samples contributes 0.

    Args:
        values: ``[B]`` per-sample losses.
        cameras: ``[B]`` camera of each sample (required by ``"camera_sum"``).
        valid: ``[B]`` bool, the samples that count (default: all).
    Returns:
        scalar (0 with grad when nothing is valid); no host sync.
    """
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    if reduction == "mean":
        return _masked_mean(values, valid)
    if reduction != "camera_sum":
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if cameras is None:
        raise ValueError("reduction 'camera_sum' needs the camera of every sample")
    # each valid sample weighs 1 / (valid samples of its camera): the sum is the sum of camera means
    same_camera = cameras.unsqueeze(0) == cameras.unsqueeze(1)
    per_camera = (same_camera & valid.unsqueeze(0)).sum(1).clamp_min(1).to(values.dtype)
    return (values.masked_fill(~valid, 0.0) / per_camera).sum()


def _pairwise_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[A, B']`` between rows of ``a`` ``[A, D]`` and ``b`` ``[B', D]`` (fp32).

    The squared distance is clamped at 1e-12 before the square root so the gradient stays finite.
    """
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * (a @ b.t())
    return sq.clamp_min(1e-12).sqrt()


def _smoothed_cross_entropy(log_probs: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor,
                            label_smoothing: float) -> torch.Tensor:
    """Per-sample label-smoothed cross-entropy ``[B]`` over a per-row set of classes.

    Args:
        log_probs: ``[B, K]`` log-softmax over the allowed classes (``-inf`` elsewhere).
        targets: ``[B]`` true class (must be allowed in its row).
        allowed: ``[B, K]`` bool, the classes of each row; smoothing spreads ``label_smoothing``
            uniformly over them, i.e. ``q = (1 - eps) onehot + eps / K_row`` (PyTorch's convention).
    """
    safe = log_probs.masked_fill(~allowed, 0.0)  # avoids -inf * 0 = NaN
    nll = -safe.gather(1, targets.unsqueeze(1)).squeeze(1)
    if label_smoothing == 0.0:
        return nll
    uniform = -safe.sum(1) / allowed.sum(1).clamp_min(1).to(safe.dtype)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")


# ----------------------------------------------------------------------------------------------
# stage 1 (§3)
# ----------------------------------------------------------------------------------------------


def prompt_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, intra_ids: torch.Tensor, camids: torch.Tensor
) -> torch.Tensor:
    """Same-camera supervised contrastive loss between images and identity prompts (docs/method.md §3).

    For each camera ``c`` in the batch, with ``S_c`` its samples: image→text, every image ``i`` in
    ``S_c`` is contrasted against the texts of ``S_c`` (logits = raw dot products, temperature 1),
    its positives being the texts of samples with the same identity (itself included)::

        l_i2t(i) = -mean_{j in S_c, y_j = y_i} log softmax_{j' in S_c}(img_i . txt_j')[j]

    text→image is the same with the roles swapped. Each camera's term is the mean over its samples,
    and the loss is the sum over the cameras present of ``mean l_i2t + mean l_t2i``.

    Args:
        image_features: ``[B, P]`` cached alignment features.
        text_features: ``[B, P]`` text feature of each sample's own identity prompt.
        intra_ids: ``[B]`` intra-camera identity of each sample.
        camids: ``[B]`` camera of each sample.
    Returns:
        scalar fp32 loss.
    """
    _check_matrix(image_features, "image_features")
    b, p = image_features.shape
    _check_matrix(text_features, "text_features", rows=b, cols=p)
    _check_labels(intra_ids, "intra_ids", b)
    _check_labels(camids, "camids", b)
    with fp32_region(image_features.device):
        logits = image_features.float() @ text_features.float().t()  # [B (images), B (texts)]
        same_cam = camids.unsqueeze(0) == camids.unsqueeze(1)  # symmetric
        positive = same_cam & (intra_ids.unsqueeze(0) == intra_ids.unsqueeze(1))  # symmetric, has diagonal
        # each sample weighs 1 / (#samples of its camera): the sum over samples is the sum of camera means
        weight = 1.0 / same_cam.sum(1).to(logits.dtype)
        num_pos = positive.sum(1).to(logits.dtype)

        def directional(scores: torch.Tensor) -> torch.Tensor:
            log_prob = torch.log_softmax(scores.masked_fill(~same_cam, float("-inf")), dim=1)
            per_sample = -log_prob.masked_fill(~positive, 0.0).sum(1) / num_pos
            return (per_sample * weight).sum()

        return directional(logits) + directional(logits.t())


# ----------------------------------------------------------------------------------------------
# image–text losses of stages 2 and 3 (§4, §5)
# ----------------------------------------------------------------------------------------------


def intra_camera_image_text_loss(
    align_features: torch.Tensor,
    text_features: torch.Tensor,
    intra_ids: torch.Tensor,
    identity_camids: torch.Tensor,
    label_smoothing: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Image → own-camera identity texts, label-smoothed cross-entropy (docs/method.md §4).

    Logits of sample ``b`` are the dot products ``align_b . text_n`` for the ``N_c`` identities ``n``
    of its own camera ``c`` (all other identities are excluded from its softmax). Label smoothing is
    spread over those ``N_c`` identities — a per-camera class count, not a fixed one (§8):
    ``q = (1 - eps) onehot(y) + eps / N_c``. Mean over the samples of the batch, or with
    ``reduction="camera_sum"`` the sum over cameras of each camera's mean (see `reduce_per_sample`).

    Args:
        align_features: ``[B, P]`` alignment features.
        text_features: ``[N, P]`` stage-1 text feature of every intra-camera identity.
        intra_ids: ``[B]`` identity of each sample.
        identity_camids: ``[N]`` camera of every identity.
        label_smoothing: ``eps``.
        reduction: ``"mean"`` or ``"camera_sum"``.
    Returns:
        scalar fp32 loss.
    """
    _check_matrix(align_features, "align_features")
    b, p = align_features.shape
    _check_matrix(text_features, "text_features", cols=p)
    n = text_features.shape[0]
    _check_labels(identity_camids, "identity_camids", n)
    _check_labels(intra_ids, "intra_ids", b, upper=n)
    _check_smoothing(label_smoothing)
    with fp32_region(align_features.device):
        logits = align_features.float() @ text_features.float().t()  # [B, N]
        own_camera = identity_camids.unsqueeze(0) == identity_camids[intra_ids].unsqueeze(1)
        log_probs = torch.log_softmax(logits.masked_fill(~own_camera, float("-inf")), dim=1)
        per_sample = _smoothed_cross_entropy(log_probs, intra_ids, own_camera, label_smoothing)
        return reduce_per_sample(per_sample, reduction, cameras=identity_camids[intra_ids])


def inter_camera_image_text_loss(
    align_features: torch.Tensor,
    cluster_text_features: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """Image → pseudo-identity texts, label-smoothed cross-entropy over all ``C`` clusters (docs/method.md §5).

    Args:
        align_features: ``[B, P]`` alignment features.
        cluster_text_features: ``[C, P]`` mean text feature of each pseudo-identity.
        labels: ``[B]`` pseudo-identity of each sample, ``-1`` = unassociated (excluded).
        label_smoothing: ``eps``; ``q = (1 - eps) onehot + eps / C``.
    Returns:
        scalar fp32 loss, mean over the labelled samples (0 if there are none).
    """
    _check_matrix(align_features, "align_features")
    b, p = align_features.shape
    _check_matrix(cluster_text_features, "cluster_text_features", cols=p)
    c = cluster_text_features.shape[0]
    if c == 0:
        raise ValueError("cluster_text_features has no rows (no pseudo-identities)")
    _check_labels(labels, "labels", b, upper=c, allow_unlabelled=True)
    _check_smoothing(label_smoothing)
    with fp32_region(align_features.device):
        logits = align_features.float() @ cluster_text_features.float().t()  # [B, C]
        valid = labels >= 0
        log_probs = torch.log_softmax(logits, dim=1)
        allowed = torch.ones_like(log_probs, dtype=torch.bool)
        per_sample = _smoothed_cross_entropy(log_probs, labels.clamp_min(0), allowed, label_smoothing)
        return _masked_mean(per_sample, valid)


# ----------------------------------------------------------------------------------------------
# triplet losses (§4, §5)
# ----------------------------------------------------------------------------------------------


def batch_hard_triplet_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.3,
    groups: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Batch-hard triplet loss with Euclidean distances (docs/method.md §4, §5).

    For every anchor ``a``: hardest positive = farthest other sample with the same label, hardest
    negative = closest sample with a different label; ``max(0, d_ap - d_an + margin)``. With
    ``groups`` (e.g. camera ids) both positives and negatives are restricted to the anchor's group
    (the within-camera version of stage 2). Samples labelled ``-1`` are neither anchors, positives
    nor negatives; anchors without a positive (other than themselves) or a negative are excluded.

    Args:
        features: ``[B, D]`` retrieval features.
        labels: ``[B]`` identity / pseudo-identity, ``-1`` = unlabelled.
        margin: triplet margin.
        groups: optional ``[B]`` group of each sample.
        reduction: ``"mean"`` over the valid anchors, or ``"camera_sum"``: per group (camera) the mean
            over its valid anchors, summed over the groups (needs ``groups``).
    Returns:
        scalar fp32 loss (0 if there is no valid anchor).
    """
    _check_matrix(features, "features")
    b = features.shape[0]
    _check_labels(labels, "labels", b)
    if groups is not None:
        _check_labels(groups, "groups", b)
    with fp32_region(features.device):
        x = features.float()
        dist = _pairwise_euclidean(x, x)  # [B, B]
        labelled = labels >= 0
        comparable = labelled.unsqueeze(0) & labelled.unsqueeze(1)
        if groups is not None:
            comparable = comparable & (groups.unsqueeze(0) == groups.unsqueeze(1))
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        eye = torch.eye(b, dtype=torch.bool, device=features.device)
        positive = comparable & same & ~eye
        negative = comparable & ~same
        hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(1)
        hardest_neg = dist.masked_fill(~negative, float("inf")).amin(1)
        valid = positive.any(1) & negative.any(1)
        per_anchor = F.relu(hardest_pos - hardest_neg + margin).masked_fill(~valid, 0.0)
        return reduce_per_sample(per_anchor, reduction, cameras=groups, valid=valid)


def centroid_triplet_loss(
    features: torch.Tensor,
    intra_ids: torch.Tensor,
    centroids: torch.Tensor,
    identity_camids: torch.Tensor,
    margin: float = 0.3,
    reduction: str = "mean",
) -> torch.Tensor:
    """Triplet loss against the camera memory's centroids (docs/method.md §4).

    ``max(0, ||f - c_y|| - min_{n != y, cam(n) = cam(y)} ||f - c_n|| + margin)`` with Euclidean
    distances, mean over the samples whose camera has at least one other identity. The centroids are
    treated as constants (detached); pass the snapshot taken *before* this step's memory update.

    Args:
        features: ``[B, D]`` retrieval features.
        intra_ids: ``[B]`` identity of each sample.
        centroids: ``[N, D]`` per-identity centroids.
        identity_camids: ``[N]`` camera of every identity.
        margin: triplet margin.
        reduction: ``"mean"`` or ``"camera_sum"`` (see `reduce_per_sample`).
    Returns:
        scalar fp32 loss.
    """
    _check_matrix(features, "features")
    b, d = features.shape
    _check_matrix(centroids, "centroids", cols=d)
    n = centroids.shape[0]
    _check_labels(identity_camids, "identity_camids", n)
    _check_labels(intra_ids, "intra_ids", b, upper=n)
    with fp32_region(features.device):
        dist = _pairwise_euclidean(features.float(), centroids.detach().float())  # [B, N]
        own = F.one_hot(intra_ids, n).bool()
        negative = (identity_camids.unsqueeze(0) == identity_camids[intra_ids].unsqueeze(1)) & ~own
        d_pos = dist.gather(1, intra_ids.unsqueeze(1)).squeeze(1)
        d_neg = dist.masked_fill(~negative, float("inf")).amin(1)
        valid = negative.any(1)
        per_sample = F.relu(d_pos - d_neg + margin).masked_fill(~valid, 0.0)
        return reduce_per_sample(per_sample, reduction, cameras=identity_camids[intra_ids], valid=valid)


# ----------------------------------------------------------------------------------------------
# camera-adversarial loss (§5)
# ----------------------------------------------------------------------------------------------


def angular_margin_cosine(cosines: torch.Tensor, margin: float) -> torch.Tensor:
    """ArcFace's additive angular margin on cosines ``z`` (any shape), with its fallback past ``pi``.

    ``cos(theta + m)`` with ``theta = arccos z`` while ``theta + m < pi`` (``z > cos(pi - m)``); beyond,
    where ``cos(theta + m)`` would rise again with ``theta``, the monotone ``z - m sin(m)`` (the reference's
    and ArcFace's rule; the value jumps at ``theta = pi - m``). ``cos(theta + m)`` is evaluated as
    ``z cos m - sqrt(1 - z^2) sin m``, whose gradient is finite everywhere except ``|z| = 1``, where the
    square root is clamped (``1 - z^2 >= 1e-12``).
    """
    z = cosines
    sine = (1.0 - z * z).clamp_min(1e-12).sqrt()
    shifted = z * math.cos(margin) - sine * math.sin(margin)
    return torch.where(z > math.cos(math.pi - margin), shifted, z - margin * math.sin(margin))


def adversarial_identity_loss(
    cosines: torch.Tensor,
    intra_ids: torch.Tensor,
    identity_camids: torch.Tensor,
    pseudo_labels: torch.Tensor,
    margin: float,
    scale: float = 16.0,
    same_camera_tau: float = 0.2,
    epsilon: float = 0.8,
) -> torch.Tensor:
    """Camera-adversarial loss on the global-ID classifier's cosines (docs/method.md §5).

    For a sample of identity ``y`` (camera ``c``, pseudo-identity ``g``):

    * positives ``P = {y} ∪ {n : pseudo(n) = g, cam(n) != c}`` — members of ``y``'s pseudo-identity in
      *other* cameras. Members of the same component that share ``y``'s camera (possible through chains
      of accepted pairs) are not positives; they are treated like every other same-camera identity.
      If ``y`` is unassociated (``g = -1``), ``P = {y}``; callers normally leave such samples out.
    * ``z_y <- cos(arccos(z_y) + margin)`` (additive angular margin on the own logit) while
      ``arccos(z_y) + margin < pi``, else ``z_y - margin sin(margin)`` (`angular_margin_cosine`);
      ``z_n <- (1 + tau) z_n + tau`` for the other identities of camera ``c``; all logits ``× scale``.
    * for ``k in P``: ``log p_k = s z_k - log(sum_{n not in P} exp(s z_n) + exp(s z_k))``.
    * ``q = (1 - eps) onehot(y) + eps / |P|`` on ``P``; loss ``= -sum_{k in P} q_k log p_k``.

    Mean over the samples.

    Args:
        cosines: ``[B, N]`` classifier cosines of (non-detached) features.
        intra_ids: ``[B]`` identity of each sample.
        identity_camids: ``[N]`` camera of every identity.
        pseudo_labels: ``[N]`` pseudo-identity of every identity, ``-1`` = unassociated.
        margin: additive angular margin ``m`` (radians).
        scale: ``s``.
        same_camera_tau: ``tau`` of the same-camera re-weighting.
        epsilon: ``eps``, the target mass spread over the positives.
    Returns:
        scalar fp32 loss (0 for an empty batch).
    """
    _check_matrix(cosines, "cosines")
    b, n = cosines.shape
    _check_labels(intra_ids, "intra_ids", b, upper=n)
    _check_labels(identity_camids, "identity_camids", n)
    _check_labels(pseudo_labels, "pseudo_labels", n, upper=n, allow_unlabelled=True)
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
    with fp32_region(cosines.device):
        z = cosines.float()
        own = F.one_hot(intra_ids, n).bool()  # [B, N]
        sample_cam = identity_camids[intra_ids].unsqueeze(1)
        sample_group = pseudo_labels[intra_ids].unsqueeze(1)
        same_camera = identity_camids.unsqueeze(0) == sample_cam
        partner = (sample_group >= 0) & (pseudo_labels.unsqueeze(0) == sample_group) & ~same_camera
        positive = own | partner

        adjusted = torch.where(own, angular_margin_cosine(z, margin), z)
        adjusted = torch.where(same_camera & ~own, (1.0 + same_camera_tau) * z + same_camera_tau, adjusted)
        logits = scale * adjusted

        negative_lse = torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=1, keepdim=True)
        log_p = logits - torch.logaddexp(negative_lse, logits)  # meaningful on P only
        num_pos = positive.sum(1, keepdim=True).to(z.dtype)
        target = torch.where(positive, epsilon / num_pos, torch.zeros_like(z)) + (1.0 - epsilon) * own.to(z.dtype)
        per_sample = -(target * log_p.masked_fill(~positive, 0.0)).sum(1)
        return per_sample.sum() / max(b, 1)
