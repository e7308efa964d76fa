"""Losses of docs/method.md §3–§5 against slow per-sample loops written directly from the spec."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import reference_rules
from ccafl_hf.losses import (
    adversarial_identity_loss,
    angular_margin_cosine,
    batch_hard_triplet_loss,
    centroid_triplet_loss,
    inter_camera_image_text_loss,
    intra_camera_image_text_loss,
    prompt_contrastive_loss,
    reduce_per_sample,
)

# 12 identities over 3 cameras, laid end to end
IDENTITY_CAMIDS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
N = IDENTITY_CAMIDS.numel()
# pseudo-identities: {0, 4, 7}, {1, 5, 8, 2} (2 reaches the component through a chain: same camera as 1),
# {6, 9}; the rest unassociated
PSEUDO_LABELS = torch.tensor([0, 1, 1, -1, 0, 1, 2, 0, 1, 2, -1, -1])


def _batch(seed: int = 0, b: int = 20, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    intra_ids = torch.randint(0, N, (b,), generator=g)
    intra_ids[:4] = torch.tensor([0, 0, 5, 5])  # guarantee some repeated identities
    features = torch.randn(b, d, generator=g)
    return features, intra_ids, IDENTITY_CAMIDS[intra_ids]


# ----------------------------------------------------------------------------------------------
# slow references
# ----------------------------------------------------------------------------------------------


def _ref_prompt_contrastive(img, txt, ids, cams):
    img, txt = img.double(), txt.double()
    total = 0.0
    for c in sorted(set(cams.tolist())):
        members = [i for i in range(len(ids)) if cams[i] == c]
        for a, b in ((img, txt), (txt, img)):  # image->text, then text->image
            camera_sum = 0.0
            for i in members:
                logits = torch.stack([a[i] @ b[j] for j in members])
                log_prob = torch.log_softmax(logits, 0)
                pos = [k for k, j in enumerate(members) if ids[j] == ids[i]]
                camera_sum += -sum(log_prob[k] for k in pos) / len(pos)
            total += camera_sum / len(members)
    return total


def _ref_intra_image_text(align, text, ids, id_cams, eps):
    losses = []
    for b in range(len(ids)):
        own = [n for n in range(len(id_cams)) if id_cams[n] == id_cams[ids[b]]]
        log_prob = torch.log_softmax(torch.stack([align[b].double() @ text[n].double() for n in own]), 0)
        q = torch.full((len(own),), eps / len(own), dtype=torch.float64)
        q[own.index(int(ids[b]))] += 1 - eps
        losses.append(-(q * log_prob).sum())
    return torch.stack(losses).mean()


def _ref_batch_hard(x, labels, margin, groups=None):
    x = x.double()
    losses = []
    for a in range(len(labels)):
        if labels[a] < 0:
            continue
        pos, neg = [], []
        for j in range(len(labels)):
            if j == a or labels[j] < 0 or (groups is not None and groups[j] != groups[a]):
                continue
            (pos if labels[j] == labels[a] else neg).append(torch.linalg.norm(x[a] - x[j]))
        if pos and neg:
            losses.append(torch.clamp(max(pos) - min(neg) + margin, min=0))
    return torch.stack(losses).mean() if losses else torch.tensor(0.0, dtype=torch.float64)


def _ref_centroid_triplet(x, ids, cents, id_cams, margin):
    losses = []
    for b in range(len(ids)):
        y = int(ids[b])
        d_pos = torch.linalg.norm(x[b].double() - cents[y].double())
        others = [torch.linalg.norm(x[b].double() - cents[n].double())
                  for n in range(len(id_cams)) if n != y and id_cams[n] == id_cams[y]]
        if others:
            losses.append(torch.clamp(d_pos - min(others) + margin, min=0))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------
# equivalence with the references
# ----------------------------------------------------------------------------------------------


def test_prompt_contrastive_matches_loop():
    img, ids, cams = _batch(0)
    txt = torch.randn(N, 8, generator=torch.Generator().manual_seed(1))[ids]
    got = prompt_contrastive_loss(img, txt, ids, cams)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), _ref_prompt_contrastive(img, txt, ids, cams), rtol=1e-5, atol=1e-5)


def test_prompt_contrastive_gradients_finite():
    img, ids, cams = _batch(2)
    img.requires_grad_(True)
    txt = torch.randn(N, 8, generator=torch.Generator().manual_seed(3))[ids].requires_grad_(True)
    prompt_contrastive_loss(img, txt, ids, cams).backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_intra_camera_image_text_matches_loop(eps):
    align, ids, _ = _batch(4)
    text = torch.randn(N, 8, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    align.requires_grad_(True)
    got = intra_camera_image_text_loss(align, text, ids, IDENTITY_CAMIDS, label_smoothing=eps)
    torch.testing.assert_close(got.double(), _ref_intra_image_text(align.detach(), text.detach(), ids,
                                                                    IDENTITY_CAMIDS, eps), rtol=1e-5, atol=1e-5)
    got.backward()
    assert torch.isfinite(align.grad).all() and torch.isfinite(text.grad).all()
    # texts of other cameras never get a gradient from a camera's samples
    cams_present = set(IDENTITY_CAMIDS[ids].tolist())
    absent = torch.tensor([int(c) not in cams_present for c in IDENTITY_CAMIDS])
    assert (text.grad[absent] == 0).all()


def test_inter_camera_image_text_matches_loop():
    align, _, _ = _batch(6)
    labels = torch.tensor([0, 1, 2, -1, 3] * 4)
    clusters = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    got = inter_camera_image_text_loss(align, clusters, labels, label_smoothing=0.1)
    ref = torch.stack([
        F.cross_entropy((align[b].double() @ clusters.double().t()).unsqueeze(0), labels[b:b + 1], label_smoothing=0.1)
        for b in range(len(labels)) if labels[b] >= 0
    ]).mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    none = inter_camera_image_text_loss(align.requires_grad_(True), clusters, torch.full((20,), -1))
    none.backward()
    assert none.item() == 0.0 and (align.grad == 0).all()


@pytest.mark.parametrize("with_groups", [False, True])
def test_batch_hard_triplet_matches_loop(with_groups):
    x, ids, cams = _batch(8)
    x = F.normalize(x, dim=1)
    labels = PSEUDO_LABELS[ids] if not with_groups else ids
    groups = cams if with_groups else None
    got = batch_hard_triplet_loss(x, labels, margin=0.3, groups=groups)
    torch.testing.assert_close(got.double(), _ref_batch_hard(x, labels, 0.3, groups), rtol=1e-5, atol=1e-5)


def test_batch_hard_triplet_without_valid_anchor_is_zero_with_grad():
    x = torch.randn(4, 8, requires_grad=True)
    loss = batch_hard_triplet_loss(x, torch.tensor([0, 1, 2, -1]))  # no positives at all
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()


def test_batch_hard_triplet_gradient_finite_with_duplicates():
    x = torch.randn(6, 8)
    x[1] = x[0]  # zero distance between a positive pair
    x.requires_grad_(True)
    batch_hard_triplet_loss(x, torch.tensor([0, 0, 1, 1, 2, 2])).backward()
    assert torch.isfinite(x.grad).all()


def test_centroid_triplet_matches_loop():
    x, ids, _ = _batch(9)
    cents = F.normalize(torch.randn(N, 8, generator=torch.Generator().manual_seed(10)), dim=1).requires_grad_(True)
    x.requires_grad_(True)
    got = centroid_triplet_loss(F.normalize(x, dim=1), ids, cents, IDENTITY_CAMIDS, margin=0.3)
    ref = _ref_centroid_triplet(F.normalize(x.detach(), dim=1), ids, cents.detach(), IDENTITY_CAMIDS, 0.3)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    got.backward()
    assert torch.isfinite(x.grad).all() and cents.grad is None  # centroids are constants


def test_icdl_losses_camera_sum_match_a_loop_over_cameras():
    """reduction="camera_sum" (the reference's ICDL reduction): each loss on the samples of one camera,
    averaged over them, then summed over the cameras — on a batch with very unequal camera shares."""
    g = torch.Generator().manual_seed(11)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11])  # 8 / 2 / 10 samples
    cams = IDENTITY_CAMIDS[ids]
    x = F.normalize(torch.randn(len(ids), 8, generator=g), dim=1)
    text = torch.randn(N, 8, generator=g)
    cents = F.normalize(torch.randn(N, 8, generator=g), dim=1)
    members = [cams == c for c in cams.unique()]
    assert sorted(int(m.sum()) for m in members) == [2, 8, 10]

    def per_camera(ref):
        return sum(ref(m) for m in members)

    got = intra_camera_image_text_loss(x, text, ids, IDENTITY_CAMIDS, label_smoothing=0.1, reduction="camera_sum")
    ref = per_camera(lambda m: _ref_intra_image_text(x[m], text, ids[m], IDENTITY_CAMIDS, 0.1))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    got = batch_hard_triplet_loss(x, ids, margin=0.3, groups=cams, reduction="camera_sum")
    ref = per_camera(lambda m: _ref_batch_hard(x[m], ids[m], 0.3))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    got = centroid_triplet_loss(x, ids, cents, IDENTITY_CAMIDS, margin=0.3, reduction="camera_sum")
    ref = per_camera(lambda m: _ref_centroid_triplet(x[m], ids[m], cents, IDENTITY_CAMIDS, 0.3))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # the batch mean weighs cameras by their share: it differs here
    mean = intra_camera_image_text_loss(x, text, ids, IDENTITY_CAMIDS, label_smoothing=0.1)
    assert not torch.isclose(mean * len(members), got, rtol=1e-3)
    with pytest.raises(ValueError, match="reduction"):
        reduce_per_sample(torch.zeros(3), "sum")
    with pytest.raises(ValueError, match="camera"):
        reduce_per_sample(torch.zeros(3), "camera_sum")


def test_adversarial_matches_loop():
    _, ids, _ = _batch(11)
    z = torch.rand(len(ids), N, generator=torch.Generator().manual_seed(12)) * 1.6 - 0.8
    got = adversarial_identity_loss(z, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, margin=0.7, scale=16.0,
                                    same_camera_tau=0.2, epsilon=0.8)
    ref = reference_rules.adversarial_loss(z, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, 0.7, 16.0, 0.2, 0.8).item()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_adversarial_same_camera_chain_member_is_not_positive():
    # identity 2 is in pseudo-identity 1 with identity 1, but shares its camera: it acts as a negative,
    # so raising its cosine must raise the loss of a sample of identity 1
    ids = torch.tensor([1])
    z = torch.zeros(1, N)
    base = adversarial_identity_loss(z, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, margin=0.5)
    z2 = z.clone()
    z2[0, 2] = 0.5
    assert adversarial_identity_loss(z2, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, margin=0.5) > base
    # whereas a cross-camera member (5) is a positive: raising it lowers the loss
    z3 = z.clone()
    z3[0, 5] = 0.5
    assert adversarial_identity_loss(z3, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, margin=0.5) < base


def test_adversarial_gradient_on_cosines_raises_partners_lowers_negatives():
    _, ids, _ = _batch(18)
    ids = ids[PSEUDO_LABELS[ids] >= 0]
    z = (torch.rand(len(ids), N, generator=torch.Generator().manual_seed(19)) - 0.5).requires_grad_(True)
    adversarial_identity_loss(z, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, margin=0.7).backward()
    partner = (PSEUDO_LABELS[ids].unsqueeze(1) == PSEUDO_LABELS.unsqueeze(0)) & \
              (IDENTITY_CAMIDS[ids].unsqueeze(1) != IDENTITY_CAMIDS.unsqueeze(0))
    own = F.one_hot(ids, N).bool()
    assert (z.grad[partner] < 0).all()  # descent raises cross-camera partners
    assert (z.grad[own] < 0).all()
    assert (z.grad[~partner & ~own] > 0).all()  # and lowers every other identity


@pytest.mark.parametrize("seed", [13, 14, 15])
def test_adversarial_step_pulls_towards_cross_camera_partners(seed):
    """One small gradient step on the features raises the classifier's evidence for the sample's
    associated identities in other cameras relative to the non-positive identities."""
    g = torch.Generator().manual_seed(seed)
    weight = F.normalize(torch.randn(N, 16, generator=g), dim=1)
    ids = torch.tensor([0, 1, 6, 8])
    feats = (weight[ids] + 0.3 * torch.randn(4, 16, generator=g)).requires_grad_(True)

    def cosines(f):
        return F.normalize(f, dim=1) @ weight.t()

    loss = adversarial_identity_loss(cosines(feats), ids, IDENTITY_CAMIDS, PSEUDO_LABELS, margin=0.7)
    loss.backward()
    assert torch.isfinite(feats.grad).all()
    partner = (PSEUDO_LABELS[ids].unsqueeze(1) == PSEUDO_LABELS.unsqueeze(0)) & \
              (IDENTITY_CAMIDS[ids].unsqueeze(1) != IDENTITY_CAMIDS.unsqueeze(0))
    others = ~partner & (torch.arange(N).unsqueeze(0) != ids.unsqueeze(1))

    def evidence_gap(z):  # log-sum-exp of scaled partner scores minus that of the other identities
        logits = 16.0 * z
        return logits.masked_fill(~partner, -1e9).logsumexp(1) - logits.masked_fill(~others, -1e9).logsumexp(1)

    with torch.no_grad():
        assert (evidence_gap(cosines(feats - 0.05 * feats.grad)) > evidence_gap(cosines(feats))).all()


def test_adversarial_unassociated_is_margin_cross_entropy():
    ids = torch.tensor([3, 10])  # pseudo-label -1: P = {y}, q = onehot
    z = torch.rand(2, N, generator=torch.Generator().manual_seed(14)) - 0.5
    got = adversarial_identity_loss(z, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, margin=0.3, epsilon=0.8)
    ref = reference_rules.adversarial_loss(z, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, 0.3, 16.0, 0.2, 0.0).item()
    assert got.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("margin", [0.7, 0.3])
def test_adversarial_margin_past_pi_matches_reference(margin):
    """Own-class cosine -0.9: theta + m > pi for m = 0.7 (the fallback cos - m sin m), < pi for m = 0.3;
    value and gradient equal the reference rule, and the fallback is monotone (never rewards a worse angle)."""
    ids = torch.tensor([0, 1, 6, 8])
    z = torch.rand(len(ids), N, generator=torch.Generator().manual_seed(31), dtype=torch.float64) * 1.6 - 0.8
    z[torch.arange(len(ids)), ids] = -0.9
    z[1, ids[1]] = 0.2  # one sample on the ordinary branch
    assert (math.acos(-0.9) + margin > math.pi) == (margin == 0.7)
    ours = z.clone().requires_grad_(True)
    loss = adversarial_identity_loss(ours, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, margin=margin)
    loss.backward()
    ref_z = z.clone().requires_grad_(True)
    ref = reference_rules.adversarial_loss(ref_z, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, margin, 16.0, 0.2, 0.8)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(ours.grad.double(), ref_z.grad, rtol=1e-4, atol=1e-6)
    adjusted = angular_margin_cosine(torch.linspace(-1, 1, 2001, dtype=torch.float64), margin)
    assert (adjusted.diff() > 0).all()  # monotone in the cosine on both branches
    if margin == 0.7:  # the fallback value at -0.9 is -0.9 - 0.7 sin 0.7, not cos(acos(-0.9) + 0.7)
        value = angular_margin_cosine(torch.tensor([-0.9], dtype=torch.float64), margin).item()
        assert value == pytest.approx(-0.9 - 0.7 * math.sin(0.7))
        assert value != pytest.approx(math.cos(math.acos(-0.9) + 0.7), abs=1e-3)


def test_adversarial_gradient_finite_at_unit_cosine():
    z = torch.zeros(1, N)
    z[0, 0] = 1.0
    z.requires_grad_(True)
    adversarial_identity_loss(z, torch.tensor([0]), IDENTITY_CAMIDS, PSEUDO_LABELS, margin=0.5).backward()
    assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------------------------
# mixed precision and validation
# ----------------------------------------------------------------------------------------------


def test_bf16_inputs_give_fp32_losses():
    x, ids, cams = _batch(15)
    xb = F.normalize(x, dim=1).bfloat16().requires_grad_(True)
    text = torch.randn(N, 8).bfloat16()
    losses = [
        prompt_contrastive_loss(xb, text[ids], ids, cams),
        intra_camera_image_text_loss(xb, text, ids, IDENTITY_CAMIDS),
        inter_camera_image_text_loss(xb, text[:3], PSEUDO_LABELS[ids].clamp_max(2)),
        batch_hard_triplet_loss(xb, ids, groups=cams),
        centroid_triplet_loss(xb, ids, text.float(), IDENTITY_CAMIDS),
        adversarial_identity_loss(xb @ text.t() / 10, ids, IDENTITY_CAMIDS, PSEUDO_LABELS, margin=0.5),
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses.append(intra_camera_image_text_loss(x, text.float(), ids, IDENTITY_CAMIDS))
    for loss in losses:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    sum(losses[:-1]).backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


def test_autocast_does_not_lower_precision():
    align, ids, _ = _batch(16)
    text = torch.randn(N, 8)
    plain = intra_camera_image_text_loss(align, text, ids, IDENTITY_CAMIDS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = intra_camera_image_text_loss(align, text, ids, IDENTITY_CAMIDS)
    assert mixed.item() == plain.item()


def test_bad_inputs_raise():
    x, ids, cams = _batch(17)
    with pytest.raises(ValueError, match="text_features"):
        prompt_contrastive_loss(x, x[:-1], ids, cams)
    with pytest.raises(ValueError, match="intra_ids"):
        prompt_contrastive_loss(x, x, ids[:-1], cams)
    with pytest.raises(ValueError, match="columns"):
        intra_camera_image_text_loss(x, torch.randn(N, 5), ids, IDENTITY_CAMIDS)
    with pytest.raises(ValueError, match="intra_ids"):
        intra_camera_image_text_loss(x, torch.randn(N, 8), ids + N, IDENTITY_CAMIDS)
    with pytest.raises(ValueError, match="label_smoothing"):
        inter_camera_image_text_loss(x, torch.randn(3, 8), ids % 3, label_smoothing=1.5)
    with pytest.raises(ValueError, match="labels"):
        inter_camera_image_text_loss(x, torch.randn(3, 8), ids)  # labels beyond C
    with pytest.raises(ValueError, match="2-D"):
        batch_hard_triplet_loss(x[0], ids[:1])
    with pytest.raises(ValueError, match="integers"):
        batch_hard_triplet_loss(x, ids.float())
    with pytest.raises(ValueError, match="identity_camids"):
        centroid_triplet_loss(x, ids, torch.randn(N, 8), IDENTITY_CAMIDS[:-1])
    with pytest.raises(ValueError, match="pseudo_labels"):
        adversarial_identity_loss(torch.rand(len(ids), N), ids, IDENTITY_CAMIDS, PSEUDO_LABELS[:-1], margin=0.5)
