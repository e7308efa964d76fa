"""Market-1501-protocol metrics against a slow per-query loop written from docs/method.md §1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccafl_hf.evaluation import compute_reid_metrics, evaluate_rank, pairwise_distance, ranking


def slow_protocol(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """One query at a time: stable ascending sort, drop same pid + same camera, score the matches."""
    aps, inps, cmcs, firsts = [], [], [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        matches = (g_pids[order][keep] == q_pids[q]).astype(np.float64)
        if not matches.any():
            continue
        hits = np.cumsum(matches)
        positions = np.flatnonzero(matches)
        aps.append(np.sum(hits[positions] / (positions + 1.0)) / matches.sum())
        inps.append(hits[positions[-1]] / (positions[-1] + 1.0))
        cmc = np.ones(max_rank)
        cmc[: positions[0]] = 0.0
        cmcs.append(cmc)
        firsts.append(positions[0])
    firsts = np.array(firsts)
    return {"mAP": np.mean(aps), "mINP": np.mean(inps), "cmc": np.mean(cmcs, axis=0),
            "rank1": np.mean(firsts < 1), "rank5": np.mean(firsts < 5), "rank10": np.mean(firsts < 10), "num_valid_queries": len(aps), "num_skipped_queries": distmat.shape[0] - len(aps)}


def make_case(num_q=40, num_g=300, dim=24, num_ids=25, num_cams=4, seed=0):
    """Identities seen by several cameras, distractors (pid 0) in the gallery, same-camera matches,
    and queries whose identity has no image in another camera (or none at all)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids + 1, dim))
    g_pids = rng.integers(0, num_ids, num_g)  # pid 0 = distractors
    g_cams = rng.integers(0, num_cams, num_g)
    q_pids = rng.integers(1, num_ids + 3, num_q)  # ids >= num_ids have no gallery image
    q_cams = rng.integers(0, num_cams, num_q)
    # some queries whose only gallery matches are in their own camera
    lonely = num_ids - 1
    g_cams[g_pids == lonely] = 0
    q_pids[:3], q_cams[:3] = lonely, 0
    qf = centres[np.minimum(q_pids, num_ids)] + 0.9 * rng.standard_normal((num_q, dim))
    gf = centres[g_pids] + 0.9 * rng.standard_normal((num_g, dim))
    return qf.astype(np.float32), gf.astype(np.float32), q_pids, g_pids, q_cams, g_cams


def assert_same(got, expected, atol=1e-10):
    assert got["num_valid_queries"] == expected["num_valid_queries"]
    assert got["num_skipped_queries"] == expected["num_skipped_queries"]
    for key in ("mAP", "mINP", "rank1", "rank5", "rank10"):
        assert got[key] == pytest.approx(expected[key], abs=atol), key
    assert len(got["cmc"]) == len(expected["cmc"])
    np.testing.assert_allclose(got["cmc"], expected["cmc"], atol=atol, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_rank_matches_slow_loop(seed):
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed=seed)
    distmat = pairwise_distance(qf, gf, "euclidean").numpy()
    expected = slow_protocol(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    assert expected["num_skipped_queries"] >= 3
    got = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    assert_same(got, expected)
    assert isinstance(got["mAP"], float) and isinstance(got["cmc"], list)


def test_evaluate_rank_tensors_and_float64():
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed=4)
    distmat = pairwise_distance(qf, gf, "cosine").double()
    expected = slow_protocol(distmat.numpy(), q_pids, g_pids, q_cams, g_cams, max_rank=12)
    got = evaluate_rank(distmat, torch.from_numpy(q_pids), torch.from_numpy(g_pids), torch.from_numpy(q_cams),
                        torch.from_numpy(g_cams), max_rank=12)
    assert_same(got, expected)


def test_ties_follow_stable_order():
    """Integer distances: many ties between positives and other entries and among positives."""
    rng = np.random.default_rng(7)
    num_q, num_g = 30, 80
    distmat = rng.integers(0, 6, (num_q, num_g)).astype(np.float32)
    q_pids, g_pids = rng.integers(1, 5, num_q), rng.integers(0, 5, num_g)
    q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    expected = slow_protocol(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    assert_same(evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20), expected)
    # a mix: ties only in some rows
    distmat = rng.random((num_q, num_g)).astype(np.float32)
    distmat[::3] = np.round(distmat[::3] * 4)
    expected = slow_protocol(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    assert_same(evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20), expected)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_duplicate_images_tie_like_a_stable_sort(metric):
    """Exact copies in the gallery (and of a query) give exactly equal distances."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(num_q=30, num_g=120, seed=21)
    copies = np.random.default_rng(0).integers(0, 120, 60)
    gf = np.concatenate([gf, gf[copies]])
    g_pids = np.concatenate([g_pids, g_pids[copies]])
    g_cams = np.concatenate([g_cams, (g_cams[copies] + 1) % 4])
    gf[:10] = qf[:10]
    distmat = pairwise_distance(qf, gf, metric).numpy()
    expected = slow_protocol(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=15)
    for chunk in (None, 4):
        got = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, max_rank=15,
                                   chunk_size=chunk)
        assert_same(got, expected)


def test_max_rank_beyond_gallery_and_perfect_ranking():
    q_pids, g_pids = np.array([1, 2]), np.array([1, 2, 1, 3])
    q_cams, g_cams = np.array([0, 0]), np.array([1, 1, 2, 1])
    distmat = np.array([[0.1, 0.9, 0.2, 0.5], [0.8, 0.1, 0.3, 0.4]])
    got = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=6)
    assert got["mAP"] == 1.0 and got["mINP"] == 1.0 and got["rank1"] == 1.0
    assert got["cmc"] == [1.0] * 6
    expected = slow_protocol(distmat[:, ::-1].copy(), q_pids, g_pids[::-1], q_cams, g_cams[::-1], max_rank=6)
    assert_same(evaluate_rank(distmat[:, ::-1].copy(), q_pids, g_pids[::-1], q_cams, g_cams[::-1], 6), expected)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_features_match_dense(metric):
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed=11)
    distmat = pairwise_distance(qf, gf, metric).numpy()
    expected = slow_protocol(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=30)
    dense = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=30)
    assert_same(dense, expected)
    for chunk in (None, 1, 7, 16, 1000):
        got = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, max_rank=30,
                                   chunk_size=chunk)
        assert_same(got, dense)


def test_features_cosine_normalises():
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed=12)
    scale = np.random.default_rng(0).uniform(0.5, 3.0, (len(qf), 1)).astype(np.float32)
    a = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams)
    b = compute_reid_metrics(qf * scale, torch.from_numpy(gf) * 2, q_pids, g_pids, q_cams, g_cams)
    assert_same(a, b, atol=1e-6)


def test_features_on_gpu_if_available():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed=13)
    cpu = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=9)
    gpu = compute_reid_metrics(torch.from_numpy(qf).cuda(), torch.from_numpy(gf).cuda(), q_pids, g_pids,
                               q_cams, g_cams, chunk_size=9)
    assert_same(gpu, cpu, atol=1e-6)


# ------------------------------------------------------------------------------------------- bad input
def _ok():
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(num_q=6, num_g=20, seed=3)
    return {"query_features": qf, "gallery_features": gf, "q_pids": q_pids, "g_pids": g_pids,
            "q_camids": q_cams, "g_camids": g_cams}


def _with(**changes):
    args = _ok()
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"q_pids": np.zeros(5, int)}, "q_pids has 5 entries but query_features has 6"),
        ({"g_camids": np.zeros(21, int)}, "g_camids has 21 entries but gallery_features has 20"),
        ({"q_pids": np.zeros((6, 1), int)}, "q_pids must be a 1-D"),
        ({"g_pids": np.full(20, 0.5)}, "g_pids must hold integer ids"),
        ({"query_features": np.zeros(6)}, "query_features must be a 2-D"),
        ({"gallery_features": np.zeros((20, 5))}, "same dimension"),
        ({"query_features": np.full((6, 24), np.nan)}, "query_features contains NaN"),
        ({"gallery_features": np.full((20, 24), np.inf)}, "gallery_features contains NaN or infinite"),
        ({"query_features": np.zeros((0, 24)), "q_pids": [], "q_camids": []}, "query_features is empty"),
        ({"gallery_features": np.zeros((0, 24)), "g_pids": [], "g_camids": []}, "gallery_features is empty"),
        ({"q_pids": np.full(6, 99)}, "no valid query"),
    ],
)
def test_bad_input_features(changes, match):
    with pytest.raises(ValueError, match=match):
        compute_reid_metrics(**_with(**changes))


def test_bad_options():
    with pytest.raises(ValueError, match="metric must be one of"):
        compute_reid_metrics(**_ok(), metric="dot")
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        compute_reid_metrics(**_ok(), max_rank=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        compute_reid_metrics(**_ok(), chunk_size=0)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"distmat": np.zeros(6)}, "distmat must be a 2-D"),
        ({"distmat": np.zeros((6, 0))}, "distmat is empty"),
        ({"distmat": np.full((6, 20), np.nan)}, "distmat contains NaN"),
        ({"q_camids": np.zeros(7, int)}, r"q_camids has 7 entries but distmat.shape\[0\] has 6"),
        ({"g_pids": np.zeros(3, int)}, r"g_pids has 3 entries but distmat.shape\[1\] has 20"),
        ({"q_pids": ["a"] * 6}, "q_pids must hold numbers"),
        ({"g_pids": np.full(20, 99)}, "no valid query"),
    ],
)
def test_bad_input_distmat(changes, match):
    args = _ok()
    args = {"distmat": pairwise_distance(args["query_features"], args["gallery_features"]).numpy(),
            "q_pids": args["q_pids"], "g_pids": args["g_pids"], "q_camids": args["q_camids"],
            "g_camids": args["g_camids"]}
    args.update(changes)
    with pytest.raises(ValueError, match=match):
        evaluate_rank(**args)


# ------------------------------------------------------------------------ counting kernel versus full sort
def _integer_case(num_q, num_g, metric="euclidean", num_ids=4, num_cams=3, seed=0):
    """Features whose products are exact whatever the matrix-product kernel (small integers; for
    cosine ±1 entries in 4-d, norm 2), so distances tie often: positives with negatives, positives
    with each other, junk with positives. Few images per id."""
    rng = np.random.default_rng(seed)
    if metric == "cosine":
        qf = rng.choice([-1.0, 1.0], (num_q, 4)).astype(np.float32)
        gf = rng.choice([-1.0, 1.0], (num_g, 4)).astype(np.float32)
    else:
        qf = rng.integers(-3, 4, (num_q, 3)).astype(np.float32)
        gf = rng.integers(-3, 4, (num_g, 3)).astype(np.float32)
    q_pids, g_pids = rng.integers(1, num_ids + 2, num_q), rng.integers(0, num_ids + 1, num_g)
    q_cams, g_cams = rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def _scored_integer_cases(num_q, num_g, metric, seeds, max_rank):
    """`_integer_case` for each seed that has a valid query: (case, dense distances, full-sort metrics)."""
    for seed in seeds:
        case = _integer_case(num_q, num_g, metric, seed=seed)
        qf, gf, q_pids, g_pids, q_cams, g_cams = case
        if np.any((g_pids[None] == q_pids[:, None]) & (g_cams[None] != q_cams[:, None])):
            distmat = pairwise_distance(qf, gf, metric).numpy()
            yield case, distmat, slow_protocol(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)


@pytest.mark.parametrize("survivors", ["sparse", "dense"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize(("num_q", "num_g", "max_rank"), [(40, 150, 20), (25, 6, 10), (12, 3, 50)])
def test_counting_matches_full_sort_with_ties(monkeypatch, survivors, metric, num_q, num_g, max_rank):
    """The survivor count (and the whole-row search used when most entries survive) equals a full
    stable sort of every row: ties everywhere, same-camera junk, queries without a valid positive
    (skipped), and galleries smaller than max_rank."""
    monkeypatch.setattr(ranking, "_DENSE_SURVIVORS", 2.0 if survivors == "sparse" else -1.0)
    for case, distmat, expected in _scored_integer_cases(num_q, num_g, metric, range(2), max_rank):
        qf, gf, q_pids, g_pids, q_cams, g_cams = case
        assert len(np.unique(distmat)) < distmat.size  # tied distances
        assert_same(evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank), expected)
        # float64 distances: the binary search instead of the (row, float32) key search
        assert_same(evaluate_rank(distmat.astype(np.float64), q_pids, g_pids, q_cams, g_cams, max_rank=max_rank),
                    expected)
        for chunk in (None, 3):
            got = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric,
                                       max_rank=max_rank, chunk_size=chunk)
            assert_same(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("survivors", ["sparse", "dense"])
def test_counting_ties_between_a_positive_and_its_neighbours(monkeypatch, survivors, dtype):
    """Hand-made rows: a negative and a junk entry at exactly a positive's distance, before and after
    it in gallery order, and two positives at one distance."""
    q_pids, q_cams = np.array([1, 2]), np.array([0, 0])
    g_pids = np.array([3, 1, 1, 1, 0, 1, 2, 2])
    g_cams = np.array([1, 1, 0, 2, 1, 1, 1, 1])
    distmat = np.array([[0.5, 0.5, 0.5, 0.2, 0.5, 0.5, 0.9, 0.1],
                        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]], dtype=dtype)
    monkeypatch.setattr(ranking, "_DENSE_SURVIVORS", 2.0 if survivors == "sparse" else -1.0)
    expected = slow_protocol(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=8)
    got = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=8)
    assert_same(got, expected)
    # query 1: order 7, 3(+), 0, 1(+), [2 junk], 4, 5(+), 6 -> ranks 1, 3, 5 among valid entries
    ap1 = (1 / 2 + 2 / 4 + 3 / 6) / 3
    ap2 = (1 / 7 + 2 / 8) / 2  # query 2: all tied, its positives are the last two
    assert got["mAP"] == pytest.approx((ap1 + ap2) / 2, abs=1e-12)


def test_serial_cpu_ops_restores_the_thread_count():
    """The small post-product operations run on one thread (with two, the halves of each chunk are
    ranked at once); the caller's setting comes back, also after an error, and the metrics do not
    depend on it."""
    from ccafl_hf.evaluation.distances import serial_cpu_ops

    before = torch.get_num_threads()
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed=6)
    try:
        torch.set_num_threads(2)
        with serial_cpu_ops(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), serial_cpu_ops(torch.device("cpu")):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        two = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=7)  # halves at once
        distmat = pairwise_distance(qf, gf, "cosine").numpy()
        assert_same(evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams),
                    slow_protocol(distmat, q_pids, g_pids, q_cams, g_cams))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    torch.set_num_threads(1)
    try:
        one = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=7)
    finally:
        torch.set_num_threads(before)
    assert_same(two, one)


# -------------------------------------------------------------------------- ranking by gallery blocks
class _PathSpy:
    """Counts the chunks ranked by gallery blocks and those ranked by whole rows."""

    def __init__(self, monkeypatch):
        self.blocked = self.rows = 0
        by_blocks, by_rows = ranking._rank_by_blocks, ranking._rank_chunk

        def spy_blocks(*args, **kwargs):
            result = by_blocks(*args, **kwargs)
            self.blocked += result is not None
            return result

        def spy_rows(*args, **kwargs):
            self.rows += 1
            return by_rows(*args, **kwargs)

        monkeypatch.setattr(ranking, "_rank_by_blocks", spy_blocks)
        monkeypatch.setattr(ranking, "_rank_chunk", spy_rows)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize(("block", "chunk", "dtype"), [(7, None, np.float32), (50, 3, np.float32),
                                                       (1000, 16, np.float32), (50, None, np.float64)])
def test_gallery_blocks_match_full_sort(monkeypatch, metric, block, chunk, dtype):
    """Ranked a gallery block at a time (survivors under a bound, junk set aside, positives gathered
    per block) the metrics equal a stable full sort of every row: skipped queries, distractors,
    same-camera junk, blocks of unequal widths, float64 features."""
    monkeypatch.setattr(ranking, "_GALLERY_BLOCK", block)
    monkeypatch.setattr(ranking, "_DENSE_SURVIVORS", 2.0)
    spy = _PathSpy(monkeypatch)
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(num_q=40, num_g=301, seed=31)
    qf, gf = qf.astype(dtype), gf.astype(dtype)
    distmat = pairwise_distance(qf, gf, metric).numpy()
    expected = slow_protocol(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=30)
    got = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, max_rank=30, chunk_size=chunk)
    assert_same(got, expected)
    assert spy.blocked > 0 and spy.rows == 0


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize(("num_q", "num_g", "max_rank"), [(40, 150, 20), (25, 6, 10), (12, 3, 50)])
def test_gallery_blocks_with_ties(monkeypatch, metric, num_q, num_g, max_rank):
    """Integer features tie everywhere (positives with negatives, with junk, with each other): the
    block path breaks ties by gallery index like the full sort, also across block borders and for
    galleries smaller than max_rank."""
    monkeypatch.setattr(ranking, "_GALLERY_BLOCK", 4)
    monkeypatch.setattr(ranking, "_DENSE_SURVIVORS", 2.0)
    spy = _PathSpy(monkeypatch)
    for case, _, expected in _scored_integer_cases(num_q, num_g, metric, range(3), max_rank):
        qf, gf, q_pids, g_pids, q_cams, g_cams = case
        for chunk in (None, 5):
            got = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric,
                                       max_rank=max_rank, chunk_size=chunk)
            assert_same(got, expected)
    assert spy.blocked > 0 and spy.rows == 0


def test_a_failed_bound_falls_back_to_whole_rows(monkeypatch):
    """Bounds below the products' values (as a less accurate product would give) are detected after
    the blocks and the chunk is ranked by whole rows: the same metrics."""
    monkeypatch.setattr(ranking, "_GALLERY_BLOCK", 32)
    monkeypatch.setattr(ranking, "_DENSE_SURVIVORS", 2.0)
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(num_q=30, num_g=200, seed=32)
    expected = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    true_bounds = ranking._FeatureChunk.upper_bounds
    monkeypatch.setattr(ranking._FeatureChunk, "upper_bounds", lambda self, r, c: true_bounds(self, r, c) - 0.05)
    spy = _PathSpy(monkeypatch)
    got = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=20, chunk_size=8)
    assert_same(got, expected)
    assert spy.blocked == 0 and spy.rows > 0


def test_most_entries_surviving_falls_back_to_whole_rows(monkeypatch):
    """Features close to random: most entries are no farther than the last positive, so the chunk is
    ranked by whole rows (bounded scratch) rather than by a survivor list."""
    monkeypatch.setattr(ranking, "_GALLERY_BLOCK", 16)
    spy = _PathSpy(monkeypatch)
    rng = np.random.default_rng(33)
    qf, gf = rng.standard_normal((20, 8)).astype(np.float32), rng.standard_normal((90, 8)).astype(np.float32)
    q_pids, g_pids = rng.integers(1, 4, 20), rng.integers(0, 4, 90)
    q_cams, g_cams = rng.integers(0, 3, 20), rng.integers(0, 3, 90)
    got = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    assert_same(got, slow_protocol(pairwise_distance(qf, gf).numpy(), q_pids, g_pids, q_cams, g_cams, max_rank=20))
    assert spy.blocked == 0 and spy.rows > 0


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_distance_bounds_contain_the_products(metric, dtype):
    """The bounds hold the distances one product of the features gives, at any feature scale, and are
    tight away from 0 (a few thousand float ulps: a few 1e-4 for float32 cosine distances)."""
    from ccafl_hf.evaluation.distances import pair_distance_bounds, prepare_features

    g = torch.Generator().manual_seed(5)
    x = prepare_features(torch.randn(64, 300, generator=g, dtype=dtype) * 30, metric)
    y = prepare_features(torch.randn(500, 300, generator=g, dtype=dtype) * 0.01, metric)
    y[:20] = x[:20]  # zero distances, where rounding can go below 0 for cosine
    dist = pairwise_distance(x, y, metric, prepared=True)
    rows = torch.arange(64).repeat_interleave(500)
    cols = torch.arange(500).repeat(64)
    low, high = pair_distance_bounds(x, y, rows, cols, metric, x.pow(2).sum(1), y.pow(2).sum(1))
    values = dist.reshape(-1).double()
    assert bool((low <= values).all()) and bool((values <= high).all())
    scale = 1.0 if metric == "cosine" else float(values.max())
    apart = values > 0.01 * scale  # a Euclidean distance near 0 is only known to about sqrt(eps)·‖x‖
    assert float((high - low)[apart].max()) < 20 * (300 + 4) * torch.finfo(dtype).eps * scale


def test_gallery_blocks_in_lanes_match_a_full_sort(monkeypatch):
    """With 1, 2 or 3 torch threads the chunk's rows are split into as many lanes, each computing and
    screening its own products: the same metrics as a full sort, and the thread count comes back."""
    monkeypatch.setattr(ranking, "_GALLERY_BLOCK", 16)
    monkeypatch.setattr(ranking, "_DENSE_SURVIVORS", 2.0)
    monkeypatch.setattr(ranking, "_LANE_ROWS", 4)
    spy = _PathSpy(monkeypatch)
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(num_q=41, num_g=180, seed=34)
    expected = slow_protocol(pairwise_distance(qf, gf).numpy(), q_pids, g_pids, q_cams, g_cams, max_rank=20)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for chunk in (None, 10):
                got = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=20, chunk_size=chunk)
                assert_same(got, expected)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert spy.blocked > 0 and spy.rows == 0
