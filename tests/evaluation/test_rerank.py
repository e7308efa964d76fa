"""k-reciprocal re-ranking: dense == reference transcription, sparse-from-features == dense."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import sparse

from ccafl_hf.evaluation import (
    KReciprocalDistances,
    compute_reid_metrics,
    evaluate_rank,
    pairwise_distance,
    rerank_distances,
    rerank_from_features,
)
from ccafl_hf.evaluation import rerank as rerank_module


def reference_re_ranking(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    """Straight loop transcription of the widely used reference ``re_ranking`` (float32 variant)."""
    num_q = q_g.shape[0]
    full = np.concatenate([np.concatenate([q_q, q_g], axis=1), np.concatenate([q_g.T, g_g], axis=1)], axis=0)
    full = np.power(full, 2).astype(np.float32)
    full = np.transpose(1.0 * full / np.max(full, axis=0))
    num_all = full.shape[0]
    v = np.zeros_like(full).astype(np.float32)
    initial_rank = np.argsort(full, kind="stable").astype(np.int32)

    def reciprocal(i, k):
        forward = initial_rank[i, : k + 1]
        backward = initial_rank[forward, : k + 1]
        return forward[np.where(backward == i)[0]]

    half = int(np.around(k1 / 2.0))
    for i in range(num_all):
        recip = reciprocal(i, k1)
        expansion = recip
        for candidate in recip:
            cand_recip = reciprocal(candidate, half)
            if len(np.intersect1d(cand_recip, recip)) > 2.0 / 3 * len(cand_recip):
                expansion = np.append(expansion, cand_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-full[i, expansion])
        v[i, expansion] = 1.0 * weight / np.sum(weight)
    original = full[:num_q]
    if k2 != 1:
        v_qe = np.zeros_like(v, dtype=np.float32)
        for i in range(num_all):
            v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
    inverted = [np.where(v[:, j] != 0)[0] for j in range(num_all)]
    jaccard = np.zeros_like(original, dtype=np.float32)
    for i in range(num_q):
        overlap = np.zeros(shape=[1, num_all], dtype=np.float32)
        nonzero = np.where(v[i, :] != 0)[0]
        for j in nonzero:
            images = inverted[j]
            overlap[0, images] = overlap[0, images] + np.minimum(v[i, j], v[images, j])
        jaccard[i] = 1 - overlap / (2.0 - overlap)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:num_q, num_q:]


def _features(num_q, num_g, dim=16, num_ids=12, seed=0):
    """Clustered features (identities + noise) so neighbourhoods are meaningful, with ids and cameras."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=g)
    q_pids = torch.randint(0, num_ids, (num_q,), generator=g)
    g_pids = torch.randint(0, num_ids, (num_g,), generator=g)
    qf = centres[q_pids] + 0.7 * torch.randn(num_q, dim, generator=g)
    gf = centres[g_pids] + 0.7 * torch.randn(num_g, dim, generator=g)
    q_cams = torch.randint(0, 3, (num_q,), generator=g)
    g_cams = torch.randint(0, 3, (num_g,), generator=g)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def _dense(qf, gf, metric):
    return (pairwise_distance(qf, gf, metric).numpy(), pairwise_distance(qf, qf, metric).numpy(),
            pairwise_distance(gf, gf, metric).numpy())


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (5, 1, 0.5), (7, 3, 0.0)])
def test_dense_matches_reference(metric, k1, k2, lam):
    qf, gf, *_ = _features(15, 45, seed=k1 + k2)
    q_g, q_q, g_g = _dense(qf, gf, metric)
    expected = reference_re_ranking(q_g, q_q, g_g, k1, k2, lam)
    got = rerank_distances(q_g, q_q, g_g, k1, k2, lam)
    assert got.shape == (15, 45) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_dense_accepts_tensors_and_small_sets():
    """More neighbours requested than items: the reference takes what there is."""
    qf, gf, *_ = _features(3, 6, seed=3)
    q_g, q_q, g_g = _dense(qf, gf, "cosine")
    expected = reference_re_ranking(q_g, q_q, g_g, 20, 6, 0.3)
    got = rerank_distances(torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize(("k1", "k2"), [(20, 6), (6, 1), (4, 8)])
def test_sparse_matches_dense(metric, k1, k2):
    qf, gf, *_ = _features(20, 70, seed=k1)
    dense = rerank_distances(*_dense(qf, gf, metric), k1=k1, k2=k2, lambda_value=0.3)
    sparse = rerank_from_features(qf, gf, k1, k2, 0.3, metric=metric)
    np.testing.assert_allclose(sparse.to_dense(), dense, atol=1e-5, rtol=0)
    rows = torch.tensor([3, 0, 17])
    np.testing.assert_allclose(sparse.distances(rows).numpy(), dense[rows.numpy()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_metrics_with_rerank_match_dense(metric):
    qf, gf, q_pids, g_pids, q_cams, g_cams = _features(30, 90, seed=5)
    dense = rerank_distances(*_dense(qf, gf, metric))
    expected = evaluate_rank(dense, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    for chunk in (None, 7):
        got = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, rerank=True,
                                   max_rank=20, chunk_size=chunk)
        assert got["num_valid_queries"] == expected["num_valid_queries"]
        for key in ("mAP", "mINP", "rank1", "rank5", "rank10"):
            assert got[key] == pytest.approx(expected[key], abs=1e-9), key
        np.testing.assert_allclose(got["cmc"], expected["cmc"], atol=1e-12)


def test_rerank_changes_ranking_for_the_better_on_clusters():
    """Sanity: on well-clustered data re-ranking does not hurt mAP much and the numbers are valid."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = _features(30, 120, seed=9)
    plain = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams)
    reranked = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank=True)
    assert 0 <= reranked["mAP"] <= 1 and 0 <= plain["mAP"] <= 1
    assert reranked["mAP"] >= plain["mAP"] - 0.05


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k1": 0}, "k1"),
        ({"k2": 0}, "k2"),
        ({"lambda_value": 1.5}, "lambda_value"),
    ],
)
def test_bad_parameters(kwargs, match):
    q_g, q_q, g_g = _dense(*_features(4, 6)[:2], "cosine")
    with pytest.raises(ValueError, match=match):
        rerank_distances(q_g, q_q, g_g, **kwargs)
    with pytest.raises(ValueError, match=match):
        rerank_from_features(torch.randn(4, 8), torch.randn(6, 8), **kwargs)


def test_bad_matrices():
    q_g, q_q, g_g = _dense(*_features(4, 6)[:2], "cosine")
    with pytest.raises(ValueError, match="q_q must have shape"):
        rerank_distances(q_g, q_q[:3], g_g)
    with pytest.raises(ValueError, match="g_g must have shape"):
        rerank_distances(q_g, q_q, g_g[:, :5])
    with pytest.raises(ValueError, match="q_g must be a 2-D"):
        rerank_distances(q_g[0], q_q, g_g)
    bad = q_g.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="q_g contains NaN"):
        rerank_distances(bad, q_q, g_g)
    with pytest.raises(ValueError, match="q_g is empty"):
        rerank_distances(np.zeros((0, 6)), np.zeros((0, 0)), g_g)


def test_bad_features():
    with pytest.raises(ValueError, match="query_features contains NaN"):
        rerank_from_features(torch.tensor([[float("nan"), 0.0]]), torch.randn(3, 2))
    with pytest.raises(ValueError, match="same dimension"):
        rerank_from_features(torch.randn(3, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match="metric"):
        rerank_from_features(torch.randn(3, 2), torch.randn(3, 2), metric="dot")


# ---------------------------------------------------------------- one-pass neighbours versus a full sort
def _integer_features(n, dim=3, levels=2, seed=0):
    """Small-integer features: every product is exact, so scores tie often and exact duplicates occur."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(-levels, levels + 1, (n, dim)).astype(np.float32))


def slow_neighbours(x, k, metric):
    """Dense scores, each row fully sorted (score descending, equal scores by index); max distance²."""
    xd = x.double().numpy()
    dots = xd @ xd.T
    sq = np.einsum("ij,ij->i", xd, xd)
    score = dots if metric == "cosine" else 2 * dots - sq[None, :]
    order = np.stack([np.lexsort((np.arange(len(row)), -row)) for row in score])
    far = np.maximum(1 - score.min(1), 0) ** 2 if metric == "cosine" else np.maximum(sq - score.min(1), 0)
    return order[:, :k], far


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize(("block", "wide"), [(4, 1), (4, 3), (7, 8), (1024, 8)])
@pytest.mark.parametrize(("n", "k"), [(60, 9), (13, 21), (5, 5)])
def test_one_pass_neighbours_match_full_sort(monkeypatch, metric, block, wide, n, k):
    """Exact neighbour lists with ties broken by index (duplicates, tied scores), the farthest
    distance, whether the pair sits on a diagonal or an off-diagonal block (square or wide, with a
    narrower last one), and k >= N."""
    monkeypatch.setattr(rerank_module, "_KNN_BLOCK", block)
    monkeypatch.setattr(rerank_module, "_KNN_WIDE", wide)
    x = _integer_features(n, seed=n + block + wide)
    x[n // 2] = x[0]  # an exact duplicate
    k = min(k, n)
    neighbours, farthest = rerank_module._neighbours_and_farthest(x, k, metric)
    expected, expected_far = slow_neighbours(x, k, metric)
    np.testing.assert_array_equal(neighbours.numpy(), expected)
    np.testing.assert_allclose(farthest.numpy(), expected_far, rtol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_one_pass_neighbours_continuous_features(monkeypatch, metric):
    monkeypatch.setattr(rerank_module, "_KNN_BLOCK", 16)
    x = torch.nn.functional.normalize(torch.randn(100, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    if metric == "euclidean":
        x = x * torch.linspace(0.5, 3, 100)[:, None]
    neighbours, farthest = rerank_module._neighbours_and_farthest(x, 21, metric)
    expected, expected_far = slow_neighbours(x, 21, metric)
    np.testing.assert_array_equal(neighbours.numpy(), expected)
    np.testing.assert_allclose(farthest.numpy(), expected_far, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("num_q", "num_g", "k1", "k2"), [(12, 40, 6, 3), (4, 9, 20, 6)])
def test_sparse_matches_dense_with_ties(monkeypatch, num_q, num_g, k1, k2):
    """Euclidean distances of integer features tie exactly; the dense path sorts them stably, the
    one-pass search breaks them by index too: same neighbours, same re-ranked distances and metrics,
    also when the whole set is smaller than k1 + 1."""
    monkeypatch.setattr(rerank_module, "_KNN_BLOCK", 8)
    x = _integer_features(num_q + num_g, seed=num_g)
    qf, gf = x[:num_q], x[num_q:]
    dense = rerank_distances(*_dense(qf, gf, "euclidean"), k1=k1, k2=k2, lambda_value=0.3)
    reranked = rerank_from_features(qf, gf, k1, k2, 0.3, metric="euclidean")
    assert isinstance(reranked, KReciprocalDistances)
    np.testing.assert_allclose(reranked.to_dense(), dense, atol=1e-5, rtol=0)
    rng = np.random.default_rng(num_q)
    q_pids, g_pids = rng.integers(1, 4, num_q), rng.integers(0, 4, num_g)
    q_cams, g_cams = rng.integers(0, 2, num_q), rng.integers(0, 2, num_g)
    q_pids[0] = 9  # a query without any valid positive
    expected = evaluate_rank(dense, q_pids, g_pids, q_cams, g_cams, max_rank=15)
    assert expected["num_skipped_queries"] >= 1
    for chunk in (None, 3):
        got = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, metric="euclidean", rerank=True,
                                   k1=k1, k2=k2, max_rank=15, chunk_size=chunk)
        for key in ("mAP", "mINP", "rank1", "rank5", "rank10", "num_valid_queries"):
            assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_one_pass_on_gpu_if_available():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    cpu = rerank_module._neighbours_and_farthest(x, 21, "cosine")
    gpu = rerank_module._neighbours_and_farthest(x.cuda(), 21, "cosine")
    np.testing.assert_array_equal(gpu[0].cpu().numpy(), cpu[0].numpy())
    np.testing.assert_allclose(gpu[1].cpu().numpy(), cpu[1].numpy(), rtol=1e-5, atol=1e-6)
    qf, gf = x[:100], x[100:]
    ids = np.arange(100) % 20, np.arange(200) % 20, np.zeros(100, int), np.ones(200, int)
    on_cpu = compute_reid_metrics(qf, gf, *ids, rerank=True)
    on_gpu = compute_reid_metrics(qf.cuda(), gf.cuda(), *ids, rerank=True)
    assert on_gpu["mAP"] == pytest.approx(on_cpu["mAP"], abs=1e-6)


@pytest.mark.parametrize("slots", [1, 7, 1 << 22])
def test_overlap_entries_match_a_dense_sum(monkeypatch, slots):
    """The Jaccard overlaps S[a, b] = Σ_j min(V[a, j], V'[j, b]) summed per block of rows (one row,
    a few rows, all rows at once) equal a dense float64 sum, only where S is non-zero."""
    monkeypatch.setattr(rerank_module, "_OVERLAP_SLOTS", slots)
    rng = np.random.default_rng(slots)
    dense_rows = np.where(rng.random((9, 30)) < 0.2, rng.random((9, 30)), 0.0).astype(np.float32)
    dense_cols = np.where(rng.random((30, 11)) < 0.2, rng.random((30, 11)), 0.0).astype(np.float32)
    dense_rows[4] = 0.0  # a row sharing nothing
    keys, values = rerank_module._overlap_entries(sparse.csr_matrix(dense_rows), sparse.csr_matrix(dense_cols))
    expected = np.minimum(dense_rows[:, :, None].astype(np.float64), dense_cols[None, :, :]).sum(1)
    np.testing.assert_array_equal(keys, np.flatnonzero(expected))
    np.testing.assert_allclose(values, expected.ravel()[keys].astype(np.float32), rtol=1e-6)
    assert keys.dtype == np.int64 and values.dtype == np.float32


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_one_pass_in_lanes_matches_full_sort(monkeypatch, metric):
    """With more than one torch thread, lanes of off-diagonal blocks are multiplied side by side and
    their folds take turns: the same exact neighbours and farthest distances (ties included) with 2
    and 4 threads, and the caller's thread count is back afterwards."""
    monkeypatch.setattr(rerank_module, "_KNN_BLOCK", 7)
    monkeypatch.setattr(rerank_module, "_KNN_WIDE", 2)
    x = _integer_features(60, seed=11)
    x[30] = x[0]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 4):
            torch.set_num_threads(threads)
            results.append(rerank_module._neighbours_and_farthest(x, 9, metric))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    neighbours, farthest = results[0]
    assert all(torch.equal(a, b) for result in results[1:] for a, b in zip(result, results[0]))
    expected, expected_far = slow_neighbours(x, 9, metric)
    np.testing.assert_array_equal(neighbours.numpy(), expected)
    np.testing.assert_allclose(farthest.numpy(), expected_far, rtol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize(("block", "lam"), [(5, 0.3), (40, 0.3), (40, 0.0), (5, 1.0)])
def test_reranked_metrics_by_gallery_blocks_match_dense(monkeypatch, metric, block, lam):
    """Re-ranked distances produced a block of gallery columns at a time (overlaps picked per block,
    bounds carried through the Jaccard term) rank exactly like the dense re-ranked matrix, ties of
    integer features included."""
    from ccafl_hf.evaluation import ranking

    monkeypatch.setattr(ranking, "_GALLERY_BLOCK", block)
    monkeypatch.setattr(ranking, "_DENSE_SURVIVORS", 2.0)
    monkeypatch.setattr(rerank_module, "_KNN_BLOCK", 8)
    taken = []
    by_blocks = ranking._rank_by_blocks
    monkeypatch.setattr(ranking, "_rank_by_blocks", lambda *a: taken.append(by_blocks(*a)) or taken[-1])
    qf, gf, q_pids, g_pids, q_cams, g_cams = _features(30, 90, seed=5)
    # features whose products are exact in any order: ±1 in 4-d for cosine (±0.5 once normalised)
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.choice([-1.0, 1.0], (120, 4)).astype(np.float32)) if metric == "cosine" else (
        _integer_features(120, seed=3))
    for q, g in ((qf, gf), (x[:30], x[30:])):
        dense = rerank_distances(*_dense(q, g, metric), lambda_value=lam)
        expected = evaluate_rank(dense, q_pids, g_pids, q_cams, g_cams, max_rank=20)
        for chunk in (None, 7):
            got = compute_reid_metrics(q, g, q_pids, g_pids, q_cams, g_cams, metric=metric, rerank=True,
                                       lambda_value=lam, max_rank=20, chunk_size=chunk)
            for key in ("mAP", "mINP", "rank1", "rank5", "rank10", "num_valid_queries"):
                assert got[key] == pytest.approx(expected[key], abs=1e-9), key
            np.testing.assert_allclose(got["cmc"], expected["cmc"], atol=1e-12)
    assert taken and all(result is not None for result in taken)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_reranked_upper_bounds_hold(metric):
    """The bounds a chunk gives before its products are never below the re-ranked distances."""
    qf, gf, *_ = _features(25, 80, seed=9)
    reranked = rerank_from_features(qf, gf, 6, 3, 0.3, metric=metric)
    rows = torch.tensor([0, 3, 4, 11, 24])
    chunk = reranked._chunk(rows)
    dist = chunk.block(0, 80)
    r = torch.arange(5).repeat_interleave(80)
    c = torch.arange(80).repeat(5)
    upper = chunk.upper_bounds(r, c)
    assert bool((dist.reshape(-1).double() <= upper).all())
    assert float((upper - dist.reshape(-1).double()).max()) < 1e-3
    np.testing.assert_array_equal(dist.numpy(), reranked.distances(rows).numpy())
    np.testing.assert_allclose(torch.cat([chunk.block(0, 33), chunk.block(33, 80)], 1).numpy(), dist.numpy(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_screening_on_the_distance_is_exact(lam):
    """An entry without overlap has a re-ranked distance within a bound exactly when ``|d|`` is within
    the chunk's threshold: checked on distances around each threshold, negative ones (cosine
    rounding) and bounds below every distance."""
    qf, gf, *_ = _features(6, 40, seed=2)
    chunk = rerank_from_features(qf, gf, 6, 3, lam)._chunk(torch.arange(6))
    bound = torch.tensor([0.05, 0.3, 0.69, 0.7, 1.0, 0.0], dtype=torch.float32)
    t = chunk.screen(bound)
    rng = np.random.default_rng(0)
    d = [torch.from_numpy(rng.uniform(-0.001, 2.0, (6, 200)).astype(np.float32)), torch.zeros(6, 1)]
    finite = torch.where(torch.isfinite(t), t, torch.zeros_like(t))[:, None]
    for step in range(-3, 4):  # the threshold and its float neighbours, on both signs
        near = finite.clone()
        for _ in range(abs(step)):
            near = torch.nextafter(near, torch.full_like(near, math.inf if step > 0 else -math.inf))
        d += [near, -near]
    d = torch.cat(d, 1)
    rows = torch.arange(6)[:, None].expand_as(d)
    within = chunk.untouched_finals(rows.reshape(-1), d.reshape(-1)).view_as(d) <= bound[:, None]
    assert torch.equal(within, d.abs() <= t[:, None])
    if lam < 1:
        assert t[-1] == -math.inf  # nothing is within a bound below 1 - λ
