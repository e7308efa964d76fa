"""Cross-camera association of intra-camera identities (docs/method.md §5, steps 1–4).

Given one feature per intra-camera identity, the stage-3 pseudo-identities are built by

1. taking every pair of identities from **different** cameras, scored by squared Euclidean distance;
2. keeping the ``M`` smallest pairs in ascending order;
3. walking them greedily, accepting ``(i, j)`` only if ``i`` has no accepted partner in ``j``'s camera
   and ``j`` none in ``i``'s camera;
4. taking connected components of the accepted pairs; identities without an accepted pair get ``-1``.

The reference implementation builds the dense ``N x N`` distance matrix. Here the same partition is
obtained from exact nearest-neighbour search (faiss) without ever materialising it:

* identities are sorted by camera and each unordered pair is searched once, from the identity in the
  earlier camera towards the identities of all later cameras (half the work of a full all-pairs pass,
  and no same-camera neighbours to throw away);
* every row starts with a small ``k``; after each round the cut-off ``T`` (the ``M``-th smallest
  distance found so far) is recomputed and only rows whose ``k``-th neighbour is still within ``T``
  are searched again with a larger ``k``. When no such row is left, every pair closer than ``T``
  has been found, i.e. the candidate set provably holds the ``M`` closest cross-camera pairs;
* candidates are then re-scored in float64 as ``|a|^2 + |b|^2 - 2 a.b`` (so unnormalised features
  are handled exactly too) and ordered by ``(distance, smaller index, larger index)``, which is the
  order a stable sort of the row-major upper triangle gives. A safety margin larger than the float32
  rounding error of the search makes the float32 search and the float64 ranking agree.

Its inputs come from `identity_mean_features` (one L2-normalised mean feature per identity) and
`camera_centered` (each camera's mean feature removed).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .utils.neighbors import (  # faiss: with the install hint if missing
    as_float32_numpy,
    faiss,
    resolve_faiss_gpu,
)

logger = logging.getLogger(__name__)

# Initial k of a row = max(_MIN_INITIAL_K, _INITIAL_K_FACTOR x the row's share of the budget were
# close pairs spread uniformly). faiss's cost hardly depends on k at this size, so a generous start
# avoids most re-search rounds.
_MIN_INITIAL_K = 32
_INITIAL_K_FACTOR = 4.0
# Factor by which k grows for rows whose k-th neighbour is still inside the cut-off.
_K_GROWTH = 4
# The search tolerance is _TOL_FACTOR * D * float32-eps * max squared norm: a bound on the float32
# rounding error of |a|^2 + |b|^2 - 2 a.b, so no pair is lost between float32 search and float64 ranking.
_TOL_FACTOR = 8.0
# faiss-gpu's largest supported k.
_GPU_MAX_K = 2048
# Candidate pairs re-scored in float64 per chunk.
_RESCORE_CHUNK = 16384


def _as_float_numpy(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """``features`` as a numpy float32/float64 array ``[N, D]`` (float64 kept for exact re-scoring)."""
    if isinstance(features, torch.Tensor):
        t = features.detach().cpu()
        features = t.numpy() if t.dtype == torch.float64 else t.to(torch.float32).numpy()
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, D], got shape {tuple(x.shape)}")
    if x.dtype != np.float64:
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"features must hold real numbers, got dtype {x.dtype}")
        x = x.astype(np.float32, copy=False)
    if x.shape[1] == 0:
        raise ValueError("features must have at least one column (shape [N, D] with D >= 1)")
    if not np.isfinite(x).all():
        raise ValueError("features contains NaN or infinite values; expected finite [N, D] features")
    return x


def _as_camera_index(cameras: np.ndarray | torch.Tensor, num_rows: int) -> tuple[np.ndarray, int]:
    """Map camera ids ``[N]`` (any integers) to ``0..C-1``; returns ``(camera_index [N], C)``."""
    if isinstance(cameras, torch.Tensor):
        cameras = cameras.detach().cpu().numpy()
    cams = np.asarray(cameras)
    if cams.ndim != 1 or cams.shape[0] != num_rows:
        raise ValueError(
            f"cameras must be a 1-D integer array [N] with N = {num_rows} (one per feature row), "
            f"got shape {tuple(cams.shape)}"
        )
    if not np.issubdtype(cams.dtype, np.integer) or cams.dtype == np.bool_:
        raise ValueError(f"cameras must hold integer camera ids, got dtype {cams.dtype}")
    uniq, index = np.unique(cams, return_inverse=True)
    if len(uniq) < 2:
        raise ValueError(
            f"cross-camera association needs >= 2 cameras, got {len(uniq)} distinct camera id(s)"
        )
    return index.astype(np.int64), len(uniq)


def _check_num_pairs(num_pairs: int) -> int:
    if isinstance(num_pairs, (bool, np.bool_)) or not isinstance(num_pairs, (int, np.integer)):
        raise ValueError(f"num_pairs must be a non-negative int (M = rate * N), got {num_pairs!r}")
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be a non-negative int (M = rate * N), got {num_pairs}")
    return int(num_pairs)


class _L2Searcher:
    """Exact squared-L2 kNN on CPU or GPU faiss; holds one GPU resource for all calls of an association."""

    def __init__(self, use_gpu: bool | None):
        self.resources = faiss.StandardGpuResources() if resolve_faiss_gpu(use_gpu) else None

    def __call__(self, queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and indices ``[Q, k]`` (ascending) of ``queries [Q, D]`` into ``database [B, D]``."""
        if self.resources is not None and k <= _GPU_MAX_K:
            return faiss.knn_gpu(self.resources, queries, database, k, metric=faiss.METRIC_L2)
        return faiss.knn(queries, database, k, metric=faiss.METRIC_L2)


def _cross_camera_candidates(
    xs: np.ndarray, starts: np.ndarray, num_pairs: int, tol: float, searcher: _L2Searcher
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs guaranteed to contain the ``num_pairs`` closest cross-camera pairs.

    ``xs [N, D]`` float32 rows sorted by camera, camera ``c`` occupying rows ``starts[c]:starts[c+1]``.
    Returns ``(i [P], j [P], dist [P])`` in sorted-row positions with ``i`` in an earlier camera than
    ``j``; every pair whose float32 distance is ``<= T + tol`` is included, ``T`` being the
    ``num_pairs``-th smallest candidate distance (so ``P >= num_pairs``).
    """
    n = xs.shape[0]
    num_cams = len(starts) - 1
    counts = np.diff(starts)
    row_cam = np.repeat(np.arange(num_cams), counts)
    # Number of possible partners (rows of later cameras) of each row.
    avail = (n - starts[1:])[row_cam]
    total_pairs = int((counts * (n - starts[1:])).sum())

    if num_pairs >= total_pairs:
        k = avail.copy()
    else:
        expected = np.ceil(_INITIAL_K_FACTOR * num_pairs * avail / total_pairs).astype(np.int64)
        k = np.minimum(avail, np.maximum(expected, _MIN_INITIAL_K))
    kth = np.full(n, -np.inf, dtype=np.float64)  # distance of each row's k-th neighbour
    to_search = avail > 0
    cand_i = np.zeros(0, np.int64)
    cand_j = np.zeros(0, np.int64)
    cand_d = np.zeros(0, np.float32)
    cutoff = np.inf
    rounds = 0
    while to_search.any():
        rounds += 1
        rows = np.flatnonzero(to_search)
        keep = ~to_search[cand_i]
        new_i, new_j, new_d = [cand_i[keep]], [cand_j[keep]], [cand_d[keep]]
        # One faiss call per (camera, k) group: rows of a camera share the database of later cameras.
        groups = row_cam[rows] * (n + 1) + k[rows]
        for g in np.unique(groups):
            grp = rows[groups == g]
            cam, kk = divmod(int(g), n + 1)
            offset = int(starts[cam + 1])
            dist, idx = searcher(np.ascontiguousarray(xs[grp]), xs[offset:], kk)
            kth[grp] = dist[:, -1]
            new_i.append(np.repeat(grp, kk))
            new_j.append(idx.reshape(-1).astype(np.int64) + offset)
            new_d.append(dist.reshape(-1))
        cand_i, cand_j, cand_d = np.concatenate(new_i), np.concatenate(new_j), np.concatenate(new_d)
        if len(cand_d) >= num_pairs > 0:
            cutoff = float(np.partition(cand_d, num_pairs - 1)[num_pairs - 1])
            within = cand_d <= cutoff + tol
            cand_i, cand_j, cand_d = cand_i[within], cand_j[within], cand_d[within]
        # A row is complete once all its partners are found or its k-th neighbour lies beyond the cut-off.
        to_search = (k < avail) & (kth <= cutoff + tol)
        k = np.where(to_search, np.minimum(avail, k * _K_GROWTH), k)
        logger.debug(
            "association round %d: searched %d rows, %d candidates, cut-off %.6g, %d rows to grow",
            rounds,
            len(rows),
            len(cand_d),
            cutoff,
            int(to_search.sum()),
        )
    return cand_i, cand_j, cand_d


def _pair_distances(x: np.ndarray, sqnorm: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Float64 ``|x_a|^2 + |x_b|^2 - 2 x_a.x_b`` for index arrays ``a, b [P]`` into ``x [N, D]``; ``[P]``."""
    out = np.empty(len(a), dtype=np.float64)
    for s in range(0, len(a), _RESCORE_CHUNK):
        xa = x[a[s : s + _RESCORE_CHUNK]].astype(np.float64, copy=False)
        xb = x[b[s : s + _RESCORE_CHUNK]].astype(np.float64, copy=False)
        out[s : s + _RESCORE_CHUNK] = np.einsum("pd,pd->p", xa, xb)
    return sqnorm[a] + sqnorm[b] - 2.0 * out


def _greedy_walk(a: np.ndarray, b: np.ndarray, cam: np.ndarray, num_cams: int) -> np.ndarray:
    """Indices of the accepted pairs among ``(a[t], b[t])`` walked in order (docs/method.md §5 step 3).

    A pair is accepted only if ``a`` has no accepted partner in ``b``'s camera and ``b`` none in
    ``a``'s camera. The rule is inherently sequential; this is a tight loop over flat ``bytearray``
    keys ``identity * C + camera`` (tens of milliseconds for 10^5 pairs).
    """
    key_a = (a * num_cams + cam[b]).tolist()
    key_b = (b * num_cams + cam[a]).tolist()
    taken = bytearray(int(cam.shape[0]) * num_cams)
    accepted = []
    for t, (ka, kb) in enumerate(zip(key_a, key_b)):
        if not (taken[ka] or taken[kb]):
            taken[ka] = 1
            taken[kb] = 1
            accepted.append(t)
    return np.asarray(accepted, dtype=np.int64)


def _component_labels(pairs: np.ndarray, num_rows: int) -> np.ndarray:
    """Connected components of ``pairs [A, 2]`` as labels ``[N]``: ``-1`` for rows in no pair, others
    ``0..C-1`` numbered in order of each cluster's smallest member index."""
    labels = np.full(num_rows, -1, dtype=np.int64)
    if len(pairs) == 0:
        return labels
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(num_rows, num_rows))
    _, comp = connected_components(graph, directed=False)
    associated = np.zeros(num_rows, dtype=bool)
    associated[pairs.reshape(-1)] = True
    # np.unique's first-occurrence indices, scanned over rows in index order, give each cluster's
    # smallest member; ranking clusters by it gives canonical labels.
    members = np.flatnonzero(associated)
    comps, first = np.unique(comp[members], return_index=True)
    rank = np.empty(comp.max() + 1, dtype=np.int64)
    rank[comps[np.argsort(first)]] = np.arange(len(comps))
    labels[members] = rank[comp[members]]
    return labels


# ------------------------------------------------------------------------------ identity features
def camera_centered(features: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
    """Subtract each camera's mean row from ``features [N, D]`` (cameras ``[N]``) and L2-normalise."""
    cameras = cameras.long().to(features.device)
    num_cameras = int(cameras.max()) + 1
    sums = torch.zeros(num_cameras, features.shape[1], device=features.device, dtype=features.dtype)
    sums.index_add_(0, cameras, features)
    counts = torch.bincount(cameras, minlength=num_cameras).clamp_min(1).to(features.dtype)
    return F.normalize(features - (sums / counts[:, None])[cameras], dim=1)


def identity_mean_features(features: torch.Tensor, intra_ids: torch.Tensor, num_identities: int) -> torch.Tensor:
    """L2-normalised mean feature ``[N, D]`` of each intra-camera identity from image features ``[M, D]``."""
    sums = torch.zeros(num_identities, features.shape[1], device=features.device, dtype=torch.float32)
    sums.index_add_(0, intra_ids.long(), features.float())
    return F.normalize(sums, dim=1)


# ---------------------------------------------------------------------------------------- association
def associate_across_cameras(
    features: np.ndarray | torch.Tensor,
    cameras: np.ndarray | torch.Tensor,
    num_pairs: int,
    *,
    use_gpu: bool | None = None,
    return_pairs: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Pseudo-identities from cross-camera association (docs/method.md §5 steps 1–4), without an N x N matrix.

    Args:
        features: ``[N, D]`` one feature per intra-camera identity (numpy or torch). The method
            L2-normalises them upstream; distances are exact squared Euclidean either way.
        cameras: ``[N]`` integer camera id of each row (any integer values, at least two distinct).
        num_pairs: ``M``, the number of closest cross-camera pairs walked (``rate * N``). If it exceeds
            the number of cross-camera pairs, all of them are used.
        use_gpu: faiss on GPU; ``None`` uses it when faiss-gpu sees a GPU.
        return_pairs: also return the accepted pairs.

    Returns:
        ``labels [N]`` int64: cluster ``0..C-1`` numbered in order of each cluster's smallest member
        index, ``-1`` for identities with no accepted pair. With ``return_pairs=True``,
        ``(labels, pairs)`` where ``pairs [A, 2]`` int64 holds the accepted pairs ``(i, j)``, ``i < j``,
        in walk (ascending distance) order.

    Ties in distance are broken by ``(smaller index, larger index)``, as a stable sort of the
    row-major upper triangle of the distance matrix would.
    """
    x = _as_float_numpy(features)
    n = x.shape[0]
    cam, num_cams = _as_camera_index(cameras, n)
    m = _check_num_pairs(num_pairs)

    counts = np.bincount(cam, minlength=num_cams)
    total_pairs = (n * n - int((counts.astype(np.int64) ** 2).sum())) // 2
    if m > total_pairs:
        logger.warning("num_pairs=%d exceeds the %d cross-camera pairs; using all of them", m, total_pairs)
        m = total_pairs
    if m == 0:
        labels = np.full(n, -1, dtype=np.int64)
        return (labels, np.zeros((0, 2), np.int64)) if return_pairs else labels

    # Sort rows by camera: camera c's rows are xs[starts[c]:starts[c+1]], later cameras follow it.
    order = np.argsort(cam, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    xs = as_float32_numpy(x[order])
    sqnorm = np.einsum("nd,nd->n", x, x, dtype=np.float64)
    tol = _TOL_FACTOR * x.shape[1] * float(np.finfo(np.float32).eps) * max(float(sqnorm.max()), 1e-30)

    ci, cj, _ = _cross_camera_candidates(xs, starts, m, tol, _L2Searcher(use_gpu))
    del xs
    # Back to original indices, exact float64 distances, order (distance, smaller index, larger index).
    oi, oj = order[ci], order[cj]
    a, b = np.minimum(oi, oj), np.maximum(oi, oj)
    dist = _pair_distances(x, sqnorm, a, b)
    top = np.lexsort((b, a, dist))[:m]
    a, b = a[top], b[top]

    accepted = _greedy_walk(a, b, cam, num_cams)
    pairs = np.stack([a[accepted], b[accepted]], axis=1)
    labels = _component_labels(pairs, n)
    logger.debug(
        "cross-camera association: %d identities, %d cameras, %d pairs walked, %d accepted, "
        "%d clusters, %d identities associated (%d candidates searched)",
        n,
        num_cams,
        m,
        len(pairs),
        int(labels.max()) + 1,
        int((labels >= 0).sum()),
        len(ci),
    )
    return (labels, pairs) if return_pairs else labels


def association_diagnostics(
    labels: np.ndarray | torch.Tensor,
    true_pids: np.ndarray | torch.Tensor,
    cameras: np.ndarray | torch.Tensor | None = None,
    pairs: np.ndarray | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Quality of an association against ground-truth person ids — for logging only, never for training.

    Args:
        labels: ``[N]`` pseudo-identity per intra-camera identity (``-1`` = unassociated), as returned
            by :func:`associate_across_cameras`.
        true_pids: ``[N]`` ground-truth person id of each intra-camera identity.
        cameras: optional ``[N]`` camera ids; adds ``camera_conflict_rate``.
        pairs: optional ``[A, 2]`` accepted pairs (``return_pairs=True``); adds ``num_accepted_pairs``
            and ``pair_precision``.

    Returns a dict with
        ``num_clusters``, ``num_associated`` (identities with label >= 0), ``associated_fraction``;
        ``cluster_purity``: fraction of associated identities whose true pid is their cluster's
        majority pid;
        ``pairwise_precision`` / ``pairwise_recall``: over unordered identity pairs, the fraction of
        same-cluster pairs sharing a true pid, and of same-pid pairs put in one cluster
        (NaN when the denominator is 0);
        ``camera_conflict_rate`` (with ``cameras``): fraction of clusters holding two identities of
        one camera, which are certainly different persons;
        ``num_accepted_pairs``, ``pair_precision`` (with ``pairs``): fraction of accepted pairs whose
        two identities share the true pid.
    """

    def _ints(v: Any, name: str) -> np.ndarray:
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        v = np.asarray(v)
        if not np.issubdtype(v.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {v.dtype}")
        return v.astype(np.int64, copy=False)

    labels_np = _ints(labels, "labels")
    pids = _ints(true_pids, "true_pids")
    if labels_np.ndim != 1 or pids.shape != labels_np.shape:
        raise ValueError(
            f"labels and true_pids must be 1-D arrays [N] of equal length, got shapes "
            f"{tuple(labels_np.shape)} and {tuple(pids.shape)}"
        )
    n = labels_np.shape[0]
    assoc = labels_np >= 0
    lab, pid = labels_np[assoc], pids[assoc]

    def _pairs_count(c: np.ndarray) -> float:
        return float((c * (c - 1) // 2).sum())

    # Contingency of (cluster, pid) over associated identities: cells, cluster sizes, pid sizes.
    clusters, cluster_of, cluster_sizes = np.unique(lab, return_inverse=True, return_counts=True)
    cells, cell_counts = np.unique(np.stack([cluster_of, pid]), axis=1, return_counts=True)
    same_both = _pairs_count(cell_counts)
    same_cluster = _pairs_count(cluster_sizes)
    same_pid = _pairs_count(np.unique(pids, return_counts=True)[1])
    # Majority pid of a cluster = its largest cell.
    majority = np.zeros(len(clusters), dtype=np.int64)
    np.maximum.at(majority, cells[0], cell_counts)
    num_clusters = len(clusters)

    out: dict[str, Any] = {
        "num_clusters": num_clusters,
        "num_associated": int(assoc.sum()),
        "associated_fraction": float(assoc.sum() / n) if n else float("nan"),
        "cluster_purity": float(majority.sum() / len(lab)) if len(lab) else float("nan"),
        "pairwise_precision": same_both / same_cluster if same_cluster else float("nan"),
        "pairwise_recall": same_both / same_pid if same_pid else float("nan"),
    }
    if cameras is not None:
        cams = _ints(cameras, "cameras")
        if cams.shape != labels_np.shape:
            raise ValueError(f"cameras must be a 1-D array [N] with N = {n}, got shape {tuple(cams.shape)}")
        if num_clusters:
            # A cluster has a conflict when it has fewer distinct cameras than members.
            cluster_cams = np.unique(np.stack([cluster_of, cams[assoc]]), axis=1)
            distinct_cams = np.bincount(cluster_cams[0], minlength=num_clusters)
            out["camera_conflict_rate"] = float((distinct_cams < cluster_sizes).mean())
        else:
            out["camera_conflict_rate"] = float("nan")
    if pairs is not None:
        p = _ints(pairs, "pairs")
        if p.ndim != 2 or p.shape[1] != 2 or (len(p) and (p.min() < 0 or p.max() >= n)):
            raise ValueError(
                f"pairs must be an integer array [A, 2] of row indices < {n}, got shape {tuple(p.shape)}"
            )
        out["num_accepted_pairs"] = int(len(p))
        out["pair_precision"] = float((pids[p[:, 0]] == pids[p[:, 1]]).mean()) if len(p) else float("nan")
    return out


__all__ = ["associate_across_cameras", "association_diagnostics", "camera_centered", "identity_mean_features"]
