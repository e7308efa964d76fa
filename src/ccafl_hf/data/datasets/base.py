"""What every ReID reader shares: the error type, file listing and name parsing, the intra-camera
identity index, sanity checks, and assembly of the three splits into a `datasets.DatasetDict`.

A reader only has to turn its release into three `SplitRecords` (paths, labels, cameras); the
checks and the label bookkeeping of docs/method.md §1 live here, once.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, DatasetInfo, Features, Image, Value, concatenate_datasets

from ..errors import ReIDDatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SPLITS = ("train", "query", "gallery")
JUNK_PID = -1

TRAIN_FEATURES = Features(
    {
        "image_path": Value("string"),
        "camid": Value("int64"),
        "cam_pid": Value("int64"),
        "intra_id": Value("int64"),
        "diagnostic_pid": Value("int64"),
    }
)
TEST_FEATURES = Features({"image_path": Value("string"), "pid": Value("int64"), "camid": Value("int64")})
#: the column of a split whose images are kept in Arrow (``{"bytes", "path"}`` values, decoded by the collator)
IMAGE_COLUMN = "image"
IMAGE_FEATURE = Image(decode=False)


@dataclass
class SplitRecords:
    """One split as parallel arrays, before assembly.

    Attributes:
        paths: ``M`` image file paths (absolute, in the reader's sorted order).
        labels: ``[M]`` int64. Train: the identity label *within its camera* (any integers whose order
            defines ``cam_pid``; for the standard releases the file's person id). Query/gallery: the
            global person id (``-1`` junk, dropped; ``0`` distractor, kept).
        camids: ``[M]`` int64, 0-based camera index.
        diagnostic_pids: train only, ``[M]`` ground-truth global person id or ``-1`` where unknown;
            ``None`` when the source has no cross-camera ground truth.
        images: ``None`` when the images are the files ``paths``; otherwise a `datasets.Dataset` of
            ``M`` rows whose ``image`` column (``Image(decode=False)``) holds them, and ``paths``
            only name them.
    """

    paths: list[str]
    labels: np.ndarray
    camids: np.ndarray
    diagnostic_pids: np.ndarray | None = None
    images: Dataset | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.camids = np.asarray(self.camids, dtype=np.int64).reshape(-1)
        if self.diagnostic_pids is not None:
            self.diagnostic_pids = np.asarray(self.diagnostic_pids, dtype=np.int64).reshape(-1)
        sizes = {len(self.paths), self.labels.size, self.camids.size}
        if self.diagnostic_pids is not None:
            sizes.add(self.diagnostic_pids.size)
        if self.images is not None:
            if self.images.column_names != [IMAGE_COLUMN]:
                raise ValueError(f"SplitRecords.images must have the one column {IMAGE_COLUMN!r}, got {self.images.column_names}")
            sizes.add(len(self.images))
        if len(sizes) != 1:
            raise ValueError(f"SplitRecords arrays differ in length: {sorted(sizes)}")

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, keep: np.ndarray) -> SplitRecords:
        """The records where the boolean mask ``keep`` ``[M]`` is true."""
        keep = np.asarray(keep, dtype=bool)
        diagnostic = None if self.diagnostic_pids is None else self.diagnostic_pids[keep]
        images = self.images
        if images is not None and not keep.all():
            images = images.select(np.flatnonzero(keep))
        return SplitRecords(
            [p for p, k in zip(self.paths, keep.tolist()) if k], self.labels[keep], self.camids[keep], diagnostic, images
        )

    def image_sources(self) -> Sequence:
        """The ``M`` images as `load_image` sources: the ``image`` values, else the paths."""
        return self.paths if self.images is None else self.images[IMAGE_COLUMN]


@dataclass
class ReIDSource:
    """What a reader returns: the three splits and where they came from.

    ``allow_empty_test``: a train-only source (custom data without ground truth); query and gallery
    may then both be empty.
    """

    name: str
    root: Path
    train: SplitRecords
    query: SplitRecords
    gallery: SplitRecords
    allow_empty_test: bool = False


# ------------------------------------------------------------------------------------------ registry
Reader = Callable[..., ReIDSource]
_READERS: dict[str, Reader] = {}
_ALIASES: dict[str, str] = {}


def register_reader(name: str, *aliases: str) -> Callable[[Reader], Reader]:
    """Register ``reader(data_dir, **options) -> ReIDSource`` under ``name`` (and ``aliases``)."""

    def decorate(reader: Reader) -> Reader:
        _READERS[name] = reader
        for alias in (name, *aliases):
            _ALIASES[_normalise_name(alias)] = name
        return reader

    return decorate


def _normalise_name(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


def available_datasets() -> list[str]:
    """Names accepted by `load_reid_dataset`."""
    return sorted(_READERS)


def get_reader(name: str) -> tuple[str, Reader]:
    """The canonical name and reader for ``name`` (case, ``-`` and ``_`` ignored)."""
    canonical = _ALIASES.get(_normalise_name(str(name)))
    if canonical is None:
        raise ReIDDatasetError(f"unknown dataset {name!r}; expected one of {available_datasets()}")
    return canonical, _READERS[canonical]


def check_reader_options(name: str, reader: Reader, options: dict) -> None:
    """Reject options ``reader`` does not take, listing those it does."""
    params = inspect.signature(reader).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ReIDDatasetError(
            f"dataset {name!r} got unknown option(s) {unknown}; it accepts {accepted} plus on_corrupt, verify_images"
        )


# ------------------------------------------------------------------------------ files and names
def resolve_root(data_dir: str | os.PathLike | None, name: str, usual_names: Sequence[str],
                 markers: Sequence[str]) -> Path:
    """The release folder: ``data_dir`` itself when it holds one of ``markers`` (split folders or list
    files), else ``data_dir/<usual name>``. Raises `ReIDDatasetError` naming what was looked for."""
    if data_dir is None:
        raise ReIDDatasetError(f"{name}: data_dir is required (the folder that holds {list(markers)})")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ReIDDatasetError(f"{name}: data_dir {str(root)!r} does not exist or is not a folder")
    for candidate in (root, *(root / usual for usual in usual_names)):
        if any((candidate / marker).exists() for marker in markers):
            return candidate.resolve()
    raise ReIDDatasetError(
        f"{name}: {str(root)!r} holds none of {list(markers)}; pass the release folder or its parent "
        f"when the release folder has its usual name ({', '.join(usual_names)})"
    )


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a `ReIDDatasetError` naming ``what`` it should hold."""
    if not path.is_dir():
        raise ReIDDatasetError(f"missing folder {str(path)!r} ({what})")
    return path


def is_image_name(name: str) -> bool:
    """Whether ``name`` has an image extension (``Thumbs.db`` and the like are ignored)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_image_files(folder: Path, what: str) -> list[str]:
    """Sorted image file names directly inside ``folder`` (one `os.scandir`, no stat per file)."""
    require_dir(folder, what)
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if is_image_name(e.name) and e.is_file()]
    names.sort()
    return names


def list_subdirs(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder``."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    names.sort()
    return names


def parse_names(names: Sequence[str], pattern: re.Pattern, folder: Path | str, convention: str) -> np.ndarray:
    """Integer capture groups of ``pattern`` for every name, as ``[M, G]`` int64.

    ``pattern`` is matched against all names at once (one ``findall`` over the joined names, so
    ``pattern`` must use ``^``/``$`` with `re.MULTILINE` and never cross a newline). Raises
    `ReIDDatasetError` naming the first file that does not follow ``convention``.
    """
    if not names:
        return np.zeros((0, pattern.groups), dtype=np.int64)
    found = pattern.findall("\n".join(names))
    if len(found) != len(names):
        for name in names:
            if not pattern.fullmatch(name):
                raise ReIDDatasetError(
                    f"{os.path.join(str(folder), name)}: file name does not follow the expected pattern {convention}"
                )
        raise ReIDDatasetError(f"{folder}: {len(names) - len(found)} file names do not follow {convention}")
    groups = np.asarray(found, dtype=str)
    if groups.ndim == 1:
        groups = groups[:, None]
    return groups.astype(np.int64)


def check_files_exist(paths: Iterable[str], source: str) -> None:
    """Raise `ReIDDatasetError` naming the first listed file that is absent (one `os.scandir` per
    folder rather than one ``stat`` per file)."""
    by_dir: dict[str, list[str]] = {}
    for path in paths:
        head, tail = os.path.split(path)
        by_dir.setdefault(head, []).append(tail)
    for folder, names in by_dir.items():
        try:
            with os.scandir(folder) as entries:
                present = {e.name for e in entries}
        except FileNotFoundError:
            raise ReIDDatasetError(f"{source} lists {os.path.join(folder, names[0])!r}, whose folder does not exist") from None
        for name in names:
            if name not in present:
                raise ReIDDatasetError(f"{source} lists {os.path.join(folder, name)!r}, which does not exist")


def ordered_codes(values: Sequence) -> np.ndarray:
    """``[M]`` int64 codes of ``values``, in their natural order: numeric when every value is an
    integer (``"2" < "10"``), otherwise lexicographic on the strings."""
    strings = [str(v).strip() for v in values]
    try:
        numbers = np.asarray([int(s) for s in strings], dtype=np.int64)
    except ValueError:
        _, codes = np.unique(np.asarray(strings, dtype=str), return_inverse=True)
        return codes.astype(np.int64)
    _, codes = np.unique(numbers, return_inverse=True)
    return codes.astype(np.int64)


# ------------------------------------------------------------------------------ labels and checks
def intra_camera_index(camids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The intra-camera identity index of docs/method.md §1.

    Args:
        camids: ``[M]`` 0-based camera of each training image.
        labels: ``[M]`` identity label within the camera.
    Returns:
        ``intra_id [M]`` (0..N-1; cameras laid end to end in camera order, then label order within a
        camera), ``cam_pid [M]`` (0-based contiguous per camera) and ``identity_camids [N]``.
    """
    camids = np.asarray(camids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if camids.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    pairs = np.stack([camids, labels], axis=1)
    unique_pairs, intra_id = np.unique(pairs, axis=0, return_inverse=True)
    intra_id = intra_id.reshape(-1).astype(np.int64)
    identity_camids = unique_pairs[:, 0]
    first_of_camera = np.searchsorted(identity_camids, identity_camids, side="left")
    cam_pid_of_identity = np.arange(len(unique_pairs)) - first_of_camera
    return intra_id, cam_pid_of_identity[intra_id].astype(np.int64), identity_camids.astype(np.int64)


def query_without_cross_camera_match(query: SplitRecords, gallery: SplitRecords) -> np.ndarray:
    """``[Q]`` bool: queries whose identity has no gallery image from another camera (such queries
    drop out of the standard protocol)."""
    if len(gallery) == 0:
        return np.ones(len(query), dtype=bool)
    stride = int(max(query.camids.max(initial=0), gallery.camids.max(initial=0))) + 1
    gallery_keys = np.unique(gallery.labels * stride + gallery.camids)  # distinct (pid, camera) pairs
    pids, cameras_per_pid = np.unique(gallery_keys // stride, return_counts=True)
    pos = np.minimum(np.searchsorted(pids, query.labels), len(pids) - 1)
    cameras = np.where(pids[pos] == query.labels, cameras_per_pid[pos], 0)
    own_camera = np.isin(query.labels * stride + query.camids, gallery_keys)
    return cameras - own_camera <= 0


def _drop_junk(records: SplitRecords, split: str, name: str) -> SplitRecords:
    junk = records.labels == JUNK_PID
    if junk.any():
        logger.info("%s %s: dropped %d junk images (pid -1)", name, split, int(junk.sum()))
        return records.select(~junk)
    return records


def build_dataset_dict(source: ReIDSource) -> DatasetDict:
    """Check a reader's splits and assemble them into a `DatasetDict` (columns in the module docstring
    of `ccafl_hf.data`). Raises `ReIDDatasetError` for an empty split or a single-camera train set."""
    name = source.name
    train = _drop_junk(source.train, "train", name)
    query = _drop_junk(source.query, "query", name)
    gallery = _drop_junk(source.gallery, "gallery", name)
    if len(train) == 0:
        raise ReIDDatasetError(f"{name}: the train split under {str(source.root)!r} is empty")
    for split, records in (("query", query), ("gallery", gallery)):
        if len(records) == 0 and not (source.allow_empty_test and len(query) == len(gallery) == 0):
            raise ReIDDatasetError(f"{name}: the {split} split under {str(source.root)!r} is empty")
    if len(query) == len(gallery) == 0:
        logger.warning("%s: no query/gallery images; the model cannot be evaluated on this data", name)

    train_cameras = np.unique(train.camids)
    if train_cameras.size < 2:
        raise ReIDDatasetError(
            f"{name}: the train split has a single camera (camid {int(train_cameras[0])}); cross-camera "
            "learning is impossible with intra-camera labels from one camera — at least two cameras are needed"
        )
    if (train.camids < 0).any() or (query.camids < 0).any() or (gallery.camids < 0).any():
        raise ReIDDatasetError(f"{name}: negative camera index; cameras must be 0-based")

    no_match = query_without_cross_camera_match(query, gallery)
    if no_match.any():
        logger.warning(
            "%s: %d of %d query images have no gallery image of the same identity from another camera; "
            "they are ignored by the evaluation", name, int(no_match.sum()), len(query),
        )

    intra_id, cam_pid, _ = intra_camera_index(train.camids, train.labels)
    diagnostic = train.diagnostic_pids if train.diagnostic_pids is not None else np.full(len(train), -1, np.int64)
    splits = {
        "train": _make_dataset(
            {"image_path": train.paths, "camid": train.camids, "cam_pid": cam_pid, "intra_id": intra_id,
             "diagnostic_pid": diagnostic},
            TRAIN_FEATURES, name, "train", train.images,
        ),
        "query": _make_dataset(
            {"image_path": query.paths, "pid": query.labels, "camid": query.camids}, TEST_FEATURES, name, "query",
            query.images,
        ),
        "gallery": _make_dataset(
            {"image_path": gallery.paths, "pid": gallery.labels, "camid": gallery.camids}, TEST_FEATURES, name,
            "gallery", gallery.images,
        ),
    }
    logger.info(
        "%s: train %d images / %d intra-camera identities / %d cameras; query %d; gallery %d",
        name, len(train), int(intra_id.max()) + 1, train_cameras.size, len(query), len(gallery),
    )
    return DatasetDict(splits)


_DESCRIPTIONS = {
    "train": "Training images with intra-camera labels: camid, cam_pid (identity within the camera) and "
    "intra_id (intra-camera identity index). diagnostic_pid is the cross-camera ground truth, for "
    "diagnostics only (e.g. association purity); it must never reach training.",
    "query": "Query images: pid (global identity, 0 = distractor) and camid.",
    "gallery": "Gallery images: pid (global identity, 0 = distractor; junk -1 removed) and camid.",
}
_IMAGE_DESCRIPTION = " The images are in the image column; image_path names them."


def _make_dataset(columns: dict, features: Features, name: str, split: str, images: Dataset | None) -> Dataset:
    info = DatasetInfo(description=_DESCRIPTIONS[split], dataset_name=name, features=features)
    labels = Dataset.from_dict(columns, features=features, info=info, split=split)
    if images is None:
        return labels
    features = Features({**features, IMAGE_COLUMN: IMAGE_FEATURE})
    info = DatasetInfo(description=_DESCRIPTIONS[split] + _IMAGE_DESCRIPTION, dataset_name=name, features=features)
    return concatenate_datasets([labels, images.cast(Features({IMAGE_COLUMN: IMAGE_FEATURE}))], info=info,
                                split=split, axis=1)
