"""The features-file format (`FeatureSet`) and embedding images into one.

A features file is a safetensors file with the tensors ``features`` ``[N, D]`` (float32) and, when
known, ``camids`` / ``pids`` ``[N]`` (int64); its string metadata holds the image paths (JSON list,
relative to ``root``), ``root`` and the settings the features were made with.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data import ReIDCollator
from ..data.datasets.base import IMAGE_EXTENSIONS
from ..evaluation.extraction import extract_features
from ..modeling_ccafl import CCAFLModel
from .errors import RetrievalError
from .loading import eval_transform_for

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "ccafl-features"
FEATURES_FORMAT_VERSION = "1"


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

    @classmethod
    def for_split(
        cls,
        features: torch.Tensor,
        split,
        camids: Sequence[int] | torch.Tensor | None = None,
        pids: Sequence[int] | torch.Tensor | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> FeatureSet:
        """A feature set of ``features [N, D]`` for the rows of a `load_reid_dataset` split.

        Image files (an ``image_path`` column only) are stored as by `from_paths`; images stored in the
        dataset (an ``image`` column, e.g. the ``hf`` reader's) keep their ``image_path`` names as they are.
        """
        columns = getattr(split, "column_names", None)
        if columns is None or "image_path" not in columns:
            raise RetrievalError(f"the split needs an 'image_path' column, got columns {columns}")
        names = split["image_path"][:]
        if "image" not in columns:
            return cls.from_paths(features, names, None, camids, pids, metadata)
        return cls(features, names, None, None if camids is None else torch.as_tensor(camids),
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
    features = _embed_rows(model, [{"image_path": p} for p in paths], image_processor, batch_size=batch_size,
                           num_workers=num_workers, mixed_precision=mixed_precision, flip=flip, progress=progress)
    return FeatureSet.from_paths(features, paths, root, camids, pids,
                                 _settings(model, flip, mixed_precision, metadata))


def _embed_rows(model: CCAFLModel, rows, image_processor: Any, **kwargs) -> torch.Tensor:
    """``[N, D]`` retrieval features of ``rows`` (dicts with an ``image`` or ``image_path``, see `ReIDCollator`)."""
    collate = ReIDCollator(eval_transform_for(model, image_processor))
    return extract_features(model, rows, collate, label_keys=(), desc="Embedding images", **kwargs).reid_features


def _settings(model: CCAFLModel, flip: bool, mixed_precision: str | None,
              metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """The string settings a features file records."""
    return {
        "model": getattr(model.config, "_name_or_path", "") or "",
        "flip": str(bool(flip)).lower(),
        "mixed_precision": mixed_precision or "no",
        "image_size": "x".join(str(v) for v in model.config.image_size),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }


def embed_folder(
    model: CCAFLModel, folder: str | os.PathLike, image_processor: Any = None, *, recursive: bool = True, **kwargs
) -> FeatureSet:
    """Retrieval features of every image under ``folder`` (sorted paths, stored relative to it).

    ``kwargs`` go to `embed_images` (batch size, mixed precision, flip, …).
    """
    images = list_images(folder, recursive=recursive)
    return embed_images(model, images, image_processor, root=folder, **kwargs)


def embed_split(
    model: CCAFLModel,
    split,
    image_processor: Any = None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    mixed_precision: str | None = None,
    flip: bool = False,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> FeatureSet:
    """Retrieval features ``[N, D]`` of the rows of a `load_reid_dataset` split, stored as by
    `FeatureSet.for_split` with its ``camid`` / ``pid`` columns.

    The images are the files of its ``image_path`` column or, where the split stores them (an ``image``
    column, e.g. the ``hf`` reader's), those values. The other arguments are those of `embed_images`.
    """
    columns = getattr(split, "column_names", None)
    if columns is None or "image_path" not in columns:
        raise RetrievalError(f"the split needs an 'image_path' column, got columns {columns}")
    if len(split) == 0:
        raise RetrievalError("no image to embed")
    labels = {name: split[col][:] for name, col in (("camids", "camid"), ("pids", "pid")) if col in columns}
    rows = split.select_columns([c for c in ("image", "image_path") if c in columns])
    features = _embed_rows(model, rows, image_processor, batch_size=batch_size, num_workers=num_workers,
                           mixed_precision=mixed_precision, flip=flip, progress=progress)
    return FeatureSet.for_split(features, split, labels.get("camids"), labels.get("pids"),
                                _settings(model, flip, mixed_precision, metadata))


__all__ = [
    "FEATURES_FORMAT",
    "FEATURES_FORMAT_VERSION",
    "FeatureSet",
    "embed_folder",
    "embed_images",
    "embed_split",
    "list_images",
]
