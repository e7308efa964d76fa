"""MSMT17 (Wei et al., CVPR 2018), V1 and V2, with list files or in the Market-1501 layout.

List-file layout (the official releases)::

    MSMT17_V1/                        MSMT17_V2/
        train/<pid>/<name>.jpg            mask_train_v2/<pid>/<name>.jpg
        test/<pid>/<name>.jpg             mask_test_v2/<pid>/<name>.jpg
        list_train.txt  list_val.txt  list_query.txt  list_gallery.txt

Each list line is ``<pid>/<name>.jpg <label>``; names look like ``0000_000_01_0303morning_0015_0.jpg``
(pid _ index _ camera _ ...), so the camera is the third field (1..15). The standard training set
is ``list_train.txt`` + ``list_val.txt`` (32,621 images); pass ``include_val=False`` for the train
list alone. A converted copy in the Market-1501 layout (``bounding_box_train/``, ``query/``,
``bounding_box_test/`` with ``<pid>_c<camera>...`` names) is read as well.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .base import (
    ReIDDatasetError,
    ReIDSource,
    SplitRecords,
    check_files_exist,
    list_subdirs,
    register_reader,
    resolve_root,
)
from .market1501 import MARKET_FOLDERS, read_market_style

LIST_LINE = re.compile(r"^[ \t]*(\S+)[ \t]+(-?\d+)[ \t]*$", re.MULTILINE)
LIST_CONVENTION = "'<pid>/<name>.jpg <label>' per line (e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0')"
MSMT_NAME = re.compile(r"^\d+_\d+_(\d+)_[^\n/]*\.[A-Za-z]+$", re.MULTILINE)
MSMT_CONVENTION = "'<pid>_<index>_<camera>_<date/time>_<frame>_<n>.jpg' (e.g. 0000_000_01_0303morning_0015_0.jpg)"
CONVERTED_PATTERN = re.compile(r"^(-1|\d+)_c(\d+)[^\n/]*\.[A-Za-z]+$", re.MULTILINE)
CONVERTED_CONVENTION = "'<pid>_c<camera>....jpg' (Market-1501 style, e.g. 0000_c1_0000.jpg)"
IMAGE_DIRS = {"train": ("train", "mask_train_v2"), "test": ("test", "mask_test_v2")}


def parse_list_file(path: Path, image_dir: Path) -> SplitRecords:
    """Parse an MSMT17 list file: ``M`` absolute paths under ``image_dir``, labels and 0-based cameras."""
    if not path.is_file():
        raise ReIDDatasetError(f"missing list file {str(path)!r} (MSMT17 list layout)")
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    found = LIST_LINE.findall(text)
    if len(found) != len(lines):
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not LIST_LINE.fullmatch(line):
                raise ReIDDatasetError(f"{path}:{number}: {line.strip()!r} does not follow {LIST_CONVENTION}")
    if not found:
        return SplitRecords([], np.zeros(0), np.zeros(0))
    relative = [rel for rel, _ in found]
    labels = np.asarray([label for _, label in found], dtype=str).astype(np.int64)
    names = [rel.rsplit("/", 1)[-1] for rel in relative]
    cameras_found = MSMT_NAME.findall("\n".join(names))
    if len(cameras_found) != len(names):
        bad = next(rel for rel, name in zip(relative, names) if not MSMT_NAME.fullmatch(name))
        raise ReIDDatasetError(f"{path}: entry {bad!r}: file name does not follow the expected pattern {MSMT_CONVENTION}")
    cameras = np.asarray(cameras_found, dtype=str).astype(np.int64)
    if (cameras < 1).any():
        bad = relative[int(np.argmax(cameras < 1))]
        raise ReIDDatasetError(f"{path}: entry {bad!r} has camera 0; MSMT17 cameras are numbered from 1")
    base = os.fspath(image_dir) + os.sep
    paths = [base + rel for rel in relative]
    order = np.argsort(np.asarray(paths, dtype=str), kind="stable")
    return SplitRecords([paths[i] for i in order], labels[order], cameras[order] - 1)


def _find_image_dir(root: Path, kind: str) -> Path:
    lowered = {name.lower(): name for name in list_subdirs(root)}
    for candidate in IMAGE_DIRS[kind]:
        if candidate in lowered:
            return root / lowered[candidate]
    raise ReIDDatasetError(f"MSMT17: {str(root)!r} has no {' or '.join(IMAGE_DIRS[kind])} folder (list layout)")


def _merge_train(parts: list[SplitRecords]) -> SplitRecords:
    """Concatenate list splits in sorted path order; the train label doubles as the diagnostic pid."""
    paths = [p for part in parts for p in part.paths]
    labels = np.concatenate([part.labels for part in parts])
    cameras = np.concatenate([part.camids for part in parts])
    order = np.argsort(np.asarray(paths, dtype=str), kind="stable")
    return SplitRecords([paths[i] for i in order], labels[order], cameras[order], labels[order])


@register_reader("msmt17", "msmt", "msmt17_v1", "msmt17_v2")
def read_msmt17(data_dir: str | os.PathLike | None, *, include_val: bool = True, check_files: bool = True) -> ReIDSource:
    """MSMT17: ``data_dir`` is ``MSMT17_V1/``, ``MSMT17_V2/`` (or ``MSMT17/``) or its parent.

    Args:
        include_val: add ``list_val.txt`` to the training set (the standard protocol).
        check_files: verify that every listed file exists (one directory listing per folder).
    """
    root = resolve_root(data_dir, "msmt17", ("MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17"),
                        ("list_query.txt", MARKET_FOLDERS["train"]))
    if not (root / "list_query.txt").is_file():
        return read_market_style(root, "msmt17", CONVERTED_PATTERN, CONVERTED_CONVENTION)

    train_dir, test_dir = _find_image_dir(root, "train"), _find_image_dir(root, "test")
    train_parts = [parse_list_file(root / "list_train.txt", train_dir)]
    if include_val:
        if not (root / "list_val.txt").is_file():
            raise ReIDDatasetError(f"missing list file {str(root / 'list_val.txt')!r}; pass include_val=False to train "
                                   "on list_train.txt alone")
        train_parts.append(parse_list_file(root / "list_val.txt", train_dir))
    train = _merge_train(train_parts)
    query = parse_list_file(root / "list_query.txt", test_dir)
    gallery = parse_list_file(root / "list_gallery.txt", test_dir)
    if check_files:
        for split, records in (("train", train), ("query", query), ("gallery", gallery)):
            check_files_exist(records.paths, f"MSMT17 {split} list")
    return ReIDSource("msmt17", root, train, query, gallery)
