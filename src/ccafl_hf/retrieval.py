"""Using a trained model: embed images, index a gallery with faiss, search it.

The pieces, each usable alone::

    model, image_processor = load_reid_model("outputs/ccafl-demo")
    gallery = embed_folder(model, "gallery_images/", image_processor)      # FeatureSet [N, D] + paths
    gallery.save("gallery.safetensors")
    index = build_index(gallery.features)                                  # exact inner product
    save_index(index, "gallery.faiss")
    queries = embed_folder(model, "query_images/", image_processor)
    results = search_gallery(index, gallery, queries, k=10)                # paths + scores per query

Retrieval features are L2-normalised, so inner product = cosine similarity. A features file is a
safetensors file with the tensors ``features`` ``[N, D]`` (float32) and, when known, ``camids`` /
``pids`` ``[N]`` (int64); its string metadata holds the image paths (JSON list, relative to
``root``), ``root`` and the settings the features were made with.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import ReIDCollator, build_eval_transform
from .data.datasets.base import IMAGE_EXTENSIONS
from .inference import extract_features
from .modeling_ccafl import CCAFLModel
from .neighbors import as_float32_numpy, build_flat_index, exact_knn, faiss, to_faiss_device
from .processing import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "ccafl-features"
FEATURES_FORMAT_VERSION = "1"
IndexKind = Literal["flat", "ivf"]


class RetrievalError(ValueError):
    """Retrieval inputs that cannot be used as asked (missing or malformed file, mismatched sizes).

    The message names the file or argument and the expected form.
    """


# ------------------------------------------------------------------------------------------ model
def load_reid_model(
    name_or_path: str | os.PathLike, device: torch.device | str | None = None, trust_remote_code: bool = False
) -> tuple[CCAFLModel, Any]:
    """Load a saved CCAFL model (folder or Hub id) in eval mode, and its image processor.

    Returns ``(model, image_processor)``; ``image_processor`` is ``None`` when the checkpoint has
    none (preprocessing then uses CLIP's mean/std, see `eval_transform_for`).

    Raises:
        RetrievalError: not a local folder and not loadable from the Hub cache, or not a CCAFL model.
    """
    from transformers import AutoImageProcessor, AutoModel

    from .hub_utils import hub_local_files_only, hub_offline

    name = os.fspath(name_or_path)
    local = Path(name)
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise RetrievalError(f"--model {name}: no such model folder")
    if local.is_dir() and not (local / "config.json").is_file():
        raise RetrievalError(f"--model {name}: the folder has no config.json; expected a saved CCAFL model folder")
    try:
        model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code,
                                          local_files_only=hub_local_files_only(name))
    except (OSError, ValueError) as error:
        where = "is not a local folder and is not in the local Hub cache" + (
            " (HF_HUB_OFFLINE is set, so nothing is downloaded)" if hub_offline() else ""
        )
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RetrievalError(
            f"--model {name}: could not load a CCAFL model: {name!r} {where}, or it is not a model folder "
            f"({reason}). Pass a folder written by scripts/train.py, e.g. outputs/ccafl-demo."
        ) from None
    if not isinstance(model, CCAFLModel):
        raise RetrievalError(
            f"--model {name}: {type(model).__name__} is not a CCAFL model (config model_type "
            f"{getattr(model.config, 'model_type', '?')!r}, expected 'ccafl'); convert CLIP weights with "
            "CCAFLModel.from_clip or train one with scripts/train.py"
        )
    try:
        image_processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        logger.warning("%s has no image processor; using CLIP's mean/std at the model's input size", name)
        image_processor = None
    if device is not None:
        model.to(device)
    return model.eval(), image_processor


def eval_transform_for(model: CCAFLModel, image_processor: Any = None):
    """Test-time transform (PIL image → ``[3, H, W]``) at the model's ``image_size`` with the image
    processor's mean/std (a `CLIPProcessor` or its image processor; ``None``: CLIP's mean/std)."""
    processor = getattr(image_processor, "image_processor", image_processor)
    mean = getattr(processor, "image_mean", None) or CLIP_MEAN
    std = getattr(processor, "image_std", None) or CLIP_STD
    height, width = model.config.image_size
    size = getattr(processor, "size", None)
    if isinstance(size, Mapping) and "height" in size and (size["height"], size["width"]) != (height, width):
        logger.warning("image processor size %sx%s differs from the model's %sx%s; using the model's",
                       size["height"], size["width"], height, width)
    return build_eval_transform(height, width, list(mean), list(std))


# ------------------------------------------------------------------------------------- feature sets
@dataclass
class FeatureSet:
    """Retrieval features of a set of images, with where they came from.

    Attributes:
        features: ``[N, D]`` float32, L2-normalised retrieval features (CPU).
        paths: ``N`` image paths relative to ``root`` (or absolute when ``root`` is ``None``).
        root: folder the paths are relative to.
        camids: ``[N]`` int64 camera indices, if known.
        pids: ``[N]`` int64 identities, if known.
        metadata: string settings (model, flip, mixed precision, …).
    """

    features: torch.Tensor
    paths: list[str]
    root: str | None = None
    camids: torch.Tensor | None = None
    pids: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = torch.as_tensor(self.features).detach().to("cpu", torch.float32).contiguous()
        if self.features.ndim != 2:
            raise RetrievalError(f"features must be [N, D], got shape {tuple(self.features.shape)}")
        n = self.features.shape[0]
        self.paths = [str(p) for p in self.paths]
        if len(self.paths) != n:
            raise RetrievalError(f"{len(self.paths)} paths for {n} feature rows; expected one path per row")
        for name in ("camids", "pids"):
            value = getattr(self, name)
            if value is not None:
                value = torch.as_tensor(value).detach().to("cpu", torch.int64).reshape(-1)
                if value.numel() != n:
                    raise RetrievalError(f"{name} has {value.numel()} entries for {n} feature rows")
                setattr(self, name, value)
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}

    @classmethod
    def from_paths(
        cls,
        features: torch.Tensor,
        paths: Sequence[str | os.PathLike],
        root: str | os.PathLike | None = None,
        camids: Sequence[int] | torch.Tensor | None = None,
        pids: Sequence[int] | torch.Tensor | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> FeatureSet:
        """A feature set of ``features [N, D]`` for the image files ``paths``, stored relative to
        ``root`` (default: their deepest common folder)."""
        absolute = [os.path.abspath(p) for p in paths]
        if root is not None:
            base = os.path.abspath(root)
        elif absolute:
            base = os.path.commonpath([os.path.dirname(p) for p in absolute])
        else:
            base = None
        relative = [os.path.relpath(p, base) for p in absolute] if base else absolute
        return cls(features, relative, base, None if camids is None else torch.as_tensor(camids),
                   None if pids is None else torch.as_tensor(pids), dict(metadata or {}))

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return self.features.shape[1]

    def absolute_paths(self, root: str | os.PathLike | None = None) -> list[str]:
        """Image paths joined to ``root`` (default: the stored root)."""
        base = root if root is not None else self.root
        return [p if base is None else os.path.join(base, p) for p in self.paths]

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors features file (tensors + paths and settings as metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": self.features}
        for name in ("camids", "pids"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).contiguous()
        metadata = {
            **self.metadata,
            "format": FEATURES_FORMAT,
            "format_version": FEATURES_FORMAT_VERSION,
            "paths": json.dumps(self.paths),
            "root": self.root or "",
        }
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        """Read a features file written by `FeatureSet.save`.

        Raises:
            RetrievalError: missing file, or not a ccafl features file.
        """
        path = Path(path)
        if not path.is_file():
            raise RetrievalError(f"{path}: no such features file (write one with `ccafl-retrieval embed`)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                keys = set(handle.keys())
                tensors = {k: handle.get_tensor(k) for k in keys & {"features", "camids", "pids"}}
        except Exception as error:  # noqa: BLE001 - any parse failure is a malformed file
            raise RetrievalError(f"{path}: not a safetensors features file ({error})") from None
        if metadata.get("format") != FEATURES_FORMAT or "features" not in tensors:
            raise RetrievalError(
                f"{path}: not a ccafl features file (expected metadata format={FEATURES_FORMAT!r} and a "
                "'features' tensor)"
            )
        paths = json.loads(metadata.pop("paths", "[]"))
        root = metadata.pop("root", "") or None
        metadata.pop("format")
        metadata.pop("format_version", None)
        return cls(tensors["features"], paths, root, tensors.get("camids"), tensors.get("pids"), metadata)


def save_features(features: FeatureSet, path: str | os.PathLike) -> Path:
    """Write ``features`` to a safetensors file (see `FeatureSet.save`)."""
    return features.save(path)


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Read a features file (see `FeatureSet.load`)."""
    return FeatureSet.load(path)


# ------------------------------------------------------------------------------------------- embed
def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (``.jpg .jpeg .png .bmp .webp``), sorted.

    Raises:
        RetrievalError: the folder does not exist or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RetrievalError(f"{folder}: no such image folder")
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    images = sorted(p for p in pattern if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise RetrievalError(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def embed_images(
    model: CCAFLModel,
    image_paths: Sequence[str | os.PathLike],
    image_processor: Any = None,
    *,
    root: str | os.PathLike | None = None,
    camids: Sequence[int] | None = None,
    pids: Sequence[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    mixed_precision: str | None = None,
    flip: bool = False,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> FeatureSet:
    """Retrieval features ``[N, D]`` of image files, in the given order.

    Args:
        image_paths: ``N`` image files.
        image_processor: the model's image processor (mean/std), see `eval_transform_for`.
        root: folder to store the paths relative to (default: their deepest common folder).
        camids / pids: optional ``N`` labels stored with the features.
        mixed_precision: ``"bf16"`` / ``"fp16"`` autocast or ``None``; ``flip``: average with the mirror.
    """
    paths = [os.path.abspath(p) for p in image_paths]
    if not paths:
        raise RetrievalError("no image to embed")
    rows = [{"image_path": p} for p in paths]
    collate = ReIDCollator(eval_transform_for(model, image_processor))
    extracted = extract_features(
        model, rows, collate, batch_size=batch_size, num_workers=num_workers, mixed_precision=mixed_precision,
        flip=flip, label_keys=(), desc="Embedding images", progress=progress,
    )
    info = {
        "model": getattr(model.config, "_name_or_path", "") or "",
        "flip": str(bool(flip)).lower(),
        "mixed_precision": mixed_precision or "no",
        "image_size": "x".join(str(v) for v in model.config.image_size),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    return FeatureSet.from_paths(extracted.reid_features, paths, root, camids, pids, info)


def embed_folder(
    model: CCAFLModel, folder: str | os.PathLike, image_processor: Any = None, *, recursive: bool = True, **kwargs
) -> FeatureSet:
    """Retrieval features of every image under ``folder`` (sorted paths, stored relative to it).

    ``kwargs`` go to `embed_images` (batch size, mixed precision, flip, …).
    """
    images = list_images(folder, recursive=recursive)
    return embed_images(model, images, image_processor, root=folder, **kwargs)


def embed_split(model: CCAFLModel, split, image_processor: Any = None, **kwargs) -> FeatureSet:
    """Retrieval features of a `datasets` split with an ``image_path`` column (e.g. a
    `load_reid_dataset` query/gallery split); its ``camid`` / ``pid`` columns are stored too."""
    columns = getattr(split, "column_names", None)
    if columns is None or "image_path" not in columns:
        raise RetrievalError(f"the split needs an 'image_path' column, got columns {columns}")
    labels = {name: split[col][:] for name, col in (("camids", "camid"), ("pids", "pid")) if col in columns}
    return embed_images(model, split["image_path"][:], image_processor, **labels, **kwargs)


# ------------------------------------------------------------------------------------------- index
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
    "FeatureSet",
    "Match",
    "QueryResult",
    "RetrievalError",
    "build_index",
    "default_nlist",
    "embed_folder",
    "embed_images",
    "embed_split",
    "eval_transform_for",
    "index_recall",
    "list_images",
    "load_features",
    "load_index",
    "load_reid_model",
    "save_features",
    "save_index",
    "search",
    "search_gallery",
    "set_nprobe",
]
