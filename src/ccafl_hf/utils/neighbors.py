"""Exact nearest-neighbour search with faiss (GPU when faiss-gpu and a GPU are present).

One home for the neighbour search used by re-ranking, cross-camera association and
gallery retrieval, so every caller gets the same exact results and the same device logic.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch

#: How to install faiss: one of two extras, each providing the one `faiss` module.
FAISS_INSTALL = 'pip install "ccafl-hf[cpu]" (or "ccafl-hf[gpu]" for faiss with CUDA, on Linux x86-64)'

try:
    import faiss
except ImportError:  # the base install leaves the choice of build to the `cpu` / `gpu` extra
    raise ImportError(f"ccafl-hf needs faiss, which is not installed: {FAISS_INSTALL}") from None

logger = logging.getLogger(__name__)

Metric = Literal["ip", "l2"]


def as_float32_numpy(x: np.ndarray | torch.Tensor, name: str = "features") -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 numpy array ``[N, D]`` (faiss's input form)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {tuple(x.shape)}")
    return x


def faiss_build() -> str:
    """``"gpu"`` when the installed faiss has CUDA support (faiss-gpu), else ``"cpu"``."""
    return "gpu" if hasattr(faiss, "StandardGpuResources") else "cpu"


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    return faiss_build() == "gpu" and faiss.get_num_gpus() > 0


def resolve_faiss_gpu(use_gpu: bool | None) -> bool:
    """Whether faiss runs on the GPU: ``use_gpu``, or when it is ``None``, whether faiss-gpu sees a GPU.

    Raises:
        RuntimeError: ``use_gpu=True`` where faiss has no GPU support or sees no GPU.
    """
    if use_gpu is None:
        return faiss_gpu_available()
    if use_gpu and not faiss_gpu_available():
        raise RuntimeError(f"use_gpu=True but faiss ({faiss_build()} build) sees no GPU here; faiss-gpu: "
                           'pip install "ccafl-hf[gpu]" in place of "ccafl-hf[cpu]"')
    return bool(use_gpu)


def to_faiss_device(index, use_gpu: bool | None = None):
    """Move a faiss CPU ``index`` to the GPU when `resolve_faiss_gpu` says so."""
    if not resolve_faiss_gpu(use_gpu):
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def build_flat_index(database: np.ndarray | torch.Tensor, metric: Metric = "ip", use_gpu: bool | None = None):
    """Exact (flat) faiss index over ``database [N, D]``; inner product or squared L2.

    ``use_gpu=None`` uses a GPU when faiss-gpu sees one.
    """
    xb = as_float32_numpy(database, "database")
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    index = faiss.IndexFlatIP(xb.shape[1]) if metric == "ip" else faiss.IndexFlatL2(xb.shape[1])
    index = to_faiss_device(index, use_gpu)
    index.add(xb)
    return index


def exact_knn(
    queries: np.ndarray | torch.Tensor,
    database: np.ndarray | torch.Tensor,
    k: int,
    metric: Metric = "ip",
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of ``queries [Q, D]`` in ``database [N, D]``.

    Returns ``(scores [Q, k], indices [Q, k])`` sorted best first: inner products
    (descending) for ``metric="ip"``, squared Euclidean distances (ascending) for ``"l2"``.
    ``k`` is clipped to ``N``.
    """
    xq = as_float32_numpy(queries, "queries")
    index = build_flat_index(database, metric, use_gpu)
    k = min(int(k), index.ntotal)
    if k <= 0:
        return np.zeros((xq.shape[0], 0), np.float32), np.zeros((xq.shape[0], 0), np.int64)
    return index.search(xq, k)
