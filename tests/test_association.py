"""Cross-camera association against a slow dense implementation written from docs/method.md §5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccafl_hf import association, neighbors
from ccafl_hf.association import associate_across_cameras, association_diagnostics


def _dense_reference(features: np.ndarray, cameras: np.ndarray, num_pairs: int) -> tuple[np.ndarray, list]:
    """docs/method.md §5 steps 1-4, literally: full N x N matrix, sort, Python walk, union-find."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    sq = (x * x).sum(1)
    dist = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    candidates = [(dist[i, j], i, j) for i in range(n) for j in range(i + 1, n) if cameras[i] != cameras[j]]
    candidates.sort()
    partner_in_cam = set()  # (identity, camera) that already has an accepted partner
    accepted = []
    for _, i, j in candidates[:num_pairs]:
        if (i, cameras[j]) not in partner_in_cam and (j, cameras[i]) not in partner_in_cam:
            partner_in_cam.add((i, cameras[j]))
            partner_in_cam.add((j, cameras[i]))
            accepted.append((i, j))
    parent = list(range(n))

    def find(u):
        while parent[u] != u:
            u = parent[u]
        return u

    for i, j in accepted:
        parent[find(i)] = find(j)
    in_pair = {u for p in accepted for u in p}
    labels = np.full(n, -1, dtype=np.int64)
    root_label = {}
    for u in range(n):  # clusters numbered by smallest member
        if u in in_pair:
            root = find(u)
            root_label.setdefault(root, len(root_label))
            labels[u] = root_label[root]
    return labels, accepted


def _clustered_data(num_persons, num_cams, dim=16, noise=0.35, seed=0, normalise=True):
    """Identities = noisy copies of person vectors seen by random camera subsets, plus a camera bias.

    Camera ids are non-contiguous integers and rows are shuffled, so cameras are interleaved.
    """
    rng = np.random.default_rng(seed)
    persons = rng.standard_normal((num_persons, dim))
    cam_bias = 0.5 * rng.standard_normal((num_cams, dim))
    seen = rng.random((num_persons, num_cams)) < 0.45
    seen[np.arange(num_persons), rng.integers(0, num_cams, num_persons)] = True
    pid, cam = np.nonzero(seen)
    x = persons[pid] + cam_bias[cam] + noise * rng.standard_normal((len(pid), dim))
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(pid))
    cam_ids = np.array([3, 7, 11, 2, 5, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47])[:num_cams]
    return x[perm].astype(np.float32), cam_ids[cam[perm]], pid[perm]


def _num_cross_pairs(cameras):
    counts = np.unique(cameras, return_counts=True)[1]
    return (len(cameras) ** 2 - int((counts**2).sum())) // 2


CASES = [
    # (persons, cameras, budget as rate of N or "all"/"over"/0)
    (25, 2, 1.7),
    (30, 3, 1.5),
    (80, 6, 1.7),
    (120, 15, 1.3),
    (150, 6, 5.0),
    (40, 3, "all"),
    (40, 6, "over"),
    (40, 6, 0),
]


def _budget(rate, cameras):
    n = len(cameras)
    if rate == "all":
        return _num_cross_pairs(cameras)
    if rate == "over":
        return _num_cross_pairs(cameras) + 17
    return int(rate * n)


@pytest.mark.parametrize("persons, cams, rate", CASES)
def test_matches_dense_reference(persons, cams, rate):
    x, cameras, _ = _clustered_data(persons, cams, seed=persons + cams)
    m = _budget(rate, cameras)
    labels, pairs = associate_across_cameras(x, cameras, m, return_pairs=True)
    ref_labels, ref_pairs = _dense_reference(x, cameras, m)
    assert labels.dtype == np.int64 and labels.shape == (len(x),)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(pairs, np.array(ref_pairs, dtype=np.int64).reshape(-1, 2))
    if m == 0:
        assert (labels == -1).all()


@pytest.mark.parametrize("persons, cams, rate", [(200, 6, 1.7), (90, 15, 3.0), (60, 2, 8.0)])
def test_growth_rounds_match_dense_reference(monkeypatch, persons, cams, rate):
    """k starts at 1 and grows by 2, so many rows go through several search rounds."""
    monkeypatch.setattr(association, "_MIN_INITIAL_K", 1)
    monkeypatch.setattr(association, "_INITIAL_K_FACTOR", 0.0)
    monkeypatch.setattr(association, "_K_GROWTH", 2)
    calls = []
    real_knn = association.faiss.knn
    monkeypatch.setattr(
        association.faiss,
        "knn",
        lambda q, b, k, metric: calls.append(len(q)) or real_knn(q, b, k, metric=metric),
    )
    x, cameras, _ = _clustered_data(persons, cams, seed=persons)
    m = int(rate * len(x))
    labels = associate_across_cameras(x, cameras, m)
    np.testing.assert_array_equal(labels, _dense_reference(x, cameras, m)[0])
    # k really grew: rows were searched again.
    assert sum(calls) > len(x)


def test_unnormalised_float64_and_torch_inputs():
    x, cameras, _ = _clustered_data(60, 4, normalise=False, seed=5)
    x64 = x.astype(np.float64) * 3.0 + 1.0
    m = int(1.7 * len(x))
    ref = _dense_reference(x64, cameras, m)[0]
    np.testing.assert_array_equal(associate_across_cameras(x64, cameras, m), ref)
    np.testing.assert_array_equal(
        associate_across_cameras(torch.from_numpy(x64), torch.from_numpy(cameras), m), ref
    )
    x32 = x64.astype(np.float32)
    np.testing.assert_array_equal(
        associate_across_cameras(torch.from_numpy(x32), cameras, np.int64(m)),
        _dense_reference(x32, cameras, m)[0],
    )


def test_labels_are_canonical_and_consistent_with_pairs():
    x, cameras, _ = _clustered_data(100, 6, seed=3)
    labels, pairs = associate_across_cameras(x, cameras, int(1.7 * len(x)), return_pairs=True)
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert (cameras[pairs[:, 0]] != cameras[pairs[:, 1]]).all()
    assert (labels[pairs[:, 0]] == labels[pairs[:, 1]]).all()
    in_pair = np.zeros(len(x), bool)
    in_pair[pairs.ravel()] = True
    assert ((labels >= 0) == in_pair).all()
    first_member = [np.flatnonzero(labels == c)[0] for c in range(labels.max() + 1)]
    assert first_member == sorted(first_member)
    # No identity has two accepted partners in one camera.
    keys = np.concatenate(
        [pairs[:, 0] * 100 + cameras[pairs[:, 1]], pairs[:, 1] * 100 + cameras[pairs[:, 0]]]
    )
    assert len(np.unique(keys)) == len(keys)


def test_bad_inputs():
    x, cameras, _ = _clustered_data(10, 3)
    with pytest.raises(ValueError, match=">= 2 cameras"):
        associate_across_cameras(x, np.zeros(len(x), np.int64), 5)
    with pytest.raises(ValueError, match="NaN"):
        bad = x.copy()
        bad[2, 1] = np.nan
        associate_across_cameras(bad, cameras, 5)
    with pytest.raises(ValueError, match=r"cameras must be a 1-D integer array \[N\]"):
        associate_across_cameras(x, cameras[:-1], 5)
    with pytest.raises(ValueError, match="integer camera ids"):
        associate_across_cameras(x, cameras.astype(np.float32), 5)
    with pytest.raises(ValueError, match=r"features must be a 2-D array"):
        associate_across_cameras(x[0], cameras, 5)
    for m in (-1, 2.5, True):
        with pytest.raises(ValueError, match="num_pairs must be a non-negative int"):
            associate_across_cameras(x, cameras, m)
    with pytest.raises(RuntimeError, match="faiss"):
        if neighbors.faiss_gpu_available():
            pytest.skip("faiss-gpu present")
        associate_across_cameras(x, cameras, 5, use_gpu=True)


def test_diagnostics_hand_made():
    # 6 identities: clusters {0,1,2} (pids 7,7,8), {3,4} (pids 9,9); identity 5 unassociated.
    labels = np.array([0, 0, 0, 1, 1, -1])
    pids = np.array([7, 7, 8, 9, 9, 8])
    cameras = np.array([0, 1, 1, 0, 2, 2])
    pairs = np.array([[0, 1], [1, 2], [3, 4]])
    d = association_diagnostics(labels, pids, cameras=cameras, pairs=pairs)
    assert d["num_clusters"] == 2
    assert d["num_associated"] == 5
    assert d["associated_fraction"] == pytest.approx(5 / 6)
    assert d["cluster_purity"] == pytest.approx(4 / 5)
    # same-cluster pairs: (0,1) (0,2) (1,2) (3,4); same-pid among them: (0,1) (3,4).
    assert d["pairwise_precision"] == pytest.approx(2 / 4)
    # same-pid pairs overall: (0,1) (2,5) (3,4).
    assert d["pairwise_recall"] == pytest.approx(2 / 3)
    # cluster {0,1,2} holds cameras 0,1,1 -> conflict; {3,4} does not.
    assert d["camera_conflict_rate"] == pytest.approx(1 / 2)
    assert d["num_accepted_pairs"] == 3
    assert d["pair_precision"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="equal length"):
        association_diagnostics(labels, pids[:-1])


def test_diagnostics_on_association_and_empty():
    x, cameras, pids = _clustered_data(60, 4, noise=0.1, seed=11)
    labels, pairs = associate_across_cameras(x, cameras, int(1.5 * len(x)), return_pairs=True)
    d = association_diagnostics(torch.from_numpy(labels), pids, cameras, pairs)
    assert d["num_accepted_pairs"] == len(pairs)
    assert d["pair_precision"] > 0.8 and d["cluster_purity"] > 0.8
    empty = association_diagnostics(np.full(4, -1), np.arange(4), np.arange(4), np.zeros((0, 2), np.int64))
    assert empty["num_clusters"] == 0 and empty["num_associated"] == 0
    assert np.isnan(empty["cluster_purity"]) and np.isnan(empty["pair_precision"])
