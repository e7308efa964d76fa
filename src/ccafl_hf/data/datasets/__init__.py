"""ReID dataset readers and `load_reid_dataset`, the one entry point.

Each reader module registers itself by name (the synthetic dataset's generator lives in
`ccafl_hf.data.synthetic`). Column contract of the returned `datasets.DatasetDict`:

* ``train``: ``image_path`` (str), ``camid`` (0-based), ``cam_pid`` (identity within the camera,
  0-based contiguous per camera), ``intra_id`` (intra-camera identity index 0..N-1, cameras end to
  end), ``diagnostic_pid`` (cross-camera ground truth or -1; **diagnostics only**, never training);
* ``query`` / ``gallery``: ``image_path``, ``pid`` (global identity; 0 = distractor), ``camid``.

A source that keeps its images in Arrow (``hf``) adds an ``image`` column (``Image(decode=False)``)
to every split; ``image_path`` then names each image and the collator decodes ``image``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, DatasetDict

from ..images import check_on_corrupt, find_corrupt_images
from . import custom, dukemtmc, hf, market1501, mot, msmt17, synthetic  # noqa: F401  (registration)
from .base import (
    SPLITS,
    ReIDDatasetError,
    ReIDSource,
    SplitRecords,
    available_datasets,
    build_dataset_dict,
    check_reader_options,
    get_reader,
    intra_camera_index,
    register_reader,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ReIDDatasetError",
    "ReIDDatasetInfo",
    "ReIDSource",
    "SplitRecords",
    "available_datasets",
    "dataset_summary",
    "intra_camera_index",
    "load_reid_dataset",
    "register_reader",
]


def load_reid_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    on_corrupt: str = "error",
    verify_images: bool = False,
    **options,
) -> DatasetDict:
    """Load a ReID dataset as a `DatasetDict` with ``train``, ``query`` and ``gallery`` splits.

    Images stay where they are: files named by ``image_path``, or the Arrow ``image`` column of an
    ``hf`` source; `ReIDCollator` decodes them. Files are listed in sorted order (manifests and
    🤗 datasets keep their row order), so row indices are reproducible.

    Args:
        name: one of `available_datasets()`: ``market1501``, ``dukemtmc``, ``msmt17``, ``custom``,
            ``synthetic``, ``hf``, ``mot`` (case, ``-`` and ``_`` ignored).
        data_dir: the release folder (e.g. ``Market-1501-v15.09.15/``) or its parent; for ``custom``
            a manifest file or a folder; for ``synthetic`` where to generate it (default: a cache dir);
            for ``hf`` a Hub dataset id, a ``save_to_disk`` folder, a parquet file or a folder of them;
            for ``mot`` the folder of MOTChallenge-layout camera folders (`ccafl_hf.data.mot`).
        on_corrupt: with ``verify_images``, ``"error"`` raises on the first unreadable image,
            ``"skip"`` drops unreadable images with a warning.
        verify_images: decode every image now (one pass over the data). Otherwise images are
            checked lazily when the collator decodes them.
        **options: reader options (``include_val`` for msmt17, ``manifest`` for custom, the
            generator's options for synthetic, column and split names for hf, `MOTOptions` for mot; see each reader).
    Raises:
        ReIDDatasetError: unknown dataset or option, missing folder, badly named file, malformed
            manifest, empty split, single-camera train split, corrupt image (``on_corrupt="error"``).
    """
    check_on_corrupt(on_corrupt)
    canonical, reader = get_reader(name)
    check_reader_options(canonical, reader, options)
    source: ReIDSource = reader(data_dir, **options)
    if verify_images:
        source = _verify_source(source, on_corrupt)
    return build_dataset_dict(source)


def _verify_source(source: ReIDSource, on_corrupt: str) -> ReIDSource:
    for split in SPLITS:
        records: SplitRecords = getattr(source, split)
        corrupt = find_corrupt_images(records.image_sources())
        if not corrupt.any():
            continue
        bad = [p for p, c in zip(records.paths, corrupt.tolist()) if c]
        if on_corrupt == "error":
            raise ReIDDatasetError(
                f"{bad[0]}: corrupt or unreadable image ({len(bad)} in {source.name} {split}); "
                "pass on_corrupt='skip' to drop such images"
            )
        logger.warning("%s %s: skipping %d unreadable images, e.g. %s", source.name, split, len(bad), bad[:3])
        setattr(source, split, records.select(~corrupt))
    return source


@dataclass(frozen=True)
class ReIDDatasetInfo:
    """Sizes and per-identity tables of a loaded ReID dataset (see `dataset_summary`).

    Attributes:
        name: dataset name.
        num_train_images: training images.
        num_train_identities: ``N``, intra-camera identities.
        num_cameras: camera slots, ``max(train camid) + 1`` (the number of train cameras for every
            standard release); camera memories are indexed by ``camid``.
        identity_camids: ``[N]`` camera of each intra-camera identity.
        identity_cam_pids: ``[N]`` identity within its camera.
        identity_num_images: ``[N]`` training images per intra-camera identity.
        identity_diagnostic_pids: ``[N]`` cross-camera ground-truth pid (-1 unknown), or ``None``
            when the data has none. **Diagnostics only** (association purity); never for training.
        num_query / num_gallery: images in the test splits.
        num_query_identities / num_gallery_identities: distinct pids there.
    """

    name: str
    num_train_images: int
    num_train_identities: int
    num_cameras: int
    identity_camids: np.ndarray
    identity_cam_pids: np.ndarray
    identity_num_images: np.ndarray
    identity_diagnostic_pids: np.ndarray | None
    num_query: int
    num_gallery: int
    num_query_identities: int
    num_gallery_identities: int


def _column(split: Dataset, column: str) -> np.ndarray:
    if column not in split.column_names:
        raise ReIDDatasetError(f"split {split.split} has no {column!r} column; was it made by load_reid_dataset?")
    return np.asarray(split[column][:], dtype=np.int64)


def dataset_summary(dataset: DatasetDict) -> ReIDDatasetInfo:
    """Summarise a `load_reid_dataset` result (vectorised over the label columns)."""
    missing = [s for s in SPLITS if s not in dataset]
    if missing:
        raise ReIDDatasetError(f"dataset lacks split(s) {missing}; expected {list(SPLITS)}")
    train = dataset["train"]
    intra_id, camid, cam_pid = (_column(train, c) for c in ("intra_id", "camid", "cam_pid"))
    num_identities = int(intra_id.max()) + 1 if intra_id.size else 0
    identity_camids = np.full(num_identities, -1, dtype=np.int64)
    identity_camids[intra_id] = camid
    identity_cam_pids = np.full(num_identities, -1, dtype=np.int64)
    identity_cam_pids[intra_id] = cam_pid
    diagnostic = None
    if "diagnostic_pid" in train.column_names:
        pids = _column(train, "diagnostic_pid")
        if (pids >= 0).any():
            diagnostic = np.full(num_identities, -1, dtype=np.int64)
            diagnostic[intra_id] = pids
    query_pids = _column(dataset["query"], "pid")
    gallery_pids = _column(dataset["gallery"], "pid")
    return ReIDDatasetInfo(
        name=train.info.dataset_name or "",
        num_train_images=len(train),
        num_train_identities=num_identities,
        num_cameras=int(camid.max()) + 1 if camid.size else 0,
        identity_camids=identity_camids,
        identity_cam_pids=identity_cam_pids,
        identity_num_images=np.bincount(intra_id, minlength=num_identities),
        identity_diagnostic_pids=diagnostic,
        num_query=len(query_pids),
        num_gallery=len(gallery_pids),
        num_query_identities=int(np.unique(query_pids).size),
        num_gallery_identities=int(np.unique(gallery_pids).size),
    )
