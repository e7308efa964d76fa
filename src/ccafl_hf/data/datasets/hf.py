"""🤗 datasets as a source: a Hub dataset, a ``save_to_disk`` folder, or parquet files.

``data_dir`` is a Hub dataset id (``user/name``), a folder written by `DatasetDict.save_to_disk`, a
parquet file, or a folder of parquet files named by split (``train.parquet``, ``query-0.parquet``,
``data/gallery-00000-of-00001.parquet``, ``train/*.parquet``, …). Columns (names are options):

==============  ======================================================================================
``image``       a datasets ``Image`` (kept in Arrow, decoded by the collator), raw image bytes, or a
                file path (relative paths resolve against a local source's folder)
``camera``      integers or strings; mapped to 0-based ``camid`` in sorted order, jointly over splits
``identity``    train rows: the identity *within its camera* (integers or strings)
``pid``         query/gallery rows: the integer identity across cameras (``-1`` junk, dropped;
                ``0`` distractor). Optional on train rows, where it is kept only as ``diagnostic_pid``
==============  ======================================================================================

Splits ``train``, ``query`` and ``gallery`` (other names through ``split_names``, e.g.
``{"gallery": "test"}``); a source of a single table is split by its ``split`` column. A train-only
source (no query and no gallery) can be trained on but not evaluated.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value, load_dataset, load_from_disk
from datasets import config as datasets_config
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

from .base import (
    IMAGE_COLUMN,
    IMAGE_FEATURE,
    SPLITS,
    ReIDDatasetError,
    ReIDSource,
    SplitRecords,
    check_files_exist,
    ordered_codes,
    register_reader,
)

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_SOURCE_FORMS = "a Hub dataset id (user/name), a save_to_disk folder, a parquet file or a folder of parquet files"


@register_reader("hf", "huggingface", "hub")
def read_hf(
    data_dir: str | os.PathLike | None,
    *,
    image_column: str = "image",
    camera_column: str = "camera",
    identity_column: str = "identity",
    pid_column: str = "pid",
    split_names: Mapping[str, str] | None = None,
    split_column: str = "split",
    config_name: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ReIDSource:
    """Read a 🤗 datasets source (module docstring) into a `ReIDSource`.

    Args:
        data_dir: Hub dataset id, ``save_to_disk`` folder, parquet file or folder of parquet files.
        image_column / camera_column / identity_column / pid_column: column names in the source.
        split_names: source split name of ``train`` / ``query`` / ``gallery`` where it differs.
        split_column: the column that splits a single-table source.
        config_name / revision: Hub dataset configuration and revision.
        cache_dir: 🤗 datasets cache for downloads and parquet conversion (default: its usual cache).
    """
    if data_dir is None:
        raise ReIDDatasetError(f"hf: data_dir is required: {_SOURCE_FORMS}")
    split_names = dict(split_names or {})
    unknown = sorted(set(split_names) - set(SPLITS))
    if unknown:
        raise ReIDDatasetError(f"hf: split_names keys {unknown} are not among {list(SPLITS)}")
    wanted = {split: str(split_names.get(split, split)) for split in SPLITS}
    name = f"hf:{os.fspath(data_dir)}"
    loaded, root = _load(data_dir, name, wanted, config_name, revision, cache_dir)
    splits = _select_splits(loaded, name, wanted, split_column)

    columns = {"train": (image_column, camera_column, identity_column), "query": (image_column, camera_column, pid_column),
               "gallery": (image_column, camera_column, pid_column)}
    for split, table in splits.items():
        missing = [c for c in columns[split] if c not in table.column_names]
        if missing:
            hint = ""
            if split == "train" and identity_column in missing and pid_column in table.column_names:
                hint = f"; to use the global id as the within-camera label pass identity_column={pid_column!r}"
            raise ReIDDatasetError(
                f"{name} {split}: missing column(s) {missing}; the columns are {table.column_names}{hint}"
            )

    cameras = {s: _labels(t, camera_column, name, s, strings=True) for s, t in splits.items()}
    if any(c.dtype == object for c in cameras.values()):  # text in some split: compare all as text
        cameras = {s: np.asarray([str(v) for v in c], dtype=object) for s, c in cameras.items()}
    camera_values = np.concatenate([cameras[s] for s in splits])
    camera_codes = _codes(camera_values)
    if not np.array_equal(camera_values, camera_codes):
        firsts = np.unique(camera_codes, return_index=True)[1]
        logger.info("%s: cameras %s mapped to camid 0..%d", name, camera_values[firsts].tolist()[:20], firsts.size - 1)
    offsets = np.cumsum([0] + [len(cameras[s]) for s in splits])

    records = {s: SplitRecords([], np.zeros(0), np.zeros(0)) for s in SPLITS}
    for k, (split, table) in enumerate(splits.items()):
        camids = camera_codes[offsets[k]:offsets[k + 1]]
        paths, images = _images(table, image_column, name, split, root)
        if split == "train":
            labels = _codes(_labels(table, identity_column, name, split, strings=True))
            diagnostic = None
            if pid_column in table.column_names:  # cross-camera ground truth where known (null -> -1)
                diagnostic = _labels(table, pid_column, name, split, strings=False, missing=-1)
                diagnostic = diagnostic if (diagnostic >= 0).any() else None
            records[split] = SplitRecords(paths, labels, camids, diagnostic, images)
        else:
            records[split] = SplitRecords(paths, _labels(table, pid_column, name, split, strings=False), camids,
                                          images=images)
    return ReIDSource(name, root or Path(os.fspath(data_dir)), records["train"], records["query"], records["gallery"],
                      allow_empty_test=not ({"query", "gallery"} & set(splits)))


# ------------------------------------------------------------------------------------------- loading
def _load(data_dir, name: str, wanted: dict[str, str], config_name, revision, cache_dir) -> tuple[dict, Path | None]:
    """``({source split name: Dataset}, local folder or None)`` of ``data_dir``."""
    path = Path(os.fspath(data_dir)).expanduser()
    cache = None if cache_dir is None else os.fspath(Path(cache_dir).expanduser())
    if path.exists():
        root = path.resolve() if path.is_dir() else path.resolve().parent
        if path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS):
            try:
                loaded = load_from_disk(os.fspath(path))
            except (OSError, ValueError) as error:
                raise ReIDDatasetError(f"{name}: cannot read the save_to_disk folder ({error})") from None
            return (dict(loaded) if isinstance(loaded, DatasetDict) else {"": loaded}), root
        loaded = {}
        for split, files in _parquet_files(path, name, wanted).items():  # one by one: splits may differ in columns
            try:
                loaded[split] = Dataset.from_parquet(files, cache_dir=cache)
            except (OSError, ValueError, pa.ArrowException, DatasetGenerationError) as error:
                cause = error.__cause__ or error
                raise ReIDDatasetError(f"{name}: cannot read the parquet files {files[:3]} ({cause})") from None
        return loaded, root

    text = os.fspath(data_dir)
    if not _HUB_ID.match(text) or text.startswith((".", "~")) or text.endswith(".parquet"):
        raise ReIDDatasetError(f"{name}: {text!r} does not exist (expected {_SOURCE_FORMS})")
    try:
        loaded = load_dataset(text, config_name, revision=revision, cache_dir=cache)
    except DatasetNotFoundError:
        raise ReIDDatasetError(
            f"{name}: no dataset {text!r} on the Hub (or it is private or gated: log in with `hf auth login`); "
            f"data_dir may also be {_SOURCE_FORMS}"
        ) from None
    except ConnectionError as error:
        if datasets_config.HF_HUB_OFFLINE:
            raise ReIDDatasetError(
                f"{name}: {text!r} is not a local path nor in the datasets cache, and the Hub is offline "
                "(HF_HUB_OFFLINE=1): load it once online (or pass cache_dir= where it is cached), or pass a "
                "save_to_disk folder or parquet files"
            ) from None
        raise ReIDDatasetError(f"{name}: cannot reach the Hub for {text!r} ({error})") from None
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict({"": loaded})
    return dict(loaded), None


def _parquet_files(path: Path, name: str, wanted: dict[str, str]) -> dict[str, list[str]]:
    """``{source split name: files}`` of a parquet file or folder; ``{"": files}`` when no file is
    named by a split (a single table, split by its split column)."""
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise ReIDDatasetError(f"{name}: {str(path)!r} is not a parquet file (expected {_SOURCE_FORMS})")
        return {"": [os.fspath(path.resolve())]}
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise ReIDDatasetError(
            f"{name}: {str(path)!r} holds no parquet file and no save_to_disk dataset ({' / '.join(_SAVED_MARKERS)})"
        )
    by_split: dict[str, list[str]] = {}
    unmatched = []
    for file in files:
        relative = file.relative_to(path)
        stem = relative.stem.lower()
        folders = [part.lower() for part in relative.parts[:-1]]
        split = next((theirs for theirs in wanted.values()
                      if theirs.lower() in folders or stem == theirs.lower()
                      or re.match(rf"^{re.escape(theirs.lower())}[-_.]", stem)), None)
        if split is None:
            unmatched.append(str(relative))
        else:
            by_split.setdefault(split, []).append(os.fspath(file.resolve()))
    if not by_split:
        return {"": [os.fspath(f.resolve()) for f in files]}
    if unmatched:
        logger.warning("%s: ignoring parquet files of no split %s: %s", name, list(wanted.values()), unmatched[:5])
    return by_split


def _select_splits(loaded: dict[str, Dataset], name: str, wanted: dict[str, str], split_column: str) -> dict[str, Dataset]:
    """``{our split: Dataset}`` for the splits present (train always; query and gallery together or neither)."""
    if len(loaded) == 1 and not ({wanted["query"], wanted["gallery"]} & set(loaded)):
        ((only_name, table),) = loaded.items()
        if split_column in table.column_names:
            loaded = _partition(table, name, wanted, split_column)
        elif only_name == "":
            raise ReIDDatasetError(
                f"{name}: a single table without a {split_column!r} column; expected splits "
                f"{list(wanted.values())} or a {split_column!r} column naming them (see split_column=)"
            )
    present = {ours: loaded[theirs] for ours, theirs in wanted.items() if theirs in loaded}
    extra = sorted(set(loaded) - set(wanted.values()))
    if extra:
        logger.info("%s: ignoring split(s) %s", name, extra)
    missing = [wanted[s] for s in SPLITS if s not in present]
    if "train" not in present or len(missing) == 1:
        raise ReIDDatasetError(
            f"{name}: no split {missing[0]!r} (splits: {sorted(loaded)}); expected {list(wanted.values())} "
            "(map other names with split_names=, e.g. {\"gallery\": \"test\"})"
        )
    return present


def _partition(table: Dataset, name: str, wanted: dict[str, str], split_column: str) -> dict[str, Dataset]:
    """Rows of ``table`` grouped by their ``split_column`` value (one selection per split, no copy)."""
    column = _arrow_column(table, split_column)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ReIDDatasetError(f"{name}: column {split_column!r} holds {column.type}, expected split names (strings)")
    values = np.asarray(column.to_pylist(), dtype=object)
    unknown = sorted({str(v) for v in values} - set(wanted.values()))
    if unknown:
        raise ReIDDatasetError(f"{name}: column {split_column!r} has value(s) {unknown[:5]}; expected {list(wanted.values())}")
    return {theirs: table.select(np.flatnonzero(values == theirs)) for theirs in wanted.values() if (values == theirs).any()}


# ------------------------------------------------------------------------------------------ columns
def _arrow_column(table: Dataset, column: str) -> pa.ChunkedArray:
    """One column as Arrow, rows in the dataset's order (honours a selection)."""
    values = table.with_format("arrow")[column]
    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])


def _labels(table: Dataset, column: str, name: str, split: str, strings: bool, missing: int | None = None) -> np.ndarray:
    """``[M]`` int64 labels, or strings (object array) when ``strings`` allows and the column holds text.
    Raises `ReIDDatasetError` for other types, and for nulls unless ``missing`` replaces them; the
    message names the dataset, split and column."""
    feature = table.features[column]
    is_int = isinstance(feature, ClassLabel) or (isinstance(feature, Value) and pa.types.is_integer(feature.pa_type))
    is_text = isinstance(feature, Value) and (pa.types.is_string(feature.pa_type) or pa.types.is_large_string(feature.pa_type))
    if not (is_int or (strings and is_text)):
        expected = "integers or strings" if strings else "integers"
        raise ReIDDatasetError(f"{name} {split}: column {column!r} holds {feature}; expected {expected}")
    values = _arrow_column(table, column)
    if values.null_count and missing is not None and is_int:
        values = pc.fill_null(values, missing)
    if values.null_count:
        first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise ReIDDatasetError(f"{name} {split}: column {column!r} is empty in {values.null_count} row(s), e.g. row {first}")
    if is_int:
        return values.to_numpy().astype(np.int64)
    return np.asarray(values.to_pylist(), dtype=object)


def _codes(values: np.ndarray) -> np.ndarray:
    """``[M]`` 0-based codes of ``values`` in their sorted order (numeric when all are integers)."""
    if values.dtype != object:
        return np.unique(values, return_inverse=True)[1].reshape(-1).astype(np.int64)
    return ordered_codes(values.tolist())


def _images(table: Dataset, column: str, name: str, split: str, root: Path | None) -> tuple[list[str], Dataset | None]:
    """``(names, images)``: file paths and ``None`` for a path column; else names (each image's stored
    path, or ``<split>/<row>``) and a one-column dataset of ``Image(decode=False)`` values."""
    feature = table.features[column]
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        values = _arrow_column(table, column)
        if values.null_count:
            raise ReIDDatasetError(f"{name} {split}: column {column!r} has {values.null_count} empty path(s)")
        files = values.to_pylist()
        if root is None and not all(os.path.isabs(p) for p in files):
            raise ReIDDatasetError(
                f"{name} {split}: column {column!r} holds relative file paths, which a Hub dataset cannot resolve; "
                "store the images (datasets Image feature)"
            )
        base = os.fspath(root) if root is not None else ""
        paths = [os.path.normpath(os.path.join(base, os.path.expanduser(p))) for p in files]
        check_files_exist(paths, f"{name} {split} column {column!r}")
        return paths, None
    storable = isinstance(feature, Image) or (
        isinstance(feature, Value) and feature.dtype in ("binary", "large_binary")
    ) or (isinstance(feature, dict) and set(feature) == {"bytes", "path"})
    if not storable:
        raise ReIDDatasetError(
            f"{name} {split}: column {column!r} holds {feature}; expected a datasets Image, image bytes or file paths"
        )
    images = table.select_columns([column])
    if column != IMAGE_COLUMN:
        images = images.rename_column(column, IMAGE_COLUMN)
    images = images.cast_column(IMAGE_COLUMN, IMAGE_FEATURE)
    storage = _arrow_column(images, IMAGE_COLUMN)
    if storage.null_count:
        raise ReIDDatasetError(f"{name} {split}: column {column!r} is empty in {storage.null_count} row(s)")
    stored = pc.struct_field(storage, "path").to_pylist()
    names = [p if p else f"{split}/{i:06d}" for i, p in enumerate(stored)]
    return names, images
