"""Evaluation under the Market-1501 protocol (METHOD.md §1): ranking metrics and k-reciprocal re-ranking.

* `evaluate_rank` - metrics from a dense query×gallery distance matrix;
* `compute_reid_metrics` - the same metrics from features, chunked over queries, never holding the
  query×gallery matrix (optionally re-ranked);
* `rerank_distances` - k-reciprocal re-ranking of dense distance matrices (reference-equivalent);
* `rerank_from_features` - the same re-ranking from features with exact kNN and sparse encodings.

An `evaluate` metric wrapping `compute_reid_metrics` ships in ``ccafl_hf/metrics/reid``.
"""

from .ranking import DistanceMetric, compute_reid_metrics, evaluate_rank, pairwise_distance
from .rerank import KReciprocalDistances, rerank_distances, rerank_from_features

__all__ = [
    "DistanceMetric",
    "KReciprocalDistances",
    "compute_reid_metrics",
    "evaluate_rank",
    "pairwise_distance",
    "rerank_distances",
    "rerank_from_features",
]
