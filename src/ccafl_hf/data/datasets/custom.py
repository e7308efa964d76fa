"""Your own cameras: a manifest (CSV or JSON Lines) or a folder tree.

**Manifest** — one row per image, columns:

============  ==========================================================================
``path``      image file; relative paths are resolved against the manifest's folder
``camera``    integer camera number (any integers; mapped to 0-based ``camid`` in sorted order)
``identity``  identity *within its camera* (any string or integer); required for train rows
``split``     ``train``, ``query`` or ``gallery``
``global_id`` optional (alias ``pid``); integer identity across cameras. Required for query and
              gallery rows (evaluation needs it; ``-1`` junk, ``0`` distractor); on train rows it
              is kept only as ``diagnostic_pid``
============  ==========================================================================

Rows keep the manifest's order. Query/gallery rows may be absent altogether (a train-only
source; the model then cannot be evaluated).

**Folder tree** — folder names are labels, files are listed in sorted order::

    root/train/<camera>/<identity>/*.jpg        root/<camera>/<identity>/*.jpg   (train only)
    root/query/<camera>/<global id>/*.jpg
    root/gallery/<camera>/<global id>/*.jpg

Camera folder names may be any strings (numeric names sort numerically) and are mapped to 0-based
``camid`` consistently across splits; identity folders in query/gallery must be integers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from .base import (
    SPLITS,
    ReIDDatasetError,
    ReIDSource,
    SplitRecords,
    check_files_exist,
    is_image_name,
    list_image_files,
    list_subdirs,
    ordered_codes,
    register_reader,
)

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "camera", "identity", "split")
GLOBAL_ID_COLUMNS = ("global_id", "pid")
MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
_INTEGER = re.compile(r"^[+-]?\d+$")


@register_reader("custom", "manifest", "folder")
def read_custom(data_dir: str | os.PathLike | None, *, manifest: str | os.PathLike | None = None) -> ReIDSource:
    """Read a manifest (``data_dir`` is the file, or a folder holding ``manifest.csv``/``manifest.jsonl``,
    or ``manifest=`` names it) or else the folder tree under ``data_dir``."""
    if manifest is None and data_dir is None:
        raise ReIDDatasetError("custom: pass data_dir (a manifest file or a folder) or manifest=")
    if manifest is None:
        root = Path(data_dir).expanduser()
        if root.is_file():
            manifest = root
        elif not root.is_dir():
            raise ReIDDatasetError(f"custom: data_dir {str(root)!r} does not exist")
        else:
            present = [root / name for name in MANIFEST_NAMES if (root / name).is_file()]
            if len(present) > 1:
                raise ReIDDatasetError(f"custom: {str(root)!r} holds both {MANIFEST_NAMES}; pass manifest= to choose")
            manifest = present[0] if present else None
    if manifest is not None:
        return read_manifest(Path(manifest).expanduser())
    return read_folder_tree(Path(data_dir).expanduser())


# ------------------------------------------------------------------------------------------ manifest
def _manifest_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` pairs of a CSV or JSONL manifest, after checking the columns."""
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ReIDDatasetError(f"{path}: unknown manifest type; use .csv or .jsonl")
    if not path.is_file():
        raise ReIDDatasetError(f"manifest {str(path)!r} does not exist")
    rows: list[tuple[int, dict]] = []
    if kind == "csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in MANIFEST_COLUMNS if c not in header]
            if missing:
                raise ReIDDatasetError(
                    f"{path}: missing column(s) {missing}; the header is {header}, expected {list(MANIFEST_COLUMNS)} "
                    f"(+ optional {GLOBAL_ID_COLUMNS[0]})"
                )
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
        return rows
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ReIDDatasetError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ReIDDatasetError(f"{path}:{number}: each line must be a JSON object with {list(MANIFEST_COLUMNS)}")
            missing = [c for c in MANIFEST_COLUMNS if c not in row]
            if missing:
                raise ReIDDatasetError(f"{path}:{number}: missing field(s) {missing}; expected {list(MANIFEST_COLUMNS)}")
            rows.append((number, row))
    return rows


def _text(value) -> str:
    """A manifest cell as stripped text (``None`` -> ``""``; ``0`` stays ``"0"``)."""
    return "" if value is None else str(value).strip()


def _as_int(value, where: str, field: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _INTEGER.match(value.strip()))):
        raise ReIDDatasetError(f"{where}: {field} {value!r} is not an integer")
    return int(value)


def read_manifest(path: Path) -> ReIDSource:
    """Read a CSV/JSONL manifest (format in the module docstring) into a `ReIDSource`."""
    path = path.resolve()
    rows = _manifest_rows(path)
    if not rows:
        raise ReIDDatasetError(f"{path}: the manifest has no rows")
    base = path.parent
    columns: dict[str, dict[str, list]] = {s: {"path": [], "camera": [], "label": [], "global": []} for s in SPLITS}
    for number, row in rows:
        where = f"{path}:{number}"
        split = _text(row["split"]).lower()
        if split not in columns:
            raise ReIDDatasetError(f"{where}: unknown split {row['split']!r}; expected one of {list(SPLITS)}")
        file = _text(row["path"])
        if not file:
            raise ReIDDatasetError(f"{where}: empty path")
        camera = _as_int(row["camera"], where, "camera")
        global_id = next((row[c] for c in GLOBAL_ID_COLUMNS if c in row and _text(row[c])), None)
        if split == "train":
            identity = _text(row["identity"])
            if not identity:
                raise ReIDDatasetError(f"{where}: train rows need an identity (the person's label within camera {camera})")
            label = identity
            global_id = -1 if global_id is None else _as_int(global_id, where, "global_id")
        else:
            if global_id is None:
                raise ReIDDatasetError(
                    f"{where}: {split} rows need an integer global_id (identity across cameras) for evaluation"
                )
            global_id = _as_int(global_id, where, "global_id")
            label = global_id
        target = columns[split]
        target["path"].append(os.path.normpath(os.path.join(base, os.path.expanduser(file))))
        target["camera"].append(camera)
        target["label"].append(label)
        target["global"].append(global_id)

    all_cameras = np.unique(np.asarray([c for s in SPLITS for c in columns[s]["camera"]], dtype=np.int64))
    if not np.array_equal(all_cameras, np.arange(all_cameras.size)):
        logger.info("custom: cameras %s mapped to camid 0..%d", all_cameras.tolist(), all_cameras.size - 1)
    records = {}
    for split in SPLITS:
        c = columns[split]
        camids = np.searchsorted(all_cameras, np.asarray(c["camera"], dtype=np.int64))
        if split == "train":
            diagnostic = np.asarray(c["global"], dtype=np.int64)
            records[split] = SplitRecords(
                c["path"], ordered_codes(c["label"]), camids, diagnostic if (diagnostic >= 0).any() else None
            )
        else:
            records[split] = SplitRecords(c["path"], np.asarray(c["label"], dtype=np.int64), camids)
        check_files_exist(records[split].paths, f"manifest {path} ({split})")
    return ReIDSource("custom", base, records["train"], records["query"], records["gallery"], allow_empty_test=True)


# --------------------------------------------------------------------------------------- folder tree
def _scan_split(split_dir: Path, split: str) -> tuple[list[str], list[str], list[str]]:
    """``(paths, camera folder names, identity folder names)`` of ``split_dir/<camera>/<identity>/*``."""
    paths: list[str] = []
    cameras: list[str] = []
    identities: list[str] = []
    for camera in list_subdirs(split_dir):
        camera_dir = split_dir / camera
        with os.scandir(camera_dir) as entries:
            stray = sorted(e.name for e in entries if e.is_file() and is_image_name(e.name))
        if stray:
            raise ReIDDatasetError(
                f"{camera_dir / stray[0]}: images must sit in identity folders, "
                f"expected {split_dir}/<camera>/<identity>/<image>"
            )
        for identity in list_subdirs(camera_dir):
            names = list_image_files(camera_dir / identity, f"{split} identity folder")
            prefix = os.fspath(camera_dir / identity) + os.sep
            paths.extend(prefix + n for n in names)
            cameras.extend([camera] * len(names))
            identities.extend([identity] * len(names))
    return paths, cameras, identities


def read_folder_tree(root: Path) -> ReIDSource:
    """Read ``root/{train,query,gallery}/<camera>/<identity>/`` or, without a ``train`` folder,
    ``root/<camera>/<identity>/`` as a train-only source."""
    if not root.is_dir():
        raise ReIDDatasetError(f"custom: {str(root)!r} is not a folder")
    root = root.resolve()
    subdirs = set(list_subdirs(root))
    if "train" in subdirs:
        present = [s for s in ("query", "gallery") if s in subdirs]
        if len(present) == 1:
            missing = ({"query", "gallery"} - set(present)).pop()
            raise ReIDDatasetError(f"missing folder {str(root / missing)!r} (custom folder layout has {present[0]}/)")
        scanned = {s: _scan_split(root / s, s) if s in subdirs else ([], [], []) for s in SPLITS}
    else:
        scanned = {"train": _scan_split(root, "train"), "query": ([], [], []), "gallery": ([], [], [])}
    camera_names = [c for s in SPLITS for c in scanned[s][1]]
    camera_codes = ordered_codes(camera_names) if camera_names else np.zeros(0, dtype=np.int64)
    offsets = np.cumsum([0] + [len(scanned[s][0]) for s in SPLITS])
    records = {}
    for k, split in enumerate(SPLITS):
        paths, _, identities = scanned[split]
        camids = camera_codes[offsets[k]:offsets[k + 1]]
        if split == "train":
            records[split] = SplitRecords(paths, ordered_codes(identities) if identities else np.zeros(0), camids)
        else:
            pids = [_as_int(i, f"{root / split}/<camera>/{i}", "identity folder (global id)") for i in identities]
            records[split] = SplitRecords(paths, np.asarray(pids, dtype=np.int64), camids)
    return ReIDSource("custom", root, records["train"], records["query"], records["gallery"], allow_empty_test=True)
