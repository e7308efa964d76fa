"""Input checks and pairwise distances shared by the ranking metrics and re-ranking.

One home for the validated forms of features, ids and the distance metric, and for the one
``addmm``-based distance every evaluation path computes, so that dense, chunked and re-ranked
results agree - to the bit wherever the matrix-product kernel rounds a tile as it rounds the whole
product (it did for every tile of a thousand rows or more tried on the CPU; small tiles, a few rows
wide, may differ in the last place).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

DistanceMetric = Literal["cosine", "euclidean"]
_METRICS = ("cosine", "euclidean")

ArrayLike = Any  # numpy array, torch tensor or a sequence of numbers


# ----------------------------------------------------------------------------------------- input checks
def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # re-raised with the argument's name
        raise ValueError(f"{name} must be a numpy array, a torch tensor or a sequence of numbers") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def check_features(x: ArrayLike, name: str) -> torch.Tensor:
    """Validate features ``[N, D]``: 2-D, non-empty, finite real numbers. Returns a float tensor.

    float64 stays float64; every other dtype becomes float32 (half-precision products lose ranks).
    """
    t = _as_tensor(x, name)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [num_images, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one row [num_images >= 1, dim]")
    if t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature column, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    # A non-finite entry makes the sum non-finite; only then (or on overflow) look at every entry.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values; expected finite features")
    return t


def check_feature_pair(query_features: ArrayLike, gallery_features: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``query_features [Q, D]`` and ``gallery_features [G, D]`` (same ``D``) as tensors."""
    qf = check_features(query_features, "query_features")
    gf = check_features(gallery_features, "gallery_features")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"query_features and gallery_features must have the same dimension, got {qf.shape[1]} and {gf.shape[1]}"
        )
    return qf, gf


def check_ids(x: ArrayLike, name: str, length: int, length_of: str, device: torch.device) -> torch.Tensor:
    """Validate a 1-D vector of integer ids with ``length`` entries; returns int64 on ``device``."""
    t = _as_tensor(x, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer ids, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ValueError(f"{name} must hold integer ids, got non-integer values (dtype {t.dtype})")
    elif t.is_complex():
        raise ValueError(f"{name} must hold integer ids, got dtype {t.dtype}")
    if t.shape[0] != length:
        raise ValueError(f"{name} has {t.shape[0]} entries but {length_of} has {length}; they must match")
    return t.to(device=device, dtype=torch.int64)


def check_metric(metric: str) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    return metric


# -------------------------------------------------------------------------------------------- distances
def prepare_features(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Features ready for `pairwise_distance(..., prepared=True)`: L2-normalised rows for cosine."""
    return F.normalize(x, dim=1) if metric == "cosine" else x


def pairwise_distance(
    x: ArrayLike,
    y: ArrayLike,
    metric: DistanceMetric = "cosine",
    *,
    prepared: bool = False,
    y_sq_norms: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distances ``[M, N]`` between the rows of ``x [M, D]`` and ``y [N, D]``.

    ``"cosine"``: ``1 - cos`` (rows are L2-normalised first unless ``prepared``); ``"euclidean"``:
    the Euclidean distance ``‖x - y‖₂`` (not squared). Computed with one ``addmm`` on the inputs'
    device; ``out`` (``[M, N]``, contiguous) avoids an allocation. ``y_sq_norms [N]`` may be passed
    to skip recomputing ``‖y‖²`` for Euclidean distances.
    """
    metric = check_metric(metric)
    if not prepared:
        x = prepare_features(check_features(x, "x"), metric)
        y = prepare_features(check_features(y, "y"), metric).to(device=x.device, dtype=x.dtype)
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"x and y must have the same feature dimension, got {x.shape[1]} and {y.shape[1]}")
    if metric == "cosine":
        return torch.addmm(x.new_ones(()), x, y.T, beta=1.0, alpha=-1.0, out=out)
    if y_sq_norms is None:
        y_sq_norms = y.pow(2).sum(1)
    d = torch.addmm(y_sq_norms[None, :], x, y.T, beta=1.0, alpha=-2.0, out=out)
    return d.add_(x.pow(2).sum(1)[:, None]).clamp_(min=0.0).sqrt_()


# Feature pairs per piece when bounding pair distances (gathered rows: a few MB).
_BOUND_PAIRS = 1 << 13


def pair_distance_bounds(
    x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, metric: str,
    x_sq_norms: torch.Tensor, y_sq_norms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds ``(low, high)`` ``[M]`` (float64) on what `pairwise_distance` returns for the pairs of rows
    ``x[rows[m]]``, ``y[cols[m]]`` (prepared features ``x [A, D]``, ``y [B, D]``; ``rows``, ``cols``
    int64 ``[M]``), whatever the summation order of its product. ``x_sq_norms [A]``, ``y_sq_norms
    [B]``: the rows' squared norms (any float dtype).

    A length-``D`` float sum is within ``(D + 2)·eps/2·Σ|xᵢyᵢ| <= (D + 2)·eps/2·‖x‖‖y‖`` of the exact
    value in any order (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), both for
    the product's kernel and for the elementwise sum here; the margin is twice both together.
    """
    m = rows.numel()
    eps = torch.finfo(x.dtype).eps
    gamma = 2.0 * (x.shape[1] + 4) * eps
    low = torch.empty(m, dtype=torch.float64, device=x.device)
    high = torch.empty(m, dtype=torch.float64, device=x.device)
    for lo in range(0, m, _BOUND_PAIRS):
        r, c = rows[lo : lo + _BOUND_PAIRS], cols[lo : lo + _BOUND_PAIRS]
        dot = torch.linalg.vecdot(x.index_select(0, r), y.index_select(0, c)).double()
        a_sq, b_sq = x_sq_norms.index_select(0, r).double(), y_sq_norms.index_select(0, c).double()
        part = slice(lo, lo + r.numel())
        if metric == "cosine":
            d = 1.0 - dot
            err = gamma * (1.0 + (a_sq * b_sq).sqrt())
            low[part], high[part] = d - err, d + err
        else:  # sqrt(‖x‖² + ‖y‖² - 2 x·y): the error of the squared distance, then the square root's
            d_sq = a_sq + b_sq - 2.0 * dot
            err = gamma * (a_sq.sqrt() + b_sq.sqrt()).square()
            low[part] = (d_sq - err).clamp_(min=0.0).sqrt_() * (1.0 - 2.0 * eps)
            high[part] = (d_sq + err).clamp_(min=0.0).sqrt_() * (1.0 + 2.0 * eps) + eps
    return low, high


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float64) in ``dtype``, rounded towards ``+inf``: never below ``x``."""
    y = x.to(dtype)
    if dtype == torch.float64:
        return y
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


@contextmanager
def cpu_threads(device: torch.device, count: int) -> Iterator[None]:
    """Run the enclosed torch CPU operations on ``count`` intra-op threads, then restore the thread
    count (also after an error). No effect off the CPU. Enter it from the main thread only, around
    work that other threads (`helper_thread`, whose workers start with the same count) share."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def serial_cpu_ops(device: torch.device) -> AbstractContextManager[None]:
    """Run the enclosed torch CPU operations on one intra-op thread (`cpu_threads`).

    For the many small operations after each product (thresholds, candidate merges, ranks): split
    over threads they spend more time synchronising than computing, and far more when other
    processes share the cores; the products themselves keep every thread, or run one per thread
    side by side.
    """
    return cpu_threads(device, 1)


@contextmanager
def helper_thread(
    device: torch.device, workers: int = 1, threads_each: int = 1
) -> Iterator[ThreadPoolExecutor | None]:
    """A thread pool of ``workers`` threads where work on ``device`` can run beside the main thread (the
    CPU with more than one torch thread), else ``None``. Work split between the threads must touch
    disjoint data, and the main thread runs inside `cpu_threads` with ``threads_each`` (one:
    `serial_cpu_ops`) so that the threads do not also split each operation; each worker starts with
    that count too (OpenMP keeps one per thread)."""
    if device.type != "cpu" or torch.get_num_threads() == 1 or workers < 1:
        yield None
        return
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(threads_each,)) as pool:
        yield pool


def at_once(pool: Executor | None, work: Callable[..., Any], *args_per_task: tuple) -> list:
    """``[work(*args) for args in args_per_task]``, the first task on the calling thread and the others
    on ``pool`` (`helper_thread`) at the same time; all in turn where ``pool`` is None."""
    later = [pool.submit(work, *args) for args in args_per_task[1:]] if pool is not None else []
    first = [work(*args_per_task[0])] if args_per_task else []
    rest = [f.result() for f in later] if pool is not None else [work(*args) for args in args_per_task[1:]]
    return first + rest


def even_ranges(total: int, count: int) -> list[tuple[int, int]]:
    """``count`` consecutive ranges ``(start, stop)`` covering ``0 .. total``, equal to within one."""
    edges = [round(i * total / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


_NUMPY_COMPARISONS = {"le": np.less_equal, "ge": np.greater_equal}


def compare(x: torch.Tensor, bound: torch.Tensor, op: Literal["le", "ge"], out: torch.Tensor) -> torch.Tensor:
    """``x <= bound`` (``op="le"``) or ``x >= bound`` (``"ge"``) written into the boolean ``out``
    (``x``'s shape; ``bound`` broadcasts to it, same dtype as ``x``). Returns ``out``.

    On the CPU numpy's vectorised loop does it about three times faster than torch's comparison into
    a boolean tensor, which matters on the passes over every distance; elsewhere torch.
    """
    if x.device.type == "cpu":
        _NUMPY_COMPARISONS[op](x.numpy(), bound.numpy(), out=out.numpy())
        return out
    return getattr(torch, op)(x, bound, out=out)


def column_min(x: torch.Tensor) -> torch.Tensor:
    """Minimum of each column of a contiguous ``x [R, C]`` (``[C]``). On the CPU numpy's reduction over
    rows is about twice as fast as torch's ``amin(0)``; elsewhere torch."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.min(x.numpy(), axis=0))
    return x.amin(0)


def count_nonzero(mask: torch.Tensor) -> int:
    """Number of true entries of a contiguous boolean ``mask`` (numpy's popcount on the CPU)."""
    if mask.device.type == "cpu":
        return int(np.count_nonzero(mask.numpy()))
    return int(mask.count_nonzero())


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (int64) of the true entries of a contiguous boolean ``mask``, ascending.

    On the CPU numpy's vectorised scan does it several times faster than ``torch.nonzero`` on the
    sparse masks the ranking and neighbour passes produce; elsewhere ``torch.nonzero``.
    """
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.view(-1).nonzero().squeeze(1)


__all__ = [
    "ArrayLike",
    "DistanceMetric",
    "at_once",
    "check_feature_pair",
    "check_features",
    "check_ids",
    "check_metric",
    "column_min",
    "compare",
    "count_nonzero",
    "cpu_threads",
    "even_ranges",
    "flat_nonzero",
    "helper_thread",
    "pair_distance_bounds",
    "pairwise_distance",
    "prepare_features",
    "round_up",
    "serial_cpu_ops",
]
