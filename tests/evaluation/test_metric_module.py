"""The `evaluate` metric module loads offline from the package folder and returns the package's numbers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ccafl_hf.evaluation import REID_METRIC_PATH, compute_reid_metrics

evaluate = pytest.importorskip("evaluate")

MODULE_DIR = Path(REID_METRIC_PATH)


@pytest.fixture(scope="module")
def reid():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return evaluate.load(str(MODULE_DIR))


def _data(seed=0, num=60, dim=8):
    rng = np.random.default_rng(seed)
    pids = rng.integers(0, 6, num)
    centres = rng.standard_normal((6, dim))
    x = (centres[pids] + rng.standard_normal((num, dim))).astype(np.float32)
    return x, pids, rng.integers(0, 3, num), np.arange(num) < 15


def test_loads_offline_and_matches_library(reid):
    x, pids, cams, query = _data()
    got = reid.compute(embeddings=x.tolist(), pids=pids.tolist(), camids=cams.tolist(), is_query=query.tolist())
    expected = compute_reid_metrics(x[query], x[~query], pids[query], pids[~query], cams[query], cams[~query])
    assert got == expected
    assert set(got) >= {"mAP", "mINP", "rank1", "rank5", "rank10", "cmc", "num_valid_queries"}


def test_batches_and_options(reid):
    x, pids, cams, query = _data(seed=1)
    for lo in range(0, len(x), 25):
        sl = slice(lo, lo + 25)
        reid.add_batch(embeddings=x[sl], pids=pids[sl], camids=cams[sl], is_query=query[sl])
    got = reid.compute(metric="euclidean", rerank=True, k1=5, k2=2, max_rank=7)
    expected = compute_reid_metrics(x[query], x[~query], pids[query], pids[~query], cams[query], cams[~query],
                                    metric="euclidean", rerank=True, k1=5, k2=2, max_rank=7)
    assert got == expected and len(got["cmc"]) == 7


def test_bad_input_is_reported(reid):
    x, pids, cams, query = _data(seed=2)
    with pytest.raises(ValueError, match="query_features is empty"):
        reid.compute(embeddings=x, pids=pids, camids=cams, is_query=np.zeros(len(x), bool))
