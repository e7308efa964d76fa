"""Market-1501-protocol retrieval metrics (docs/method.md §1) that scale to MSMT17 and beyond.

Protocol: for every query, the gallery images with the same identity **and** the same camera are
removed; the remaining gallery images with the query's identity are its *positives* (distractors,
pid 0, stay in the gallery as negatives; no other id is special). Queries without a positive are
skipped and counted. Every metric is a function of the 0-based ranks ``r_1 < … < r_n`` of a query's
``n`` positives in its filtered, ascending ranking:

* AP = (1/n) Σ_k k / (r_k + 1);  CMC@K = 1 if r_1 < K;  INP = n / (r_n + 1)  (Ye et al., TPAMI 2021).

So no row is ever sorted: the ranks are counts. Only gallery entries no farther than a query's last
positive can come before any positive (about 1 % of a row on MSMT17-like data); those *survivors*
are each placed among the row's sorted positive distances by one ``searchsorted`` over integer
(row, float32 distance) keys (a binary search for float64), and a ``bincount`` of the placements,
summed cumulatively, is each positive's rank.

From features (`compute_reid_metrics`) the query × gallery product is computed in tiles: chunks of
about two thousand queries, blocks of about 4,096 gallery items (on the CPU such tiles run the BLAS
kernel 1.3-1.6x faster than products as wide as the gallery, and a tile is still in cache when it
is compared). A row's last positive is not known before its last block, so each row first gets an
upper bound on its positives' distances (`pair_distance_bounds`: their dot products and the
worst-case rounding of any summation order); each tile keeps the entries within it and the exact
values at its positives, and the survivors are those no farther than the exact last positive. The
bound is verified afterwards (every last positive within it; otherwise - a less accurate product,
say - the chunk is redone by whole rows), so the result is exact whatever the bound's margin. On
the CPU the chunk's rows are split into one lane per thread, each with its own one-thread
products, so no thread waits for another between a product and its comparison. Where most entries
survive (features close to random) a chunk is ranked by whole rows instead, by one search of
every entry (`evaluate_rank`'s kernel).

Ties are broken as a **stable** ascending sort of the row would: by gallery index. A survivor at the
same distance as some positives (found by that search) comes before those with a larger gallery
index only. The dense `evaluate_rank` uses the same kernel, so both agree exactly on the same
distances, ties included. From features, the distances are those of the tiles' products: equal to
the whole product's wherever the matrix-product kernel rounds both alike (tiles of a thousand rows
or more on the CPU), but a kernel may round a small tile (a few rows) differently in the last
place, and then exactly tied features (duplicates) can be ordered differently.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import nullcontext
from typing import Protocol

import numpy as np
import torch

from .distances import (
    ArrayLike,
    DistanceMetric,
    _as_tensor,
    at_once,
    check_feature_pair,
    check_ids,
    check_metric,
    compare,
    count_nonzero,
    even_ranges,
    flat_nonzero,
    helper_thread,
    pair_distance_bounds,
    pairwise_distance,
    prepare_features,
    round_up,
    serial_cpu_ops,
)
from .rerank import rerank_from_features

logger = logging.getLogger(__name__)

# Bytes of scratch per chunk of whole rows (distances + comparison mask): `evaluate_rank`, and chunks
# that are not ranked by gallery blocks.
_CHUNK_BYTES = 128 * 2**20
# Above this fraction of surviving entries a chunk is ranked by one search of whole rows instead.
_DENSE_SURVIVORS = 0.25
# From features: queries per chunk (chunk_size None; per two CPU threads) and gallery items per block
# of the product. On the CPU, products of about a thousand queries by a few thousand gallery items
# run 1.3-1.6x faster than products as wide as the whole gallery, and a lane's block (16 MB) is still
# in the last-level cache when it is compared.
_QUERY_CHUNK = 2048
_GALLERY_BLOCK = 4096
# A chunk with more survivors than this is ranked by whole rows instead (bounded scratch).
_MAX_SURVIVORS = 1 << 23
# Fewest queries per lane: smaller chunks run as one lane (tiny products gain nothing from lanes,
# and a kernel may round a product of a few rows differently from the whole product).
_LANE_ROWS = 64


def _check_max_rank(max_rank: int) -> int:
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    return int(max_rank)


def _check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return int(chunk_size)


# ----------------------------------------------------------------------------------- gallery by identity
class _GalleryIndex:
    """Gallery entries grouped by identity, to find each query's positives and same-camera entries."""

    def __init__(self, q_pids: torch.Tensor, g_pids: torch.Tensor, q_camids: torch.Tensor, g_camids: torch.Tensor):
        self.g_camids = g_camids
        self.order = torch.argsort(g_pids, stable=True)
        sorted_pids = g_pids[self.order]
        self.unique_pids, self.counts = torch.unique_consecutive(sorted_pids, return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        # Number of positives per query = #same pid - #same (pid, camera), from integer keys.
        pid_vocab = torch.unique(torch.cat((q_pids, g_pids)))
        cam_vocab = torch.unique(torch.cat((q_camids, g_camids)))
        num_cams = cam_vocab.numel()

        def key(pids: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
            return torch.searchsorted(pid_vocab, pids) * num_cams + torch.searchsorted(cam_vocab, cams)

        g_keys = torch.sort(key(g_pids, g_camids)).values
        q_keys = key(q_pids, q_camids)
        same_pid_cam = torch.searchsorted(g_keys, q_keys, right=True) - torch.searchsorted(g_keys, q_keys)
        self.num_positives = self._group(q_pids)[1] - same_pid_cam

    def _group(self, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = torch.searchsorted(self.unique_pids, pids).clamp_(max=self.unique_pids.numel() - 1)
        found = self.unique_pids[loc] == pids
        return self.starts[loc], torch.where(found, self.counts[loc], torch.zeros_like(loc))

    def lookup(self, pids: torch.Tensor, camids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For queries ``[B]``: gallery indices of same-pid entries ``[B, P]`` (padded with 0), the
        positive mask (other camera) and the junk mask (same camera), both ``[B, P]``."""
        start, count = self._group(pids)
        width = max(int(count.max()), 1)
        slot = torch.arange(width, device=pids.device)
        member = slot[None, :] < count[:, None]
        pos = (start[:, None] + slot[None, :]).clamp_(max=self.order.numel() - 1)
        index = torch.where(member, self.order[pos], torch.zeros_like(pos))
        same_cam = self.g_camids[index] == camids[:, None]
        return index, member & ~same_cam, member & same_cam


# ------------------------------------------------------------------------------------ the ranking kernel
def _sorted_positives(
    pos_dist: torch.Tensor, index: torch.Tensor, positive: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positives of each row in ranking order: from their distances ``pos_dist [B, P]`` (any
    value where not ``positive``), gallery indices ``index [B, P]`` and mask ``positive [B, P]``.

    Returns ``pos_d [B, P]`` (ascending, padded with ``+inf``), ``pos_g [B, P]`` their gallery
    indices, ``num_pos [B]``, ``valid [B, P]`` (the first ``num_pos`` slots) and ``last [B]`` (the
    last positive's distance, ``-inf`` for a row without any).
    """
    pos_d = pos_dist.masked_fill(~positive, math.inf)
    pos_d, order = torch.sort(pos_d, dim=1, stable=True)  # equal distances: by gallery index
    pos_g = index.gather(1, order)
    num_pos = positive.sum(1)
    valid = torch.arange(index.shape[1], device=index.device)[None, :] < num_pos[:, None]
    last = pos_d.gather(1, (num_pos - 1).clamp_(min=0)[:, None]).squeeze(1).masked_fill_(num_pos == 0, -math.inf)
    return pos_d, pos_g, num_pos, valid, last


def _positive_ranks(
    dist: torch.Tensor, index: torch.Tensor, positive: torch.Tensor, junk: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of each query's positives among its valid gallery entries.

    ``dist [B, G]`` (contiguous, finite; modified in place: junk entries become ``+inf``), ``index
    [B, P]`` gallery indices with masks ``positive``/``junk [B, P]``; ``mask`` an optional reused
    boolean scratch of ``B * G`` entries.
    Returns ``(ranks [B, P] int64 ascending, padded with G; num_positives [B])``; ties are broken by
    gallery index (stable-sort order).
    """
    b, g = dist.shape
    if bool(junk.any()):
        rows, cols = junk.nonzero(as_tuple=True)
        dist[rows, index[rows, cols]] = math.inf
    pos_d, pos_g, num_pos, valid, last = _sorted_positives(dist.gather(1, index), index, positive)
    # Survivors: entries no farther than the row's last positive (junk is +inf, never kept).
    mask = torch.empty(b * g, dtype=torch.bool, device=dist.device) if mask is None else mask[: b * g]
    mask = compare(dist, last[:, None], "le", out=mask.view(b, g))
    if count_nonzero(mask) > _DENSE_SURVIVORS * b * g:  # features close to random: most entries survive
        return _ranks_by_row_search(dist, pos_d, pos_g, valid), num_pos
    flat = flat_nonzero(mask).to(dist.device)
    rows = flat.div(g, rounding_mode="floor")
    values = dist.view(-1).index_select(0, flat)
    return _ranks_of_survivors(pos_d, pos_g, valid, rows, flat - rows * g, values, g), num_pos


def _ranks_of_survivors(
    pos_d: torch.Tensor, pos_g: torch.Tensor, valid: torch.Tensor,
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, num_gallery: int,
) -> torch.Tensor:
    """Ranks ``[B, P]`` (padded with ``num_gallery``) of the sorted positives ``pos_d``/``pos_g``
    (`_sorted_positives`) from the survivors of their rows: every valid entry no farther than its
    row's last positive, the positives included, at ``(rows, cols) [M]`` with distances ``values``
    (in any order)."""
    p = pos_d.shape[1]
    # place: the survivor's position in the flattened sorted positives, after every positive of its
    # row at the same or a smaller distance (padding is +inf, never <=); tied: it equals the one before.
    place, tied = _place_among_positives(pos_d, rows, values)
    tied = (tied & (place > rows * p)).nonzero().squeeze(1)
    if tied.numel():
        # Equal distances: the survivor comes after the positives with a smaller or equal gallery index.
        t_rows = rows[tied]
        later = (pos_d[t_rows] == values[tied, None]) & (pos_g[t_rows] > cols[tied, None]) & valid[t_rows]
        place[tied] -= later.sum(1)
    # rows * (p + 1) + slot, slot = place - rows * p: the survivor's bucket in its row
    hist = torch.bincount(place.add_(rows), minlength=pos_d.shape[0] * (p + 1)).view(-1, p + 1)
    return hist.cumsum(1)[:, :p].masked_fill_(~valid, num_gallery)  # #entries before positive k


def _place_among_positives(
    pos_d: torch.Tensor, rows: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For survivors ``values [M]`` of rows ``rows [M]`` (any order) and the rows' ascending positive
    distances ``pos_d [B, P]``: ``place [M]`` = ``rows * P`` + the number of the row's positives
    ``<=`` the value, and whether the positive just before that place equals the value (``[M]``
    bool; meaningless where no positive is ``<=``).

    float32: one ``searchsorted`` over integer (row, distance) keys; float64 distances do not fit
    such a key, so a branch-free binary search in each row's positives.
    """
    b, p = pos_d.shape
    flat_pos = pos_d.view(-1)
    if pos_d.dtype == torch.float32:
        row_of = torch.arange(b, device=pos_d.device).repeat_interleave(p)
        pos_keys = _distance_keys(flat_pos, row_of)
        keys = _distance_keys(values, rows)
        place = torch.searchsorted(pos_keys, keys, right=True)
        return place, pos_keys.index_select(0, (place - 1).clamp_(min=0)) == keys
    base = rows * p
    slot = torch.zeros_like(rows)
    step = 1 << (p.bit_length() - 1)
    while step:
        probe = (slot + step).clamp_(max=p)
        slot += (probe - slot) * (flat_pos.index_select(0, base + probe - 1) <= values)
        step >>= 1
    place = base.add_(slot)
    return place, flat_pos.index_select(0, (place - 1).clamp_(min=0)) == values


def _distance_keys(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (row, float32 value), equal exactly for equal values of a row."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 and +0.0 are one value
    return (rows << 32) + torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _ranks_by_row_search(dist: torch.Tensor, pos_d: torch.Tensor, pos_g: torch.Tensor, valid: torch.Tensor):
    """`_positive_ranks` for rows where most entries survive: every entry of ``dist [B, G]`` is placed
    among its row's sorted positive distances ``pos_d [B, P]`` (gallery indices ``pos_g``) by one
    batched ``searchsorted``; a ``bincount`` of the buckets gives the ranks ``[B, P]``.

    The positives are interleaved with their float successors in the boundaries, so entries *equal*
    to a positive fall in their own (odd) bucket; where that bucket holds more than the positive
    itself, those few entries are looked up and the ones with a smaller gallery index are added.
    """
    b, g = dist.shape
    p = pos_d.shape[1]
    device = dist.device
    slot = torch.arange(p, device=device)
    # first[k]: slot of the first positive with the same distance as positive k (k itself if unique).
    dup = torch.zeros_like(valid)
    dup[:, 1:] = (pos_d[:, 1:] == pos_d[:, :-1]) & valid[:, 1:]
    first = torch.where(dup, 0, slot[None, :]).cummax(1).values
    # Boundaries pos_k, next(pos_k) per distinct value (a repeated value gets an empty pair next,
    # next): with right-sided search, an entry below pos_k lands in a bucket <= 2*first[k] and an
    # entry equal to it in bucket 2*first[k]+1, the only odd buckets.
    upper = torch.nextafter(pos_d, torch.full_like(pos_d, math.inf))
    bounds = torch.stack((torch.where(dup, upper, pos_d), upper), dim=2).view(b, 2 * p)
    buckets = torch.searchsorted(bounds, dist, right=True, out_int32=True)
    width = 2 * p + 2  # even, so the row offsets keep each bucket's parity
    buckets.add_(torch.arange(0, b * width, width, device=device, dtype=torch.int32)[:, None])
    hist = torch.bincount(buckets.view(-1), minlength=b * width).view(b, width)
    below = hist.cumsum(1).gather(1, 2 * first)  # #valid entries < pos_k
    equal = hist.gather(1, 2 * first + 1)  # #valid entries == pos_k, the positive itself included
    ranks = below.masked_fill(~valid, g)
    tied = ((equal > 1) & valid).any(1)
    if bool(tied.any()):
        # Entries tied with pos_k come before it when their gallery index is smaller.
        rows = tied.nonzero().squeeze(1)
        sub = buckets if rows.numel() == b else buckets[rows]
        t, col = (sub & 1).nonzero(as_tuple=True)
        value_slot = (sub[t, col] - rows[t].to(torch.int32) * width - 1) // 2
        same = first[rows][t] == value_slot[:, None]  # [M, P]
        before = same & (col[:, None] < pos_g[rows][t]) & valid[rows][t]
        extra = torch.zeros(rows.numel(), p, dtype=ranks.dtype, device=device).index_add_(0, t, before.to(ranks.dtype))
        ranks[rows] = torch.sort(ranks[rows] + extra, dim=1).values
    return ranks


def _rank_chunk(
    acc: _MetricAccumulator, dist: torch.Tensor, index: _GalleryIndex, pids: torch.Tensor, camids: torch.Tensor,
    mask_buf: torch.Tensor, pool: Executor | None,
) -> None:
    """Add the ranks of a chunk of queries (``dist [B, G]``, their ``pids``/``camids [B]``) to
    ``acc``; with a helper thread (`helper_thread`) the two halves of the chunk are ranked at once."""
    b, g = dist.shape
    with serial_cpu_ops(dist.device):
        idx, positive, junk = index.lookup(pids, camids)
        halves = even_ranges(b, 2 if pool is not None and b > 1 else 1)
        for ranks in at_once(pool, _positive_ranks, *((dist[a:z], idx[a:z], positive[a:z], junk[a:z], mask_buf[a * g :])
                                                      for a, z in halves)):
            acc.add(*ranks)


class _DistanceChunk(Protocol):
    """Distances of a chunk of ``B`` queries to the gallery, one block of columns at a time.

    `block` gives the distances. For ranking, `raw` gives screening values ``v`` instead (the
    distances themselves, or values they are a non-decreasing function of, in ``|v|``):
    `screen` turns a distance bound into a bound on them, `untouched_finals` gives the distances of
    the screened entries and `exceptions` the entries that do not follow that function.
    """

    def block(self, j0: int, j1: int, rows: slice = slice(None), out: torch.Tensor | None = None) -> torch.Tensor:
        """Distances ``[R, j1 - j0]`` of the chunk rows ``rows`` to gallery items ``j0 .. j1 - 1`` (into
        ``out`` when given)."""

    def raw(self, j0: int, j1: int, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """Screening values ``[R, j1 - j0]`` of the chunk rows ``rows`` (``R`` of them)."""

    def screen(self, bound: torch.Tensor) -> torch.Tensor:
        """``[B]``: a non-exception entry has distance ``<= bound`` iff ``|v| <=`` this (``-inf``: none)."""

    def untouched_finals(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Distances of non-exception entries of chunk rows ``rows [M]`` from their values ``v [M]``."""

    def exceptions(
        self, j0: int, j1: int, v: torch.Tensor, rows: slice
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Rows (counted from ``rows.start``), columns and distances of the other entries of ``v``, the
        `raw` values of ``rows`` (they are set to ``+inf`` there), or None."""

    def finals(self, rows: torch.Tensor, cols: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Distances at the pairs ``(rows, cols) [M]`` from their values ``v [M]``."""

    def upper_bounds(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """float64 ``[M]``, never below the distances at the pairs ``(rows, cols) [M]``."""


class _FeatureChunk:
    """`pairwise_distance` of a chunk of query features ``q [B, D]`` to blocks of ``gallery [G, D]``
    (``g_sq [G]``: its squared norms); the distances are their own screening values."""

    def __init__(self, q: torch.Tensor, gallery: torch.Tensor, metric: str, g_sq: torch.Tensor):
        self.q, self.gallery, self.metric, self.g_sq = q, gallery, metric, g_sq
        self.q_sq = q.pow(2).sum(1)

    def block(self, j0: int, j1: int, rows: slice = slice(None), out: torch.Tensor | None = None) -> torch.Tensor:
        return self.raw(j0, j1, rows, out)

    def raw(self, j0: int, j1: int, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        g_sq = self.g_sq[j0:j1] if self.metric == "euclidean" else None
        return pairwise_distance(self.q[rows], self.gallery[j0:j1], self.metric, prepared=True, y_sq_norms=g_sq,
                                 out=out)

    def screen(self, bound: torch.Tensor) -> torch.Tensor:
        return bound

    def untouched_finals(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v

    def exceptions(self, j0: int, j1: int, v: torch.Tensor, rows: slice) -> None:
        return None

    def finals(self, rows: torch.Tensor, cols: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v

    def upper_bounds(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return pair_distance_bounds(self.q, self.gallery, rows, cols, self.metric, self.q_sq, self.g_sq)[1]


def _gallery_blocks(num_gallery: int) -> list[tuple[int, int]]:
    """Column ranges ``(j0, j1)`` of about ``_GALLERY_BLOCK`` items, of equal width to within one."""
    return even_ranges(num_gallery, -(-num_gallery // _GALLERY_BLOCK))


def _fold_lane(
    chunk: _DistanceChunk, lane: slice, index: torch.Tensor, positive: torch.Tensor, junk: torch.Tensor,
    blocks: list[tuple[int, int]], bound: torch.Tensor, threshold: torch.Tensor, buf: torch.Tensor,
    mask: torch.Tensor, budget: int, stop: threading.Event,
) -> tuple[torch.Tensor, list] | None:
    """The chunk rows ``lane`` block by block: their positives' screening values ``[R, P]`` and
    survivors, a list of ``(rows, cols, distances)`` (rows counted from ``lane.start``): the
    exceptions no farther than ``bound``, and the other entries whose value is within ``threshold``
    (junk set to ``+inf``). ``None`` once the survivors pass ``budget`` or ``_DENSE_SURVIVORS`` of
    the entries seen, or another lane has stopped (``stop``). ``buf``/``mask``: scratch of at least
    ``R`` rows of a block."""
    index, positive, junk = index[lane], positive[lane], junk[lane]
    b, p = index.shape
    bound, threshold = bound[lane], threshold[lane, None]
    pos_raw = torch.zeros((b, p), dtype=buf.dtype, device=index.device)
    parts: list[tuple] = []
    kept, seen = 0, 0
    for j0, j1 in blocks:
        if stop.is_set():
            return None
        n = j1 - j0
        block = chunk.raw(j0, j1, lane, out=buf[: b * n].view(b, n))
        inside = (index >= j0) & (index < j1)
        local = (index - j0).clamp_(0, n - 1)
        pos_raw = torch.where(inside & positive, block.gather(1, local), pos_raw)
        hit = inside & junk
        if bool(hit.any()):
            r, c = hit.nonzero(as_tuple=True)
            block[r, local[r, c]] = math.inf
        others = chunk.exceptions(j0, j1, block, lane)
        if others is not None:
            rows, cols, values = others
            keep = (values <= bound[rows]).nonzero().squeeze(1)
            parts.append((rows[keep], cols[keep], values[keep]))
            kept += keep.numel()
        flat = flat_nonzero(compare(block, threshold, "le", out=mask[: b * n].view(b, n))).to(block.device)
        rows = flat.div(n, rounding_mode="floor")
        values = chunk.untouched_finals(rows + (lane.start or 0), block.view(-1).index_select(0, flat))
        parts.append((rows, flat.sub_(rows * n).add_(j0), values))
        kept += flat.numel()
        seen += b * n
        if kept > _DENSE_SURVIVORS * seen or kept > budget:
            stop.set()
            return None
    return pos_raw, parts


def _rank_lane(
    parts: list, pos_d: torch.Tensor, pos_g: torch.Tensor, valid: torch.Tensor, last: torch.Tensor, num_gallery: int
) -> torch.Tensor:
    """`_ranks_of_survivors` of rows whose survivors (`_fold_lane`, no larger than a bound at least
    ``last``) are ``parts``: those no farther than the last positive."""
    rows, cols, values = (torch.cat(part) for part in zip(*parts))
    keep = values <= last[rows]
    return _ranks_of_survivors(pos_d, pos_g, valid, rows[keep], cols[keep], values[keep], num_gallery)


def _rank_by_blocks(
    chunk: _DistanceChunk, index: torch.Tensor, positive: torch.Tensor, junk: torch.Tensor,
    blocks: list[tuple[int, int]], buf: torch.Tensor, mask_buf: torch.Tensor, pool: Executor | None, lanes: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`_positive_ranks` of a chunk of queries computed one gallery block at a time, never holding its
    whole rows; ``None`` where that does not pay (most entries survive) or the bounds fail.

    Before the products, each row gets an upper bound on its positives' distances
    (``chunk.upper_bounds``), turned into a bound on the screening values (``chunk.screen``); each
    block keeps the entries within it (`_fold_lane`) and its positives' exact values. At the end,
    the survivors no farther than the last positive are ranked by `_ranks_of_survivors`. That is
    exact when every row's last positive is within its bound - which is checked: otherwise
    ``None``. ``buf``/``mask_buf``: scratch for one block of the chunk's distances and its comparison.
    On the CPU the chunk's rows are split into ``lanes`` that run at once on ``pool``, each with its
    own one-thread products: no thread waits for another between a product and its comparison.
    """
    b, p = index.shape
    device = index.device
    lanes = max(1, min(lanes, b // _LANE_ROWS))
    width = buf.numel() // max(b, 1) if lanes > 1 else 0
    rows_of = [slice(a, z) for a, z in even_ranges(b, lanes)]

    # with lanes, every lane's products and folds on one intra-op thread; one lane keeps them all
    with serial_cpu_ops(device) if lanes > 1 else nullcontext():
        rows_p, slots_p = positive.nonzero(as_tuple=True)
        cols_p = index[rows_p, slots_p]
        cuts = torch.searchsorted(rows_p, torch.tensor([s.start for s in rows_of[1:]], dtype=torch.int64,
                                                       device=device)).tolist()
        pairs = [slice(a, z) for a, z in zip([0, *cuts], [*cuts, rows_p.numel()])]
        upper = torch.cat(at_once(pool, chunk.upper_bounds, *((rows_p[s], cols_p[s]) for s in pairs)))
        bound = torch.full((b,), -math.inf, dtype=torch.float64, device=device)
        bound = round_up(bound.scatter_reduce_(0, rows_p, upper, "amax"), buf.dtype)
        threshold = chunk.screen(bound)
        stop = threading.Event()
        budget = _MAX_SURVIVORS // len(rows_of)
        folded = at_once(pool, _fold_lane, *((chunk, s, index, positive, junk, blocks, bound, threshold,
                                        buf[s.start * width :], mask_buf[s.start * width :], budget, stop)
                                       for s in rows_of))
        if any(lane is None for lane in folded):
            return None
        pos_raw = torch.cat([lane[0] for lane in folded])
        pos_dist = torch.zeros_like(pos_raw)
        pos_dist[rows_p, slots_p] = chunk.finals(rows_p, cols_p, pos_raw[rows_p, slots_p])
        pos_d, pos_g, num_pos, valid, last = _sorted_positives(pos_dist, index, positive)
        if not bool((last <= bound).all()):  # a product less accurate than its bound (e.g. TF32)
            logger.debug("a distance bound failed for a chunk of queries: ranking it by whole rows")
            return None
        ranks = at_once(pool, _rank_lane, *((lane[1], pos_d[s], pos_g[s], valid[s], last[s], blocks[-1][1])
                                      for s, lane in zip(rows_of, folded)))
    return torch.cat(ranks), num_pos


def _rank_queries(
    acc: _MetricAccumulator, distances: Callable[[torch.Tensor], _DistanceChunk], queries: torch.Tensor,
    index: _GalleryIndex, pids: torch.Tensor, camids: torch.Tensor, num_gallery: int, chunk_size: int | None,
    dtype: torch.dtype,
) -> None:
    """Add the ranks of ``queries`` (indices ``[Q']``) to ``acc``, ``chunk_size`` at a time (default:
    ``_QUERY_CHUNK``, more with more than two CPU threads), from the distance chunks
    ``distances(rows)``: by gallery blocks (`_rank_by_blocks`), or by whole rows in
    ~``_CHUNK_BYTES`` of scratch where that returns ``None``."""
    device = queries.device
    lanes = torch.get_num_threads() if device.type == "cpu" else 1
    blocks = _gallery_blocks(num_gallery)
    chunk_size = min(chunk_size or _QUERY_CHUNK * max(1, lanes // 2), queries.numel())
    width = max(j1 - j0 for j0, j1 in blocks)
    buf = torch.empty(chunk_size * width, dtype=dtype, device=device)
    mask_buf = torch.empty(chunk_size * width, dtype=torch.bool, device=device)
    row_buf = row_mask = None
    with helper_thread(device, workers=lanes - 1) as pool:
        for rows in queries.tensor_split(-(-queries.numel() // chunk_size)):
            chunk = distances(rows)
            idx, positive, junk = index.lookup(pids[rows], camids[rows])
            result = _rank_by_blocks(chunk, idx, positive, junk, blocks, buf, mask_buf, pool, lanes)
            if result is not None:
                acc.add(*result)
                continue
            step = min(_auto_chunk(num_gallery, torch.finfo(dtype).bits // 8), rows.numel())
            if row_buf is None:
                row_buf = torch.empty(step * num_gallery, dtype=dtype, device=device)
                row_mask = torch.empty(step * num_gallery, dtype=torch.bool, device=device)
            for a in range(0, rows.numel(), step):
                sub = slice(a, a + step)
                out = row_buf[: rows[sub].numel() * num_gallery].view(-1, num_gallery)
                dist = chunk.block(0, num_gallery, sub, out=out)
                _rank_chunk(acc, dist, index, pids[rows[sub]], camids[rows[sub]], row_mask, pool)


class _MetricAccumulator:
    """Sums of AP, INP and first-match histograms over query chunks."""

    def __init__(self, max_rank: int, device: torch.device):
        self.max_rank = max_rank
        self.ap = torch.zeros((), dtype=torch.float64, device=device)
        self.inp = torch.zeros((), dtype=torch.float64, device=device)
        self.first_hist = torch.zeros(max_rank + 1, dtype=torch.int64, device=device)
        self.top = torch.zeros(3, dtype=torch.int64, device=device)  # first match < 1, 5, 10
        self.count = 0

    def add(self, ranks: torch.Tensor, num_pos: torch.Tensor) -> None:
        p = ranks.shape[1]
        valid = torch.arange(p, device=ranks.device)[None, :] < num_pos[:, None]
        hits = torch.arange(1, p + 1, device=ranks.device, dtype=torch.float64)[None, :]
        precision = (hits / (ranks.to(torch.float64) + 1.0)).masked_fill_(~valid, 0.0)
        n = num_pos.to(torch.float64)
        self.ap += (precision.sum(1) / n).sum()
        last = ranks.gather(1, (num_pos - 1)[:, None]).squeeze(1)
        self.inp += (n / (last.to(torch.float64) + 1.0)).sum()
        first = ranks[:, 0]
        self.first_hist += torch.bincount(first.clamp(max=self.max_rank), minlength=self.max_rank + 1)
        self.top += (first[:, None] < torch.tensor([1, 5, 10], device=ranks.device)).sum(0)
        self.count += ranks.shape[0]

    def result(self, num_queries: int) -> dict:
        n = self.count
        cmc = (torch.cumsum(self.first_hist[: self.max_rank], 0).to(torch.float64) / n).tolist()
        top = (self.top.to(torch.float64) / n).tolist()
        return {
            "mAP": float(self.ap) / n,
            "mINP": float(self.inp) / n,
            "rank1": top[0],
            "rank5": top[1],
            "rank10": top[2],
            "cmc": cmc,
            "num_valid_queries": n,
            "num_skipped_queries": num_queries - n,
        }


def _select_valid_queries(index: _GalleryIndex, num_queries: int) -> torch.Tensor:
    valid = index.num_positives > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "no valid query: no query has a gallery image with its pid in another camera "
            "(check q_pids/g_pids and q_camids/g_camids)"
        )
    if num_valid < num_queries:
        logger.info("%d of %d queries have no match in another camera and are skipped",
                    num_queries - num_valid, num_queries)
    return valid.nonzero().squeeze(1)


def _auto_chunk(num_gallery: int, dist_bytes: int) -> int:
    return max(1, _CHUNK_BYTES // (num_gallery * (dist_bytes + 1)))


def _check_ids_all(q_pids, g_pids, q_camids, g_camids, num_q: int, num_g: int, q_name: str, g_name: str, device):
    q_pids_t = check_ids(q_pids, "q_pids", num_q, q_name, device)
    g_pids_t = check_ids(g_pids, "g_pids", num_g, g_name, device)
    q_cam_t = check_ids(q_camids, "q_camids", num_q, q_name, device)
    g_cam_t = check_ids(g_camids, "g_camids", num_g, g_name, device)
    return q_pids_t, g_pids_t, q_cam_t, g_cam_t


# ------------------------------------------------------------------------------------------- public API
def evaluate_rank(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
) -> dict:
    """Market-1501-protocol metrics from a query×gallery distance matrix (smaller = more similar).

    ``distmat [Q, G]`` (numpy or tensor, finite), ids ``q_pids/q_camids [Q]``, ``g_pids/g_camids [G]``.
    Returns ``mAP``, ``mINP``, ``rank1``, ``rank5``, ``rank10`` (fractions in [0, 1]), ``cmc`` (list of
    ``max_rank`` fractions; CMC@K for K = 1..max_rank), ``num_valid_queries`` and
    ``num_skipped_queries`` (queries without a match in another camera). Ties: stable order.
    """
    max_rank = _check_max_rank(max_rank)
    d = _as_tensor(distmat, "distmat")
    if d.ndim != 2:
        raise ValueError(f"distmat must be a 2-D array [num_query, num_gallery], got shape {tuple(d.shape)}")
    if d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError(f"distmat is empty (shape {tuple(d.shape)}); expected at least one query and one gallery item")
    if d.dtype != torch.float64:
        d = d.to(torch.float32)
    if not bool(torch.isfinite(d).all()):
        raise ValueError("distmat contains NaN or infinite values; expected finite distances")
    num_q, num_g = d.shape
    ids = _check_ids_all(q_pids, g_pids, q_camids, g_camids, num_q, num_g,
                         "distmat.shape[0]", "distmat.shape[1]", d.device)
    q_pids_t, g_pids_t, q_cam_t, g_cam_t = ids
    index = _GalleryIndex(q_pids_t, g_pids_t, q_cam_t, g_cam_t)
    queries = _select_valid_queries(index, num_q)
    chunk = min(_auto_chunk(num_g, d.element_size()), queries.numel())
    dist_buf = torch.empty(chunk * num_g, dtype=d.dtype, device=d.device)
    mask_buf = torch.empty(chunk * num_g, dtype=torch.bool, device=d.device)
    acc = _MetricAccumulator(max_rank, d.device)
    with helper_thread(d.device) as pool:
        for rows in queries.split(chunk):
            dist = dist_buf[: rows.numel() * num_g].view(rows.numel(), num_g)
            torch.index_select(d, 0, rows, out=dist)
            _rank_chunk(acc, dist, index, q_pids_t[rows], q_cam_t[rows], mask_buf, pool)
    return acc.result(num_q)


def compute_reid_metrics(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    *,
    metric: DistanceMetric = "cosine",
    rerank: bool = False,
    max_rank: int = 50,
    chunk_size: int | None = None,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> dict:
    """Market-1501-protocol metrics from features, never holding the query×gallery matrix.

    ``query_features [Q, D]``, ``gallery_features [G, D]`` (numpy or tensors; computed on the query
    features' device, so on the GPU when they are there); ids as in `evaluate_rank`. ``metric``:
    ``"cosine"`` (rows L2-normalised, distance ``1 - cos``) or ``"euclidean"``. With ``rerank`` the
    distances are k-reciprocal re-ranked (`rerank_from_features`, parameters ``k1, k2,
    lambda_value``). Queries are processed ``chunk_size`` at a time (default 2,048; more with more
    than two CPU threads), against blocks of about 4,096 gallery items.

    Returns the same dict as `evaluate_rank` on the dense distance matrix
    ``pairwise_distance(query_features, gallery_features, metric)`` (or its re-ranked version), up to
    the product's last-place rounding, which a kernel may do differently for small tiles (module
    docstring: only ties between duplicate features can notice).
    """
    metric = check_metric(metric)
    max_rank = _check_max_rank(max_rank)
    chunk_size = _check_chunk_size(chunk_size)
    qf, gf = check_feature_pair(query_features, gallery_features)
    dtype = torch.float64 if torch.float64 in (qf.dtype, gf.dtype) else torch.float32
    qf = qf.to(dtype)
    gf = gf.to(device=qf.device, dtype=dtype)
    num_q, num_g = qf.shape[0], gf.shape[0]
    ids = _check_ids_all(q_pids, g_pids, q_camids, g_camids, num_q, num_g,
                         "query_features", "gallery_features", qf.device)
    q_pids_t, g_pids_t, q_cam_t, g_cam_t = ids
    index = _GalleryIndex(q_pids_t, g_pids_t, q_cam_t, g_cam_t)
    queries = _select_valid_queries(index, num_q)

    qf = prepare_features(qf, metric)
    gf = prepare_features(gf, metric)
    reranker = None
    if rerank:
        reranker = rerank_from_features(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric,
                                        prepared=True)
    if reranker is None:
        g_sq = gf.pow(2).sum(1)

        def distances(rows: torch.Tensor) -> _DistanceChunk:
            return _FeatureChunk(qf[rows], gf, metric, g_sq)
    else:
        distances = reranker._chunk

    acc = _MetricAccumulator(max_rank, qf.device)
    _rank_queries(acc, distances, queries, index, q_pids_t, q_cam_t, num_g, chunk_size,
                  torch.float32 if rerank else dtype)
    return acc.result(num_q)


__all__ = ["DistanceMetric", "compute_reid_metrics", "evaluate_rank", "pairwise_distance", "prepare_features"]
