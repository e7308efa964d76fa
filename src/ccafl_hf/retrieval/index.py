"""The faiss index life cycle over retrieval features (build, measure, save, load) and search.

Retrieval features are L2-normalised, so inner product = cosine similarity.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..utils.neighbors import as_float32_numpy, build_flat_index, exact_knn, faiss, to_faiss_device
from .errors import RetrievalError
from .features import FeatureSet

IndexKind = Literal["flat", "ivf"]


def _is_gpu_index(index) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def default_nlist(num_vectors: int) -> int:
    """IVF list count for ``num_vectors``: about ``4·sqrt(N)``, with at least 39 training points a list."""
    return max(1, min(int(round(4 * math.sqrt(num_vectors))), num_vectors // 39))


def set_nprobe(index, nprobe: int) -> None:
    """Number of IVF lists visited per query (CPU or GPU IVF index)."""
    if nprobe < 1:
        raise RetrievalError(f"nprobe must be >= 1, got {nprobe}")
    if _is_gpu_index(index):
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    else:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)


def build_index(
    features: np.ndarray | torch.Tensor | FeatureSet,
    kind: IndexKind = "flat",
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    use_gpu: bool | None = None,
):
    """A faiss inner-product index over ``features [N, D]``.

    ``kind="flat"`` is exact. ``kind="ivf"`` is an inverted-file index for very large galleries
    (``nlist`` lists, default `default_nlist`; ``nprobe`` lists visited per query, default
    ``max(1, nlist // 8)``): faster, approximate, measure it with `index_recall`. ``use_gpu=None``
    uses a GPU when faiss-gpu sees one.
    """
    xb = as_float32_numpy(features.features if isinstance(features, FeatureSet) else features, "features")
    n, dim = xb.shape
    if n == 0:
        raise RetrievalError("cannot index an empty gallery (features has 0 rows)")
    if kind == "flat":
        return build_flat_index(xb, "ip", use_gpu)
    if kind != "ivf":
        raise RetrievalError(f"index kind must be 'flat' or 'ivf', got {kind!r}")
    nlist = default_nlist(n) if nlist is None else int(nlist)
    if not 1 <= nlist <= n:
        raise RetrievalError(f"nlist must be between 1 and the number of vectors ({n}), got {nlist}")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a reference to it
    index = to_faiss_device(index, use_gpu)
    index.train(xb)
    index.add(xb)
    set_nprobe(index, max(1, nlist // 8) if nprobe is None else nprobe)
    return index


def search(index, queries: np.ndarray | torch.Tensor | FeatureSet, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery entries of ``queries [Q, D]``.

    Returns ``(scores [Q, k] float32, indices [Q, k] int64)``, best first; scores are inner products
    (cosine similarities for normalised features). ``k`` is clipped to the gallery size; an IVF index
    whose visited lists hold fewer than ``k`` vectors pads with index ``-1``.
    """
    xq = as_float32_numpy(queries.features if isinstance(queries, FeatureSet) else queries, "queries")
    if xq.shape[1] != index.d:
        raise RetrievalError(f"queries have dimension {xq.shape[1]} but the index holds {index.d}-d vectors")
    if int(k) < 1:
        raise RetrievalError(f"k must be >= 1, got {k}")
    k = min(int(k), index.ntotal)
    if k == 0 or xq.shape[0] == 0:
        return np.zeros((xq.shape[0], k), np.float32), np.zeros((xq.shape[0], k), np.int64)
    return index.search(xq, k)


def index_recall(
    index,
    database: np.ndarray | torch.Tensor | FeatureSet,
    queries: np.ndarray | torch.Tensor | None = None,
    k: int = 10,
    *,
    num_queries: int = 1000,
    seed: int = 0,
) -> float:
    """Recall@k of ``index`` against exact search: the mean fraction of each query's exact top-``k``
    (inner product over ``database [N, D]``, the vectors the index holds) that the index returns.

    ``queries [Q, D]`` default to ``num_queries`` database vectors drawn at random (``seed``).
    """
    xb = as_float32_numpy(database.features if isinstance(database, FeatureSet) else database, "database")
    if xb.shape[0] != index.ntotal:
        raise RetrievalError(f"database has {xb.shape[0]} vectors but the index holds {index.ntotal}")
    if queries is None:
        rng = np.random.default_rng(seed)
        take = rng.choice(xb.shape[0], size=min(num_queries, xb.shape[0]), replace=False)
        xq = xb[np.sort(take)]
    else:
        xq = as_float32_numpy(queries, "queries")
    k = min(int(k), xb.shape[0])
    _, exact = exact_knn(xq, xb, k, "ip", use_gpu=False)
    _, approx = search(index, xq, k)
    hits = (exact[:, :, None] == approx[:, None, :]).any(-1)  # [Q, k] exact neighbour found
    return float(hits.mean())


def save_index(index, path: str | os.PathLike) -> Path:
    """Write a faiss index (GPU indexes are copied to the CPU first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(faiss.index_gpu_to_cpu(index) if _is_gpu_index(index) else index, str(path))
    return path


def load_index(path: str | os.PathLike, use_gpu: bool | None = None):
    """Read a faiss index written by `save_index`, onto a GPU when ``use_gpu`` (``None``: when available)."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"{path}: no such index file (write one with `ccafl-retrieval index`)")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise RetrievalError(f"{path}: not a faiss index ({str(error).splitlines()[0]})") from None
    index = to_faiss_device(index, use_gpu)
    return index


# ----------------------------------------------------------------------------------------- search
@dataclass
class Match:
    """One retrieved gallery image."""

    path: str
    score: float
    index: int
    pid: int | None = None
    camid: int | None = None


@dataclass
class QueryResult:
    """The ranked gallery matches of one query, best first."""

    query: str
    matches: list[Match]
    pid: int | None = None
    camid: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def search_gallery(
    index, gallery: FeatureSet, queries: FeatureSet | np.ndarray | torch.Tensor, k: int = 10
) -> list[QueryResult]:
    """Search ``queries`` against an index built over ``gallery`` and name the matches.

    Returns one `QueryResult` per query (paths joined to the gallery's root, scores, gallery row,
    pid/camid when the gallery file has them). Query names are their paths for a `FeatureSet`, else
    ``"query_<i>"``.
    """
    if index.ntotal != len(gallery):
        raise RetrievalError(
            f"the index holds {index.ntotal} vectors but the gallery features file has {len(gallery)}; "
            "rebuild the index from this features file"
        )
    scores, indices = search(index, queries, k)
    found = np.clip(indices, 0, None)  # -1 padding is dropped below
    g_pids = gallery.pids.numpy()[found].tolist() if gallery.pids is not None else None
    g_cams = gallery.camids.numpy()[found].tolist() if gallery.camids is not None else None
    root = gallery.root
    if isinstance(queries, FeatureSet):
        names = queries.absolute_paths()
        q_pids = queries.pids.tolist() if queries.pids is not None else None
        q_cams = queries.camids.tolist() if queries.camids is not None else None
    else:
        names, q_pids, q_cams = [f"query_{i}" for i in range(scores.shape[0])], None, None
    results = []
    for q, (row_scores, row_indices) in enumerate(zip(scores.tolist(), indices.tolist())):
        matches = [
            Match(gallery.paths[j] if root is None else os.path.join(root, gallery.paths[j]), float(s), int(j),
                  None if g_pids is None else g_pids[q][r], None if g_cams is None else g_cams[q][r])
            for r, (s, j) in enumerate(zip(row_scores, row_indices)) if j >= 0
        ]
        results.append(QueryResult(names[q], matches, None if q_pids is None else q_pids[q],
                                   None if q_cams is None else q_cams[q]))
    return results


__all__ = [
    "IndexKind",
    "Match",
    "QueryResult",
    "build_index",
    "default_nlist",
    "index_recall",
    "load_index",
    "save_index",
    "search",
    "search_gallery",
    "set_nprobe",
]
