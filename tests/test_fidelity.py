"""The last details of fidelity to the authors' code (docs/method.md §8): each rule of the package against a
slow port of the reference rule written from its description — the global-ID classifier's initialisation
and its step before the adversarial forward, the camera memory's instance slots, the image-count weighting
of the ICAL cluster features, and the stage-1 schedule."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ccafl_hf import create_tiny_model
from ccafl_hf.classifier import IdentityClassifier
from ccafl_hf.data import ReIDCollator, build_eval_transform, build_train_transform
from ccafl_hf.memory import cluster_features
from ccafl_hf.trainers import CCAFLForTraining, CCAFLTrainer, CCAFLTrainingArguments


def _collators(model, processor):
    height, width = model.config.image_size
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    return (ReIDCollator(build_train_transform(height, width, mean, std)),
            ReIDCollator(build_eval_transform(height, width, mean, std)))


# ------------------------------------------------------------------------------------------------
# 2. global-ID classifier: xavier-uniform, and its Adam step before the adversarial forward
# ------------------------------------------------------------------------------------------------


def test_classifier_init_is_xavier_uniform():
    torch.manual_seed(0)
    n, d = 3262, 2048  # Market-1501 identities x RN50 retrieval width
    weight = IdentityClassifier(n, d).weight.detach()
    bound = math.sqrt(6 / (n + d))  # 0.034
    assert bound == pytest.approx(0.0336, abs=1e-4)
    assert weight.abs().max() <= bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)  # U(-a, a)
    assert weight.norm(dim=1).mean().item() == pytest.approx(bound * math.sqrt(d / 3), rel=0.01)


def _reference_adversarial(cosines, ids, id_cams, pseudo, m, s=16.0, tau=0.2, eps=0.8):
    """docs/method.md §5 sample by sample (with the reference's margin fallback past pi)."""
    total = 0.0
    for b in range(len(ids)):
        y = int(ids[b])
        positives = [y] + [n for n in range(len(id_cams))
                           if pseudo[y] >= 0 and pseudo[n] == pseudo[y] and id_cams[n] != id_cams[y]]
        logits = []
        for n in range(len(id_cams)):
            z = cosines[b, n]
            if n == y:
                z = z * math.cos(m) - torch.sqrt(1 - z * z) * math.sin(m) if z > math.cos(math.pi - m) \
                    else z - m * math.sin(m)
            elif id_cams[n] == id_cams[y]:
                z = (1 + tau) * z + tau
            logits.append(s * z)
        negatives = sum(torch.exp(logits[n]) for n in range(len(id_cams)) if n not in positives)
        for k in positives:
            q = eps / len(positives) + (1 - eps if k == y else 0.0)
            total = total - q * (logits[k] - torch.log(negatives + torch.exp(logits[k])))
    return total / len(ids)


def _adam_first_step(weight, grad, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """Adam's first step (L2 decay added to the gradient), from its definition."""
    g = grad + weight_decay * weight
    m_hat = (1 - betas[0]) * g / (1 - betas[0])
    v_hat = (1 - betas[1]) * g * g / (1 - betas[1])
    return weight - lr * m_hat / (v_hat.sqrt() + eps)


def test_classifier_steps_before_the_adversarial_loss(small_synthetic, tmp_path):
    """One training step of the ICAL loop in an adversarial epoch (only the adversarial loss on) equals the
    reference's order: x = encoder(images); the classifier's Adam steps on CE(16 cos(x.detach(), W));
    the adversarial loss reads the **updated** W; its gradient reaches the encoder only."""
    dataset, info = small_synthetic
    model, processor = create_tiny_model(seed=0)
    train_collator, eval_collator = _collators(model, processor)
    args = CCAFLTrainingArguments(
        output_dir=str(tmp_path), num_identities_per_batch=4, num_instances=2, iters_per_epoch=2, icdl_epochs=1,
        ical_epochs=1, adversarial_start_epoch=1, adversarial_end_epoch=1, classifier_learning_rate=0.05,
        use_memory_loss=False, use_image_text_loss=False, use_triplet_loss=False, adversarial_margin=0.5,
        disable_tqdm=True, logging_strategy="no", save_strategy="no", report_to="none", seed=0,
    )
    camids = torch.as_tensor(info.identity_camids)
    module = CCAFLForTraining(model, camids, None, args)
    n = camids.numel()
    pseudo = torch.arange(n) // 3  # toy association: groups of three consecutive identities
    module.pseudo_labels.copy_(pseudo)
    trainer = CCAFLTrainer(module, args, dataset["train"], train_collator, eval_collator, stages=("ical",))
    trainer.begin_epoch(0, resumed_mid_epoch=True)  # the adversarial epoch, keeping the toy pseudo-labels
    assert trainer.objective.adversarial_active(trainer.loop_epoch)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this test steps past
    batch = eval_collator([dataset["train"][i] for i in range(0, 16, 2)])

    reference_model = copy.deepcopy(model).train()
    w0 = module.classifier.weight.detach().clone()
    trainer.training_step(trainer.model, batch)

    # the reference, from its description
    x = reference_model.get_reid_features(batch["pixel_values"])
    ids = batch["intra_ids"]
    w = w0.clone().requires_grad_(True)
    F.cross_entropy(16 * F.normalize(x.detach(), dim=1) @ F.normalize(w, dim=1).t(), ids).backward()
    w1 = _adam_first_step(w0, w.grad, lr=0.05, weight_decay=args.classifier_weight_decay)
    torch.testing.assert_close(module.classifier.weight.detach(), w1, rtol=1e-5, atol=1e-6)

    def encoder_grads(weight):
        reference_model.zero_grad()
        cosines = (F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()).double()
        _reference_adversarial(cosines, ids, camids, pseudo, m=0.5).backward(retain_graph=True)
        return {k: p.grad.clone() for k, p in reference_model.named_parameters() if p.grad is not None}

    expected, stale = encoder_grads(w1), encoder_grads(w0)
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected)
    scale = max(g.abs().max().item() for g in expected.values())  # fp32 against float64: to 1e-5 of the largest
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5 * scale)
    # the order matters here: the gradients with the classifier before its step are measurably different
    assert max((expected[k] - stale[k]).abs().max() / expected[k].abs().max() for k in expected) > 1e-2
    # the gradient the adversarial loss could leave on W is discarded: W's gradient is the classification loss's
    torch.testing.assert_close(module.classifier.weight.grad, w.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# 3. camera-memory instance slots: see tests/test_memory.py (test_camera_memory_update_matches_loop)
# 4. ICAL cluster centroids and text features averaged over the cluster's images
# ------------------------------------------------------------------------------------------------


def _reference_cluster_features(pseudo, image_features, image_ids, text_features):
    """§5 with the reference's averages, cluster by cluster, image by image."""
    centroids, texts = [], []
    for g in range(int(pseudo.max()) + 1):
        images = [k for k in range(len(image_ids)) if pseudo[image_ids[k]] == g]
        centroids.append(F.normalize(sum(image_features[k] for k in images), dim=0))
        texts.append(sum(text_features[image_ids[k]] for k in images) / len(images))
    return torch.stack(centroids), torch.stack(texts)


def test_cluster_features_weight_identities_by_image_count(tiny_model):
    model, _ = tiny_model
    g = torch.Generator().manual_seed(3)
    n, d = 9, model.reid_feature_dim
    camids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    pseudo = torch.tensor([0, -1, 1, 0, 1, 2, 2, -1, 0])
    image_ids = torch.tensor([0, 0, 0, 0, 1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 8, 2, 2, 2, 2, 2])  # 1 to 7 images
    image_features = F.normalize(torch.randn(len(image_ids), d, generator=g), dim=1)
    text_features = torch.randn(n, model.projection_dim, generator=g)
    ref_centroids, ref_texts = _reference_cluster_features(pseudo, image_features, image_ids, text_features)

    centroids, texts = cluster_features(pseudo, image_features, image_ids, text_features)
    torch.testing.assert_close(centroids, ref_centroids)
    torch.testing.assert_close(texts, ref_texts)
    # not the equal-weight average of unit identity means: identity 2 (6 images) outweighs 4 (3) in cluster 1
    equal = F.normalize(F.normalize(image_features[image_ids == 2].mean(0), dim=0)
                        + F.normalize(image_features[image_ids == 4].mean(0), dim=0), dim=0)
    assert not torch.allclose(centroids[1], equal, atol=1e-3)

    args = CCAFLTrainingArguments(output_dir="unused", report_to="none")
    module = CCAFLForTraining(model, camids, text_features, args)
    module.set_pseudo_labels(pseudo, image_features, image_ids)
    torch.testing.assert_close(module.cluster_memory.centroids, ref_centroids)
    torch.testing.assert_close(module.cluster_text_features, ref_texts)
    assert torch.equal(module.pseudo_labels, pseudo)
