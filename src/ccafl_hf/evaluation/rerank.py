"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), dense and from features at scale.

Both paths compute exactly what the widely used reference implementation (``re_ranking(q_g, q_q,
g_g, k1, k2, lambda_value)``, float32 variant) computes. With ``N = Q + G`` and the reference's
normalised original distance ``d̃(i, j) = d(i, j)² / max_r d(r, i)²`` (its input distances squared,
each column of the ``N × N`` matrix divided by its maximum, then transposed):

1. ``F(i, k)`` = the first ``k`` entries of row ``i`` in ascending ``d̃`` order (``i`` itself first);
   ``R(i, k) = {j ∈ F(i, k) : i ∈ F(j, k)}`` (k-reciprocal neighbours).
2. ``E(i)`` = ``R(i, k1+1)`` plus ``R(c, round(k1/2)+1)`` for each ``c ∈ R(i, k1+1)`` whose half set
   shares more than 2/3 of its members with ``R(i, k1+1)``.
3. ``V[i, j] = exp(-d̃(i, j)) / Σ_{e ∈ E(i)} exp(-d̃(i, e))`` for ``j ∈ E(i)``, else 0; if ``k2 != 1``,
   ``V[i] ← mean of V[j] over j ∈ F(i, k2)`` (local query expansion).
4. ``S(q, g) = Σ_j min(V[q, j], V[g, j])``; Jaccard distance ``1 - S / (2 - S)``; final distance
   ``(1 - λ)·jaccard + λ·d̃(q, g)`` for the query × gallery block.

Every set above has at most ``k1 + 1`` (or ``k1·k1/2``) members, so ``V`` is sparse (CSR) and only
the neighbour lists are needed, not the ``N × N`` matrix: `rerank_from_features` gets them, and
``max_r d(r, i)``, from one blocked pass over the upper triangle of the ``N × N`` products (each
block serves its rows and, transposed, its columns; on the CPU each thread multiplies its own
blocks while the merges take turns; `_neighbours_and_farthest`). It produces the re-ranked
query × gallery distances one chunk of queries at a time, with the Jaccard term only where ``S``
is non-zero (summed by one ``bincount`` per block of rows, no sort), so `compute_reid_metrics`
ranks them without ever holding ``Q × G``. Where ``S = 0`` (nearly everywhere) the final distance ``λ·d²/m + (1 - λ)`` never
decreases with ``|d|``, so for ranking those entries are screened on ``d`` itself against a
threshold found by a binary search over float32 values, and only the survivors and the overlaps
are transformed (`_RerankedChunk`).

Ties: both paths order neighbours by distance with ties by index (the dense path by a stable sort,
the pass by (score, index) keys, computing each pair's product once, so ``i`` and ``j`` see the
same value); the reference uses numpy's default (unstable) sort, so on exactly tied distances its
neighbour sets may differ. With continuous features they are the same.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from scipy import sparse

from .distances import (
    ArrayLike,
    DistanceMetric,
    at_once,
    check_feature_pair,
    check_metric,
    column_min,
    compare,
    cpu_threads,
    flat_nonzero,
    helper_thread,
    pair_distance_bounds,
    pairwise_distance,
    prepare_features,
    serial_cpu_ops,
)

logger = logging.getLogger(__name__)

# Rows of the neighbour structure processed per block while building the expanded sets.
_ROW_BLOCK = 8192
# Feature pairs per block when computing distances of sparse (row, column) pairs.
_PAIR_BLOCK = 1 << 10
# Dense (query, gallery) slots per block when summing the Jaccard overlaps (float64: 4 MB, in cache).
_OVERLAP_SLOTS = 1 << 19
# Side of the square blocks of the one-pass neighbour search.
_KNN_BLOCK = 1024
# Width of the off-diagonal blocks, in square blocks: fewer, longer products and folds.
_KNN_WIDE = 8
# At most this many lanes of off-diagonal blocks at once on the CPU (their folds take turns).
_KNN_LANES = 4


# ----------------------------------------------------------------------------------------- arguments
def _check_params(k1: int, k2: int, lambda_value: float) -> tuple[int, int, float]:
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    lam = float(lambda_value)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")
    return int(k1), int(k2), lam


def _half(k1: int) -> int:
    """Size of the half neighbourhood, ``round(k1 / 2) + 1`` with numpy's round-half-to-even."""
    return int(np.around(k1 / 2.0)) + 1


# ---------------------------------------------------------------------------------------- sparse sets
def _ragged(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the ranges ``[starts[s], starts[s] + counts[s])``: returns (segment id, position)."""
    counts = counts.astype(np.int64, copy=False)
    seg = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    pos = np.arange(seg.size, dtype=np.int64) + np.repeat(starts.astype(np.int64, copy=False) - first, counts)
    return seg, pos


def _in_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Membership of ``keys`` in the sorted array ``sorted_keys``."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    loc = np.searchsorted(sorted_keys, keys).clip(max=sorted_keys.size - 1)
    return sorted_keys[loc] == keys


def _reciprocal_sets(neighbours: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``R(i, k)`` for all rows of ``neighbours [N, >=k]`` (ascending order) as CSR ``(indptr, indices)``
    with sorted indices per row."""
    n = neighbours.shape[0]
    forward = np.sort(neighbours[:, :k], axis=1).astype(np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), forward.shape[1])
    cols = forward.ravel()
    keys = rows * n + cols  # sorted: rows ascending, columns sorted within a row
    keep = _in_sorted(keys, cols * n + rows)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=n), out=indptr[1:])
    return indptr, cols[keep]


def _expanded_sets(neighbours: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Expanded k-reciprocal sets ``E(i)`` (step 2) as CSR ``(indptr, indices)``, indices sorted per row."""
    n = neighbours.shape[0]
    r_ptr, r_idx = _reciprocal_sets(neighbours, k1 + 1)
    h_ptr, h_idx = _reciprocal_sets(neighbours, _half(k1))
    h_size = np.diff(h_ptr)
    r_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(r_ptr))
    r_keys = r_rows * n + r_idx  # sorted
    blocks = []
    for lo in range(0, n, _ROW_BLOCK):
        e_lo, e_hi = r_ptr[lo], r_ptr[min(lo + _ROW_BLOCK, n)]
        edge_row, edge_c = r_rows[e_lo:e_hi], r_idx[e_lo:e_hi]
        seg, pos = _ragged(h_ptr[edge_c], h_size[edge_c])
        cand = edge_row[seg] * n + h_idx[pos]  # (i, m) for m in R(c, half)
        shared = np.bincount(seg, weights=_in_sorted(r_keys, cand), minlength=edge_c.size)
        accept = shared > (2.0 / 3.0) * h_size[edge_c]
        blocks.append(r_keys[e_lo:e_hi])
        blocks.append(cand[accept[seg]])
    keys = np.sort(np.concatenate(blocks)) if blocks else np.zeros(0, np.int64)
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if keys.size else keys
    rows = keys // n
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr, keys - rows * n


def _encode(
    neighbours: np.ndarray, k1: int, k2: int, pair_distance: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> sparse.csr_matrix:
    """The k-reciprocal encoding ``V [N, N]`` (steps 2-3) as float32 CSR.

    ``neighbours [N, K]``: each row's nearest indices in ascending normalised distance (``K >=
    min(N, max(k1+1, k2))``); ``pair_distance(rows, cols)`` returns the normalised distances ``d̃``
    (float32) of index pairs.
    """
    n = neighbours.shape[0]
    indptr, indices = _expanded_sets(neighbours, k1)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    weight = np.exp(-pair_distance(rows, indices).astype(np.float32))
    total = np.bincount(rows, weights=weight, minlength=n).astype(np.float32)
    v = sparse.csr_matrix((weight / total[rows], indices, indptr), shape=(n, n))
    if k2 != 1:
        width = min(k2, neighbours.shape[1])
        qe_rows = np.repeat(np.arange(n, dtype=np.int64), width)
        qe = sparse.csr_matrix(
            (np.full(n * width, 1.0 / width, np.float32), (qe_rows, neighbours[:, :width].ravel())), shape=(n, n)
        )
        v = (qe @ v).tocsr()
    v.sort_indices()
    return v


def _overlap_entries(v_rows: sparse.csr_matrix, v_cols_t: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero entries of ``S[a, b] = Σ_j min(v_rows[a, j], v_cols_t[j, b])``.

    ``v_rows [A, N]`` (CSR), ``v_cols_t [N, B]`` (CSR of the transposed column-side encoding). Returns
    ``(keys, values)``: flat positions ``a * B + b`` (int64, ascending, unique) and ``S`` there
    (float32, summed in float64 in (a, j) order). The (row, shared column, column-side entry) triples
    of a block of rows are summed by one ``bincount`` into the block's dense ``[rows, B]`` slots, no
    sort; the work is proportional to the triples plus ``A × B`` zeroed slots.
    """
    a_num, b_num = v_rows.shape[0], v_cols_t.shape[1]
    key_parts, value_parts = [], []
    nnz_per_row = np.diff(v_rows.indptr)
    col_count = np.diff(v_cols_t.indptr)
    step = max(1, _OVERLAP_SLOTS // max(b_num, 1))
    for lo in range(0, a_num, step):
        hi = min(lo + step, a_num)
        e_lo, e_hi = v_rows.indptr[lo], v_rows.indptr[hi]
        cols, vals = v_rows.indices[e_lo:e_hi], v_rows.data[e_lo:e_hi]
        row = np.repeat(np.arange(hi - lo, dtype=np.int64) * b_num, nnz_per_row[lo:hi])
        counts = col_count[cols]
        _, pos = _ragged(v_cols_t.indptr[cols], counts)
        shared = np.minimum(np.repeat(vals, counts), v_cols_t.data[pos])
        # bincount adds each slot's triples in (a, j) order, as the reference's row sums do
        slots = np.repeat(row, counts) + v_cols_t.indices[pos]
        total = np.bincount(slots, weights=shared, minlength=(hi - lo) * b_num)
        keys = np.flatnonzero(total != 0)  # via a boolean mask: several times faster than on float64
        key_parts.append(keys + lo * b_num)
        value_parts.append(total[keys].astype(np.float32))
    if not key_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(key_parts), np.concatenate(value_parts)


def _combine(overlap: np.ndarray | torch.Tensor, original: np.ndarray | torch.Tensor, lambda_value: float):
    """Final distance ``(1 - λ)·(1 - S / (2 - S)) + λ·d̃`` (float32, as the reference)."""
    jaccard = 1 - overlap / (2.0 - overlap)
    return jaccard * (1 - lambda_value) + original * lambda_value


def _rerank_block(original: torch.Tensor, keys: np.ndarray, overlap: np.ndarray, lambda_value: float) -> torch.Tensor:
    """Re-ranked distances from ``original [A, B]`` (``d̃``, float32, overwritten and returned) and the
    non-zero overlaps (`_overlap_entries`). Where ``S = 0`` the Jaccard distance is exactly 1, so the
    dense work is ``λ·d̃ + (1 - λ)``, the same float32 operations as `_combine` there."""
    index = torch.from_numpy(keys).to(original.device)
    touched = _combine(torch.from_numpy(overlap).to(original.device), original.view(-1)[index], lambda_value)
    original.mul_(lambda_value).add_(1 - lambda_value)
    original.view(-1)[index] = touched
    return original


# ----------------------------------------------------------------------------------------- dense path
def _as_float_array(x: ArrayLike, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D distance matrix, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape} to match q_g, got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; expected at least one query and one gallery item")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values; expected finite distances")
    return arr


def rerank_distances(
    q_g: ArrayLike, q_q: ArrayLike, g_g: ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """k-reciprocal re-ranked distances ``[Q, G]`` from dense distance matrices.

    ``q_g [Q, G]``, ``q_q [Q, Q]``, ``g_g [G, G]`` (numpy or tensors) are the original distances; as in
    the reference implementation they are squared and column-normalised internally. Returns float32
    numpy ``[Q, G]``, equal to the reference's output (to float32 rounding). Memory ``O((Q+G)²)``:
    for large sets use `rerank_from_features` / ``compute_reid_metrics(..., rerank=True)``.
    """
    k1, k2, lambda_value = _check_params(k1, k2, lambda_value)
    q_g = _as_float_array(q_g, "q_g")
    num_q, num_g = q_g.shape
    q_q = _as_float_array(q_q, "q_q", (num_q, num_q))
    g_g = _as_float_array(g_g, "g_g", (num_g, num_g))
    original = np.concatenate(
        (np.concatenate((q_q, q_g), axis=1), np.concatenate((q_g.T, g_g), axis=1)), axis=0
    )
    original = np.power(original, 2).astype(np.float32)
    original = np.ascontiguousarray((original / np.max(original, axis=0)).T)
    n = original.shape[0]
    width = min(n, max(k1 + 1, k2))
    neighbours = np.empty((n, width), dtype=np.int64)
    step = max(1, (1 << 24) // n)
    for lo in range(0, n, step):
        neighbours[lo : lo + step] = np.argsort(original[lo : lo + step], axis=1, kind="stable")[:, :width]
    v = _encode(neighbours, k1, k2, lambda r, c: original[r, c])
    keys, overlap = _overlap_entries(v[:num_q], v[num_q:].T.tocsr())
    query_gallery = torch.from_numpy(np.ascontiguousarray(original[:num_q, num_q:]))
    return _rerank_block(query_gallery, keys, overlap, lambda_value).numpy()


# ------------------------------------------------------------------------------------ from features
@dataclass
class KReciprocalDistances:
    """Re-ranked query × gallery distances from features, produced a chunk of queries at a time.

    Built by `rerank_from_features`. ``distances(rows)`` returns ``[len(rows), G]`` float32 on the
    features' device; `to_dense` gives the whole ``[Q, G]`` matrix (small problems only).
    """

    query_features: torch.Tensor  # [Q, D], prepared for the metric (L2-normalised for cosine)
    gallery_features: torch.Tensor  # [G, D]
    metric: DistanceMetric
    lambda_value: float
    query_scale: torch.Tensor  # [Q] max squared distance of each query to all Q + G items
    query_encoding: sparse.csr_matrix  # [Q, Q + G] rows of V
    gallery_encoding_t: sparse.csr_matrix  # [Q + G, G] gallery rows of V, transposed

    @property
    def shape(self) -> tuple[int, int]:
        return self.query_features.shape[0], self.gallery_features.shape[0]

    def distances(self, rows: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        """Re-ranked distances ``[B, G]`` (float32) of the queries ``rows`` (indices or a slice)."""
        if isinstance(rows, slice):
            rows = torch.arange(self.shape[0])[rows]
        return self._chunk(torch.as_tensor(rows, dtype=torch.int64).reshape(-1)).block(0, self.shape[1])

    @cached_property
    def _gallery_sq_norms(self) -> torch.Tensor:
        return self.gallery_features.pow(2).sum(1)

    def _chunk(self, rows: torch.Tensor) -> _RerankedChunk:
        """The re-ranked distances of the queries ``rows [B]`` (int64), one block of the gallery at a time."""
        return _RerankedChunk(self, rows)

    def to_dense(self) -> np.ndarray:
        """All re-ranked distances ``[Q, G]`` as float32 numpy."""
        return self.distances(slice(None)).cpu().numpy()


class _RerankedChunk:
    """Re-ranked distances of a chunk of queries ``rows [B]`` to blocks of gallery columns, for
    `compute_reid_metrics` (the `_DistanceChunk` protocol of `ranking`).

    An entry without overlap (``S = 0``, most of them) has the re-ranked distance ``f(d) = λ·d²/m +
    (1 - λ)`` of its distance ``d`` (``m``: the query's scale), a function of ``|d|`` that never
    decreases, so such entries are screened on ``d`` itself (`raw`, `screen`) and only the survivors
    are transformed; the few entries with an overlap are the exceptions, computed exactly.
    """

    def __init__(self, owner: KReciprocalDistances, rows: torch.Tensor):
        device = owner.query_features.device
        self.owner = owner
        rows_dev = rows.to(device)
        self.q = owner.query_features[rows_dev]
        self.scale = owner.query_scale.to(device)[rows_dev]
        # Non-zero overlaps S of the chunk, keys a * G + b ascending: each row's columns are sorted.
        num_g = owner.shape[1]
        self.keys, self.overlap = _overlap_entries(owner.query_encoding[rows.cpu().numpy()], owner.gallery_encoding_t)
        self.row_keys = np.arange(rows.numel(), dtype=np.int64) * num_g
        self.g_sq = owner._gallery_sq_norms
        self.q_sq = self.q.pow(2).sum(1)

    def raw(self, j0: int, j1: int, rows: slice = slice(None), out: torch.Tensor | None = None) -> torch.Tensor:
        """The distances ``d [R, j1 - j0]`` (float32) of the chunk rows ``rows`` to gallery items ``j0 ..
        j1 - 1``; ``out`` (contiguous float32 of that shape) avoids an allocation."""
        owner = self.owner
        g_sq = self.g_sq[j0:j1] if owner.metric == "euclidean" else None
        if owner.query_features.dtype != torch.float32:
            out = None  # the product runs in the features' dtype, then becomes float32
        return pairwise_distance(self.q[rows], owner.gallery_features[j0:j1], owner.metric, prepared=True,
                                 y_sq_norms=g_sq, out=out).to(torch.float32)

    def _touched(self, j0: int, j1: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The overlaps of the chunk rows ``rows`` in columns ``j0 .. j1 - 1`` (one contiguous run of
        keys per row): their rows (counted from ``rows.start``), columns minus ``j0`` and values ``S``."""
        row_keys = self.row_keys[rows]
        starts = np.searchsorted(self.keys, row_keys + j0)
        seg, pos = _ragged(starts, np.searchsorted(self.keys, row_keys + j1) - starts)
        return seg, self.keys[pos] - row_keys[seg] - j0, self.overlap[pos]

    def block(self, j0: int, j1: int, rows: slice = slice(None), out: torch.Tensor | None = None) -> torch.Tensor:
        """Re-ranked distances ``[R, j1 - j0]`` (float32) of the chunk rows ``rows`` to gallery items
        ``j0 .. j1 - 1``."""
        original = self.raw(j0, j1, rows, out).pow_(2).div_(self.scale[rows, None])
        seg, col, overlap = self._touched(j0, j1, rows)
        return _rerank_block(original, seg * (j1 - j0) + col, overlap, self.owner.lambda_value)

    def untouched_finals(self, rows: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``f(d)`` for entries of chunk rows ``rows`` without overlap: the float32 operations of
        `block` there."""
        lam = self.owner.lambda_value
        return d.pow(2).div_(self.scale[rows]).mul_(lam).add_(1 - lam)

    def screen(self, bound: torch.Tensor) -> torch.Tensor:
        """Thresholds ``t [B]`` on ``d``: an entry without overlap has ``f(d) <= bound`` exactly when
        ``|d| <= t`` (``-inf``: none). A binary search over the float32 bit patterns of ``|d|``."""
        rows = torch.arange(bound.numel(), device=bound.device)

        def within(bits: torch.Tensor) -> torch.Tensor:
            return self.untouched_finals(rows, bits.to(torch.int32).view(torch.float32)) <= bound

        lo = torch.zeros_like(rows)  # f(lo) <= bound where any |d| qualifies
        hi = torch.full_like(rows, 0x7F800000)  # +inf: f(inf) is inf (or nan), never <= bound
        for _ in range(31):
            mid = (lo + hi) // 2
            ok = within(mid)
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        t = lo.to(torch.int32).view(torch.float32)
        return torch.where(within(torch.zeros_like(rows)), t, torch.full_like(t, -math.inf))

    def exceptions(
        self, j0: int, j1: int, d: torch.Tensor, rows: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries of ``d [R, j1 - j0]`` (`raw` of the chunk rows ``rows``) with an overlap: their
        rows (counted from ``rows.start``), gallery columns and exact re-ranked distances, leaving out
        those at ``+inf`` (set aside); they are set to ``+inf`` in ``d`` so that the screening passes
        over them."""
        seg, col, overlap = self._touched(j0, j1, rows)
        device = d.device
        index = torch.from_numpy(seg * (j1 - j0) + col).to(device)
        flat = d.view(-1)
        values = flat.index_select(0, index)
        flat.index_fill_(0, index, math.inf)
        seg_t = torch.from_numpy(seg).to(device)
        aside = values == math.inf
        original = values.pow_(2).div_(self.scale[rows].index_select(0, seg_t))
        values = _combine(torch.from_numpy(overlap).to(device), original, self.owner.lambda_value)
        cols = torch.from_numpy(col + j0).to(device)
        if bool(aside.any()):
            keep = (~aside).nonzero().squeeze(1)
            return seg_t[keep], cols[keep], values[keep]
        return seg_t, cols, values

    def finals(self, rows: torch.Tensor, cols: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Exact re-ranked distances ``[M]`` at the pairs ``(rows, cols)`` with distances ``d [M]``."""
        values = self.untouched_finals(rows, d)
        found, overlap = self._overlaps_at(rows, cols)
        if bool(found.any()):
            at = found.nonzero().squeeze(1)
            original = d[at].pow(2).div_(self.scale[rows[at]])
            values[at] = _combine(overlap[at].to(torch.float32), original, self.owner.lambda_value)
        return values

    def _overlaps_at(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether each pair ``(rows, cols)`` has an overlap, and ``S`` there (float64, 0 elsewhere)."""
        keys = rows.cpu().numpy() * self.owner.shape[1] + cols.cpu().numpy()
        found = _in_sorted(self.keys, keys)
        overlap = np.zeros(keys.size)
        overlap[found] = self.overlap[np.searchsorted(self.keys, keys[found])]
        return torch.from_numpy(found).to(rows.device), torch.from_numpy(overlap).to(rows.device)

    def upper_bounds(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Upper bounds ``[M]`` (float64) on `block`'s distances at the pairs ``(rows, cols)`` (chunk
        rows, gallery columns; ``[M]`` int64): the distance bounds (`pair_distance_bounds`) carried
        through the normalisation and the Jaccard term, with a margin for their float32 roundings."""
        owner = self.owner
        low, high = pair_distance_bounds(self.q, owner.gallery_features, rows, cols, owner.metric, self.q_sq, self.g_sq)
        original = torch.maximum(low.square(), high.square()) / self.scale[rows].double()
        overlap = self._overlaps_at(rows, cols)[1]
        final = original * owner.lambda_value + (1.0 - overlap / (2.0 - overlap)) * (1.0 - owner.lambda_value)
        return final * (1.0 + 1e-6) + 1e-6  # a few float32 roundings of values <= ~2


# Lower 32 bits of a neighbour key: 0xFFFFFFFF - index, so that equal scores rank the smaller index first.
_INDEX_MASK = 0xFFFFFFFF


def _score_keys(score: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (float32 ``score`` descending, ``index`` ascending) when sorted descending."""
    bits = (score + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 and +0.0 are one value
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered << 32) + (_INDEX_MASK - index)


def _key_scores(keys: torch.Tensor) -> torch.Tensor:
    ordered = keys >> 32
    return torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32).view(torch.float32)


def _merge_candidates(
    best: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, rows_sorted: bool = False
) -> torch.Tensor | None:
    """Fold candidate ``keys`` of state ``rows`` into ``best [N, k]`` (keys, descending); returns the
    updated rows (or None). ``rows_sorted``: ``rows`` already ascending (no sort needed)."""
    if rows.numel() == 0:
        return None
    if not rows_sorted:
        order = torch.argsort(rows, stable=True)
        rows, keys = rows[order], keys[order]
    touched, counts = torch.unique_consecutive(rows, return_counts=True)
    seg = torch.repeat_interleave(torch.arange(touched.numel(), device=rows.device), counts)
    pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[seg]
    padded = torch.full((touched.numel(), int(counts.max())), torch.iinfo(torch.int64).min, device=rows.device)
    padded[seg, pos] = keys
    merged = torch.cat((best[touched], padded), dim=1)
    best[touched] = torch.topk(merged, best.shape[1], dim=1).values
    return touched


def _neighbours_and_farthest(x: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest neighbours and farthest squared distance of every row of ``x [N, D]``.

    One pass over the upper triangle of the ``N × N`` score matrix in blocks of ``_KNN_BLOCK`` rows
    (square on the diagonal, ``_KNN_WIDE`` times as wide off it): each block serves its rows and,
    transposed, its columns. Score (larger = nearer): the inner
    product for cosine (prepared features), ``2 x·y - ‖y‖²`` for Euclidean. A row keeps its ``k`` best
    (score, index) pairs, equal scores by smaller index (the item itself is among them); only entries
    at least as good as the row's current ``k``-th are merged. Returns ``(neighbours [N, k]`` int64,
    nearest first; ``max_j d(i, j)² [N]`` float32), on ``x``'s device.
    """
    n = x.shape[0]
    device = x.device
    sq = x.pow(2).sum(1) if metric == "euclidean" else None
    init = _score_keys(torch.tensor([-math.inf], device=device), torch.tensor([_INDEX_MASK], device=device))
    best = init.expand(n, k).clone()
    kth = torch.full((n,), -math.inf, device=device)  # score of each row's current k-th neighbour
    lowest = torch.full((n,), math.inf, device=device)  # smallest score of each row: the farthest item

    block = _KNN_BLOCK
    side = min(block, n)
    wide = min(block * _KNN_WIDE, n)
    # reused scratch (no fresh pages): one comparison mask, one shifted score per side of a block
    masks = torch.empty(2, side * wide, dtype=torch.bool, device=device)
    shifted = torch.empty(2, side * wide, dtype=x.dtype, device=device) if metric == "euclidean" else None

    def fold(score: torch.Tensor, rows0: int, cols0: int, transposed: bool) -> None:
        # score [rows, cols] of state rows rows0 + i against items cols0 + j (or the transpose)
        nr, nc = score.shape
        if transposed:
            states = slice(cols0, cols0 + nc)
            lowest[states] = torch.minimum(lowest[states], column_min(score))
            bound = kth[None, states]
        else:
            states = slice(rows0, rows0 + nr)
            lowest[states] = torch.minimum(lowest[states], score.amin(1))
            bound = kth[states, None]
        mask = compare(score, bound, "ge", out=masks[int(transposed), : nr * nc].view(nr, nc))
        flat = flat_nonzero(mask).to(device)
        if flat.numel() == 0:
            return
        r = flat.div(nc, rounding_mode="floor")
        c = flat - r * nc
        state, item = (c + cols0, r + rows0) if transposed else (r + rows0, c + cols0)
        keys = _score_keys(score.view(-1).index_select(0, flat), item)
        touched = _merge_candidates(best, state, keys, rows_sorted=not transposed)
        kth[touched] = _key_scores(best[touched, k - 1])

    buf = torch.empty(side * wide, dtype=x.dtype, device=device)  # blocks are contiguous views of these
    # Diagonal blocks first: every row starts from its best k in its own block (the entries at least
    # as good as its k-th best score there, ties included, folded by key), so the thresholds are
    # tight before the off-diagonal blocks, where few entries pass them.
    for i0 in range(0, n, block):
        xi = x[i0 : i0 + block]
        s = torch.mm(xi, xi.T, out=buf[: xi.shape[0] ** 2].view(xi.shape[0], xi.shape[0]))
        with serial_cpu_ops(device):
            score = s if metric == "cosine" else 2.0 * s - sq[None, i0 : i0 + xi.shape[0]]
            if xi.shape[0] >= k:
                kth[i0 : i0 + xi.shape[0]] = score.topk(k, dim=1).values[:, -1]
            fold(score, i0, i0, False)
    # Off the diagonal, on the CPU, lanes of blocks run side by side, each with its own products on
    # an equal share of the threads; the folds, which share the states, take turns (a lock) while
    # the other lanes multiply. Each lane keeps to the order of the blocks.
    tasks = [(i0, j0) for i0 in range(0, n, block) for j0 in range(i0 + block, n, block * _KNN_WIDE)]
    lanes = min(torch.get_num_threads(), _KNN_LANES, max(len(tasks), 1)) if device.type == "cpu" else 1
    turn = threading.Lock()

    def lane(number: int, out: torch.Tensor, shift: torch.Tensor | None) -> None:
        for i0, j0 in tasks[number::lanes]:
            xi, xj = x[i0 : i0 + block], x[j0 : j0 + block * _KNN_WIDE]
            s = torch.mm(xi, xj.T, out=out[: xi.shape[0] * xj.shape[0]].view(xi.shape[0], xj.shape[0]))
            with serial_cpu_ops(device) if lanes == 1 else nullcontext():
                if metric == "cosine":
                    by_row = by_column = s
                else:  # 2 x·y - ‖y‖² (‖x‖² for the columns), the same float32 operations as on the diagonal
                    by_row = torch.mul(s, 2.0, out=shift[0, : s.numel()].view(s.shape))
                    by_row.sub_(sq[None, j0 : j0 + xj.shape[0]])
                    by_column = torch.mul(s, 2.0, out=shift[1, : s.numel()].view(s.shape))
                    by_column.sub_(sq[i0 : i0 + xi.shape[0], None])
                with turn:
                    fold(by_row, i0, j0, False)
                    fold(by_column, i0, j0, True)

    scratch = [(buf, shifted)] + [
        (torch.empty_like(buf), None if shifted is None else torch.empty_like(shifted)) for _ in range(lanes - 1)
    ]
    each = max(1, torch.get_num_threads() // lanes)
    with helper_thread(device, lanes - 1, each) as pool, cpu_threads(device, each):
        at_once(pool, lane, *((number, *scratch[number]) for number in range(lanes)))
    neighbours = _INDEX_MASK - (best & _INDEX_MASK)
    if metric == "cosine":
        farthest = (1.0 - lowest).clamp_(min=0.0).square_()
    else:
        farthest = (sq - lowest).clamp_(min=0.0)
    return neighbours, farthest


def rerank_from_features(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    metric: DistanceMetric = "cosine",
    use_gpu: bool | None = None,
    prepared: bool = False,
) -> KReciprocalDistances:
    """k-reciprocal re-ranking from features ``[Q, D]`` and ``[G, D]`` without any ``(Q+G)²`` matrix.

    Equivalent to ``rerank_distances(pairwise_distance(q, g), pairwise_distance(q, q),
    pairwise_distance(g, g), k1, k2, lambda_value)`` for the same ``metric``, but finds the exact
    nearest and farthest neighbours in one blocked pass over the upper triangle of the ``(Q+G)²``
    products (never held) and uses sparse encodings; memory is ``O((Q+G)·k1·k2)`` plus one chunk of
    queries at a time. ``use_gpu``: run that pass on the GPU (``True``, needs CUDA), on the CPU
    (``False``) or where the query features are (``None``). ``prepared``: the features are already
    prepared for ``metric`` (`prepare_features`: L2-normalised for cosine). Returns a
    `KReciprocalDistances`.
    """
    k1, k2, lambda_value = _check_params(k1, k2, lambda_value)
    metric = check_metric(metric)
    qf, gf = check_feature_pair(query_features, gallery_features)
    if not prepared:
        qf, gf = prepare_features(qf, metric), prepare_features(gf, metric)
    gf = gf.to(device=qf.device, dtype=qf.dtype)
    num_q = qf.shape[0]
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but torch sees no CUDA device here")
    device = qf.device if use_gpu is None else torch.device("cuda" if use_gpu else "cpu")
    x_t = torch.cat((qf, gf)).to("cpu", torch.float32)
    n = x_t.shape[0]
    width = min(n, max(k1 + 1, k2))
    start = time.perf_counter()
    neighbours, scale = _neighbours_and_farthest(x_t.to(device), width, metric)
    neighbours, scale = neighbours.cpu().numpy(), scale.cpu().numpy()
    logger.info("re-ranking: exact %d-NN and farthest neighbours of %d items (one pass) in %.2f s",
                width, n, time.perf_counter() - start)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    sq = x_t.pow(2).sum(1) if metric == "euclidean" else None

    left = torch.empty(_PAIR_BLOCK, x_t.shape[1])  # reused gather buffers: no fresh pages per block
    right = torch.empty(_PAIR_BLOCK, x_t.shape[1])

    def pair_distance(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = np.empty(rows.size, dtype=np.float32)
        for lo in range(0, rows.size, _PAIR_BLOCK):
            r = torch.from_numpy(rows[lo : lo + _PAIR_BLOCK])
            c = torch.from_numpy(cols[lo : lo + _PAIR_BLOCK])
            m = r.numel()
            a = torch.index_select(x_t, 0, r, out=left[:m])
            dot = a.mul_(torch.index_select(x_t, 0, c, out=right[:m])).sum(1)
            d2 = (1.0 - dot).square() if metric == "cosine" else (sq[r] + sq[c] - 2.0 * dot).clamp(min=0.0)
            out[lo : lo + _PAIR_BLOCK] = (d2 / torch.from_numpy(scale[rows[lo : lo + _PAIR_BLOCK]])).numpy()
        return out

    start = time.perf_counter()
    with serial_cpu_ops(x_t.device):  # small gathers and sums of feature pairs
        v = _encode(neighbours.astype(np.int64), k1, k2, pair_distance)
    logger.info("re-ranking: k-reciprocal encoding (%d non-zeros) in %.2f s", v.nnz, time.perf_counter() - start)
    return KReciprocalDistances(
        query_features=qf,
        gallery_features=gf,
        metric=metric,
        lambda_value=lambda_value,
        query_scale=torch.from_numpy(scale[:num_q]),
        query_encoding=v[:num_q],
        gallery_encoding_t=v[num_q:].T.tocsr(),
    )


__all__ = ["KReciprocalDistances", "rerank_distances", "rerank_from_features"]
