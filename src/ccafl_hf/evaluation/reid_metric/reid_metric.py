"""Person re-identification retrieval metrics (Market-1501 protocol) as a Hugging Face `evaluate` module.

Load it offline from its folder: ``evaluate.load(ccafl_hf.evaluation.REID_METRIC_PATH)``. It wraps
`ccafl_hf.evaluation.compute_reid_metrics`, so the numbers are the package's own.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from ccafl_hf.evaluation import compute_reid_metrics

_DESCRIPTION = """\
Retrieval metrics of person re-identification under the Market-1501 protocol: every query image is
ranked against the gallery by feature distance (cosine or Euclidean, optionally k-reciprocal
re-ranked); gallery images with the query's identity *and* camera are ignored; the remaining images
of the query's identity are its matches. Reports mAP, mINP, CMC rank-1/5/10 and the CMC curve over the
queries that have a match in another camera. Computed in query chunks without the query x gallery matrix.
"""

_KWARGS_DESCRIPTION = """
Args:
    embeddings: one feature vector per image (all of the same length).
    pids: identity of each image (int; 0 = distractor, stays in the gallery).
    camids: camera of each image (int).
    is_query: True for query images, False for gallery images.
    metric: "cosine" (default; features are L2-normalised) or "euclidean".
    rerank: k-reciprocal re-ranking (default False), with k1 (20), k2 (6), lambda_value (0.3).
    max_rank: length of the returned CMC curve (default 50).
    chunk_size: queries per chunk (default: 2,048; more with more than two CPU threads).
Returns:
    mAP, mINP, rank1, rank5, rank10: fractions in [0, 1];
    cmc: list of max_rank fractions (CMC@1..max_rank);
    num_valid_queries, num_skipped_queries: queries with / without a match in another camera.
Examples:
    >>> reid = evaluate.load("path/to/ccafl_hf/evaluation/reid_metric")
    >>> out = reid.compute(embeddings=[[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9]], pids=[1, 2, 1, 2],
    ...                    camids=[0, 0, 1, 1], is_query=[True, True, False, False])
    >>> out["mAP"], out["rank1"]
    (1.0, 1.0)
"""

_CITATION = """\
@inproceedings{zheng2015scalable,
  title={Scalable Person Re-identification: A Benchmark},
  author={Zheng, Liang and Shen, Liyue and Tian, Lu and Wang, Shengjin and Wang, Jingdong and Tian, Qi},
  booktitle={ICCV}, year={2015}
}
@inproceedings{zhong2017re,
  title={Re-ranking Person Re-identification with k-reciprocal Encoding},
  author={Zhong, Zhun and Zheng, Liang and Cao, Donglin and Li, Shaozi},
  booktitle={CVPR}, year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Reid(evaluate.Metric):
    """Market-1501-protocol ReID metrics over query and gallery images added as one table."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "embeddings": datasets.Sequence(datasets.Value("float32")),
                    "pids": datasets.Value("int64"),
                    "camids": datasets.Value("int64"),
                    "is_query": datasets.Value("bool"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/1701.08398", "https://arxiv.org/abs/2409.19563"],
        )

    def _compute(
        self,
        embeddings,
        pids,
        camids,
        is_query,
        metric: str = "cosine",
        rerank: bool = False,
        max_rank: int = 50,
        chunk_size: int | None = None,
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
    ) -> dict:
        lengths = {len(e) for e in embeddings}
        if len(lengths) > 1:
            raise ValueError(f"embeddings must all have the same length, got lengths {sorted(lengths)}")
        features = np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1)
        pids = np.asarray(pids, dtype=np.int64)
        camids = np.asarray(camids, dtype=np.int64)
        query = np.asarray(is_query, dtype=bool)
        return compute_reid_metrics(
            features[query], features[~query], pids[query], pids[~query], camids[query], camids[~query],
            metric=metric, rerank=rerank, max_rank=max_rank, chunk_size=chunk_size, k1=k1, k2=k2,
            lambda_value=lambda_value,
        )
