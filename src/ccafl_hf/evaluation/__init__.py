"""Evaluation under the Market-1501 protocol: features, ranking metrics, re-ranking and pictures.

* `extract_features` / `evaluate_reid_model` / `evaluate_splits` (`extraction`) - the batched
  feature-extraction loop (`ExtractionOptions`) and the metrics of a model on a query/gallery pair;
* `evaluate_rank` / `compute_reid_metrics` (`ranking`) - metrics from a dense query×gallery distance
  matrix, or from features chunked over queries (never holding that matrix; optionally re-ranked);
* `rerank_distances` / `rerank_from_features` (`rerank`) - k-reciprocal re-ranking of dense distance
  matrices (reference-equivalent), or from features with exact kNN and sparse encodings;
* `rank_gallery`, `save_worst_and_best`, `save_ranked_list` (`visualization`) - ranked-list pictures;
* ``reid_metric/`` - the same metrics as a Hugging Face `evaluate` module:
  ``evaluate.load(REID_METRIC_PATH)``.
"""

from pathlib import Path

from ..utils.precision import autocast_context  # re-exported: its home is ccafl_hf.utils.precision
from .extraction import (
    METRIC_KEYS,
    ExtractedFeatures,
    ExtractionOptions,
    evaluate_reid_model,
    evaluate_splits,
    extract_features,
)
from .ranking import DistanceMetric, compute_reid_metrics, evaluate_rank, pairwise_distance
from .rerank import KReciprocalDistances, rerank_distances, rerank_from_features
from .visualization import (
    QueryRanking,
    RankedListLayout,
    RankedRow,
    rank_gallery,
    ranked_rows,
    render_ranked_list,
    save_ranked_list,
    save_worst_and_best,
    select_queries,
    split_image_sources,
)

#: Folder of the `evaluate` metric module: ``evaluate.load(REID_METRIC_PATH)`` works offline.
REID_METRIC_PATH = str(Path(__file__).parent / "reid_metric")

__all__ = [
    "METRIC_KEYS",
    "REID_METRIC_PATH",
    "DistanceMetric",
    "ExtractedFeatures",
    "ExtractionOptions",
    "KReciprocalDistances",
    "QueryRanking",
    "RankedListLayout",
    "RankedRow",
    "autocast_context",
    "compute_reid_metrics",
    "evaluate_rank",
    "evaluate_reid_model",
    "evaluate_splits",
    "extract_features",
    "pairwise_distance",
    "rank_gallery",
    "ranked_rows",
    "render_ranked_list",
    "rerank_distances",
    "rerank_from_features",
    "save_ranked_list",
    "save_worst_and_best",
    "select_queries",
    "split_image_sources",
]
