"""Memories and the global-ID classifier (docs/method.md §4, §5) against slow loops written from the spec."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ccafl_hf.classifier import IdentityClassifier
from ccafl_hf.memory import CameraMemory, ClusterMemory

IDENTITY_CAMIDS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
N, D = IDENTITY_CAMIDS.numel(), 6


def _features(m: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(m, D, generator=torch.Generator().manual_seed(seed)), dim=1)


def _initialized_memory(
    num_instances: int = 4, seed: int = 0, identity_camids: torch.Tensor = IDENTITY_CAMIDS
) -> tuple[CameraMemory, torch.Tensor, torch.Tensor]:
    ids = torch.cat([torch.arange(N), torch.randint(0, N, (30,), generator=torch.Generator().manual_seed(seed))])
    feats = _features(len(ids), seed + 1)
    memory = CameraMemory(N, D, identity_camids, num_instances=num_instances, momentum=0.1, temperature=0.05)
    memory.initialize(feats, ids, generator=torch.Generator().manual_seed(seed + 2))
    return memory, feats, ids


# ----------------------------------------------------------------------------------------------
# CameraMemory
# ----------------------------------------------------------------------------------------------


def test_camera_memory_initialize_matches_loop():
    memory, feats, ids = _initialized_memory()
    assert bool(memory.initialized)
    for n in range(N):
        own = feats[ids == n]
        torch.testing.assert_close(memory.centroids[n], F.normalize(own.mean(0), dim=0))
        for slot in range(memory.num_instances):  # every slot holds one of the identity's own features
            assert ((own - memory.instances[n, slot]).abs().amax(1) == 0).any()


def test_camera_memory_initialize_is_reproducible_and_samples_all_rows():
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8])
    feats = _features(len(ids), 3)
    a = CameraMemory(N, D, IDENTITY_CAMIDS, num_instances=64)
    b = CameraMemory(N, D, IDENTITY_CAMIDS, num_instances=64)
    a.initialize(feats, ids, generator=torch.Generator().manual_seed(7))
    b.initialize(feats, ids, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.instances, b.instances, rtol=0, atol=0)
    for n in (1, 8):  # with 64 draws every feature of a 2- or 3-feature identity is sampled
        own = feats[ids == n]
        hit = (a.instances[n].unsqueeze(1) == own.unsqueeze(0)).all(2).any(0)
        assert hit.all()


def test_camera_memory_initialize_requires_every_identity():
    memory = CameraMemory(N, D, IDENTITY_CAMIDS)
    with pytest.raises(ValueError, match="2 of 9 identities"):
        memory.initialize(_features(7, 0), torch.arange(7))


def _ref_update(centroids, instances, feats, ids, momentum):
    """The reference's rule, identity by identity: its c samples of the batch, in batch order, overwrite
    slots 1..c (always from the first slot; the others untouched); c > I is out of the reference's range,
    ours keeps the first I. Centroid <- normalize(m c + (1 - m) mean)."""
    centroids, instances = centroids.clone(), instances.clone()
    slots = instances.shape[1]
    for y in sorted(set(ids.tolist())):
        own = feats[ids == y]
        for j in range(min(len(own), slots)):
            instances[y, j] = own[j]
        centroids[y] = F.normalize(momentum * centroids[y] + (1 - momentum) * own.mean(0), dim=0)
    return centroids, instances


def test_camera_memory_update_matches_loop():
    memory, _, _ = _initialized_memory(num_instances=3)
    initial = memory.instances.clone()
    state = (memory.centroids.clone(), memory.instances.clone())
    for step in range(3):  # identity 4 appears 5 times (> I = 3): its first 3 samples are written
        ids = torch.tensor([4, 0, 4, 4, 8, 4, 0, 4, 2])
        feats = _features(len(ids), 10 + step)
        memory.update(feats, ids)
        state = _ref_update(*state, feats, ids, 0.1)
        torch.testing.assert_close(memory.centroids, state[0])
        torch.testing.assert_close(memory.instances, state[1], rtol=0, atol=0)
    # identities 0, 8, 2 (2, 1, 1 samples per batch): the slots past their count keep the rebuild's features
    torch.testing.assert_close(memory.instances[0, 2:], initial[0, 2:], rtol=0, atol=0)
    torch.testing.assert_close(memory.instances[[8, 2], 1:], initial[[8, 2], 1:], rtol=0, atol=0)
    torch.testing.assert_close(memory.instances[0, :2], feats[ids == 0], rtol=0, atol=0)  # the latest batch
    assert torch.allclose(memory.centroids.norm(dim=1), torch.ones(N))
    untouched = [1, 3, 5, 6, 7]
    fresh, _, _ = _initialized_memory(num_instances=3)
    torch.testing.assert_close(memory.centroids[untouched], fresh.centroids[untouched])


def test_camera_memory_requires_initialize():
    memory = CameraMemory(N, D, IDENTITY_CAMIDS)
    with pytest.raises(RuntimeError, match="initialize"):
        memory.centroid_loss(_features(2, 0), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="initialize"):
        memory.update(_features(2, 0), torch.tensor([0, 1]))


def _ref_memory_losses(memory: CameraMemory, feats: torch.Tensor, ids: torch.Tensor):
    tau = memory.temperature
    centroid, instance = [], []
    for b in range(len(ids)):
        y = int(ids[b])
        cams = memory.identity_camids
        own = [n for n in range(N) if cams[n] == cams[y]]
        target = torch.tensor([own.index(y)])
        logits = torch.stack([feats[b] @ memory.centroids[n] / tau for n in own])
        centroid.append(F.cross_entropy(logits.unsqueeze(0), target))
        hard = []
        for n in own:
            sims = torch.stack([feats[b] @ memory.instances[n, i] for i in range(memory.num_instances)])
            hard.append((sims.min() if n == y else sims.max()) / tau)
        instance.append(F.cross_entropy(torch.stack(hard).unsqueeze(0), target))
    return torch.stack(centroid).mean(), torch.stack(instance).mean()


# cameras laid end to end (the per-camera blocks), in another camera order, and interleaved (the masked path)
CAMERA_LAYOUTS = [IDENTITY_CAMIDS, torch.tensor([2, 2, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 1, 0, 2, 1, 2, 2, 0, 2])]


@pytest.mark.parametrize("identity_camids", CAMERA_LAYOUTS, ids=["contiguous", "reordered", "interleaved"])
def test_camera_memory_losses_and_gradients_match_loop(identity_camids):
    memory, _, _ = _initialized_memory(num_instances=5, identity_camids=identity_camids)
    ids = torch.tensor([0, 0, 2, 3, 3, 4, 5, 8, 8, 8])
    feats = _features(len(ids), 20)
    x1, x2 = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
    got_c, got_i = memory.centroid_loss(x1, ids), memory.hard_instance_loss(x1, ids)
    ref_c, ref_i = _ref_memory_losses(memory, x2, ids)
    torch.testing.assert_close(got_c, ref_c)
    torch.testing.assert_close(got_i, ref_i)
    (0.6 * got_c + 0.4 * got_i).backward()
    (0.6 * ref_c + 0.4 * ref_i).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(memory.loss(feats, ids, centroid_weight=0.6), 0.6 * ref_c + 0.4 * ref_i)
    torch.testing.assert_close(memory.loss(feats, ids, centroid_weight=0.0), ref_i)


@pytest.mark.parametrize("identity_camids", CAMERA_LAYOUTS[:2], ids=["contiguous", "reordered"])
def test_camera_memory_per_camera_blocks_equal_the_masked_path(identity_camids, monkeypatch):
    """The per-camera blocks give the same [B, N] logits, -inf entries included, in batch order."""
    memory, _, _ = _initialized_memory(num_instances=5, identity_camids=identity_camids)
    ids = torch.tensor([8, 0, 3, 8, 5, 2, 6, 1])
    feats = _features(len(ids), 22)
    assert memory._camera_blocks is not None
    blocks = memory.hard_instance_logits(feats, ids)
    monkeypatch.setattr(memory, "_camera_blocks", None)
    masked = memory.hard_instance_logits(feats, ids)
    assert torch.equal(torch.isinf(blocks), ~memory._own_camera_mask(ids))
    torch.testing.assert_close(blocks, masked)


def test_camera_memory_camera_sum_matches_a_loop_over_cameras():
    """reduction="camera_sum": per camera the mean over its samples, summed over the cameras (4 / 1 / 7
    samples), values and gradients."""
    memory, _, _ = _initialized_memory(num_instances=5)
    ids = torch.tensor([0, 0, 2, 1, 3, 5, 6, 7, 8, 8, 8, 8])
    feats = _features(len(ids), 21)
    x1, x2 = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
    got = memory.loss(x1, ids, centroid_weight=0.6, reduction="camera_sum")
    ref = 0.0
    for camera in IDENTITY_CAMIDS[ids].unique():
        member = IDENTITY_CAMIDS[ids] == camera
        ref_c, ref_i = _ref_memory_losses(memory, x2[member], ids[member])
        ref = ref + 0.6 * ref_c + 0.4 * ref_i
    torch.testing.assert_close(got, ref)
    got.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_camera_memory_state_dict_round_trip():
    memory, _, _ = _initialized_memory(num_instances=3)
    memory.update(_features(4, 30), torch.tensor([0, 0, 5, 7]))
    state = memory.state_dict()
    assert set(state) == {"centroids", "instances", "identity_camids", "initialized"}
    restored = CameraMemory(N, D, IDENTITY_CAMIDS, num_instances=3)
    restored.load_state_dict(state)
    for name, value in state.items():
        assert torch.equal(getattr(restored, name), value), name
    # a checkpoint of the earlier cyclic rule (with its per-identity pointers) still loads
    restored.load_state_dict({**state, "pointers": torch.zeros(N, dtype=torch.long)})


def test_camera_memory_loaded_camera_layout_updates_the_blocks():
    """The per-camera blocks are cached; loading a state dict with other identity cameras refreshes them."""
    memory, _, _ = _initialized_memory(identity_camids=CAMERA_LAYOUTS[1])
    assert memory._camera_blocks == [(0, 2), (2, 5), (5, 9)]
    interleaved, _, _ = _initialized_memory(identity_camids=CAMERA_LAYOUTS[2])
    memory.load_state_dict(interleaved.state_dict())
    assert memory._camera_blocks is None
    ids = torch.tensor([0, 1, 4, 8])
    torch.testing.assert_close(memory.hard_instance_logits(_features(4, 23), ids),
                               interleaved.hard_instance_logits(_features(4, 23), ids))


def test_camera_memory_bf16_and_autocast():
    memory, _, _ = _initialized_memory()
    ids = torch.tensor([0, 3, 5, 5])
    feats = _features(4, 40).bfloat16().requires_grad_(True)
    loss = memory.loss(feats, ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert feats.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = memory.loss(feats.detach().float(), ids)
    torch.testing.assert_close(mixed, memory.loss(feats.detach().float(), ids))
    memory.update(feats.detach(), ids)  # bf16 features are written into the fp32 buffers
    assert memory.instances.dtype == torch.float32


def test_camera_memory_bad_inputs():
    with pytest.raises(ValueError, match="identity_camids"):
        CameraMemory(N, D, IDENTITY_CAMIDS[:-1])
    memory, _, _ = _initialized_memory()
    with pytest.raises(ValueError, match="columns"):
        memory.update(torch.randn(2, D + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="intra_ids"):
        memory.centroid_loss(torch.randn(2, D), torch.tensor([0, N]))
    with pytest.raises(ValueError, match="intra_ids"):
        memory.hard_instance_loss(torch.randn(2, D), torch.tensor([0]))


# ----------------------------------------------------------------------------------------------
# ClusterMemory
# ----------------------------------------------------------------------------------------------


def test_cluster_memory_loss_matches_loop():
    memory = ClusterMemory(D, momentum=0.1, temperature=0.05)
    memory.reset(torch.randn(4, D))
    assert memory.num_clusters == 4
    torch.testing.assert_close(memory.centroids.norm(dim=1), torch.ones(4))
    feats, labels = _features(8, 50), torch.tensor([0, 1, -1, 3, 3, -1, 2, 0])
    ref = torch.stack([
        F.cross_entropy((feats[b] @ memory.centroids.t() / 0.05).unsqueeze(0), labels[b:b + 1])
        for b in range(8) if labels[b] >= 0
    ]).mean()
    torch.testing.assert_close(memory.loss(feats, labels), ref)
    x = feats.clone().requires_grad_(True)
    empty = memory.loss(x, torch.full((8,), -1))
    empty.backward()
    assert empty.item() == 0.0 and (x.grad == 0).all()


def test_cluster_memory_update_uses_least_similar_sample():
    memory = ClusterMemory(D, momentum=0.1)
    memory.reset(torch.randn(5, D, generator=torch.Generator().manual_seed(60)))
    before = memory.centroids.clone()
    feats, labels = _features(10, 61), torch.tensor([0, 2, 2, -1, 0, 4, 2, 0, -1, 4])
    feats[3] = -before[0]  # unlabelled: must be ignored although it is the least similar to cluster 0
    memory.update(feats, labels)
    expected = before.clone()
    for c in set(labels.tolist()) - {-1}:
        members = [b for b in range(10) if labels[b] == c]
        hardest = min(members, key=lambda b: float(feats[b] @ before[c]))
        expected[c] = F.normalize(0.1 * before[c] + 0.9 * feats[hardest], dim=0)
    torch.testing.assert_close(memory.centroids, expected)


def test_cluster_memory_state_dict_with_different_num_clusters():
    source = ClusterMemory(D)
    source.reset(torch.randn(7, D))
    target = ClusterMemory(D)
    target.reset(torch.randn(3, D))
    target.load_state_dict(source.state_dict())
    assert target.num_clusters == 7 and torch.equal(target.centroids, source.centroids)
    empty = ClusterMemory(D)
    assert empty.num_clusters == 0
    empty.load_state_dict(source.state_dict())
    assert empty.num_clusters == 7
    with pytest.raises(RuntimeError, match="size mismatch"):
        ClusterMemory(D + 1).load_state_dict(source.state_dict())


def test_cluster_memory_bad_inputs():
    memory = ClusterMemory(D)
    with pytest.raises(RuntimeError, match="reset"):
        memory.loss(torch.randn(2, D), torch.tensor([0, -1]))
    memory.reset(torch.randn(3, D))
    with pytest.raises(ValueError, match="labels"):
        memory.loss(torch.randn(2, D), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="columns"):
        memory.reset(torch.randn(3, D + 2))
    loss = memory.loss(torch.randn(2, D).bfloat16(), torch.tensor([0, 2]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# IdentityClassifier
# ----------------------------------------------------------------------------------------------


def test_identity_classifier_cosines_and_loss():
    torch.manual_seed(0)
    classifier = IdentityClassifier(N, D, scale=16.0)
    feats = torch.randn(5, D, requires_grad=True)
    ids = torch.tensor([0, 3, 3, 8, 1])
    cos = classifier(feats)
    ref = torch.stack([torch.stack([F.cosine_similarity(feats[b], classifier.weight[n], dim=0) for n in range(N)])
                       for b in range(5)])
    torch.testing.assert_close(cos, ref)
    loss = classifier.classification_loss(feats, ids)
    torch.testing.assert_close(loss, F.cross_entropy(16.0 * ref, ids))
    loss.backward()
    assert feats.grad is None  # trained on detached features only
    assert classifier.weight.grad is not None and torch.isfinite(classifier.weight.grad).all()
    classifier.zero_grad()
    classifier.cosines(feats, detach_weight=True).sum().backward()
    assert classifier.weight.grad is None and feats.grad is not None


def test_identity_classifier_bf16_and_bad_inputs():
    classifier = IdentityClassifier(N, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = classifier(torch.randn(3, D).bfloat16())
    assert cos.dtype == torch.float32
    with pytest.raises(ValueError, match="columns"):
        classifier(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="intra_ids"):
        classifier.classification_loss(torch.randn(3, D), torch.tensor([0, 1]))


def test_camera_memory_empty_batch_gives_zero_loss():
    memory, _, _ = _initialized_memory()
    empty = torch.zeros(0, dtype=torch.long)
    assert memory.hard_instance_logits(torch.zeros(0, D), empty).shape == (0, N)
    assert memory.loss(torch.zeros(0, D), empty).item() == 0.0
