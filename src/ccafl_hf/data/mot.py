"""Multi-camera video in the MOTChallenge layout: tracks read and checked, crops cut and cached.

Layout (one folder per camera; each (camera, track id) is one intra-camera identity)::

    ROOT/<camera>/img1/000001.jpg ...     frames, 1-based zero-padded numbers (any image extension)
    ROOT/<camera>/gt/gt.txt               tracks: frame,id,x,y,w,h[,conf,class,visibility]
    ROOT/<camera>/gt/global_ids.txt       optional: track_id,global_id (cross-camera identities)

``x, y`` is the box's top-left corner and ``w, h`` its size, in pixels (``x = 0`` is the first
column). A tracker's output (``frame,id,x,y,w,h,conf,-1,-1,-1``) is read the same way through the
``tracks`` option. Rows are skipped, not refused, when the box's height *after clipping to the frame*
is under ``min_height``, when a visibility column (9th, ``>= 0``) is under ``min_visibility``, when a
class column (8th, ``>= 0``) is not one of ``classes``, and when the 7th column is exactly ``0``
(MOTChallenge ground truth's "ignore this box" flag). Any other problem is a `ReIDDatasetError`
naming the file and line, raised before a crop is cut.

``crops_per_track`` crops per track, spread evenly over its kept boxes, are cut from the frames and
cached as PNG files under ``$CCAFL_HF_CACHE/mot/<key>``; the key hashes the bytes of every frame used,
the crop boxes and the reader's version, so a second load with the same frames and tracks reuses them
and any change to either cuts new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

from ..cache import cache_dir, fingerprint, write_folder_atomically
from .datasets.base import is_image_name, list_subdirs, ordered_codes
from .errors import ReIDDatasetError

logger = logging.getLogger(__name__)

MOT_READER_VERSION = 1
FRAMES_FOLDER = "img1"
MOT_LINE_FORM = "frame,id,x,y,w,h[,conf,class,visibility]"
GLOBAL_IDS_NAME = "global_ids.txt"
CROPS_MANIFEST = "crops.json"


@dataclass(frozen=True)
class MOTOptions:
    """How tracks become training crops (the ``mot`` reader's options).

    Attributes:
        tracks: the tracks file inside each camera folder: ``gt/gt.txt`` or a tracker's output.
        crops_per_track: ``K``, crops per track, spread evenly over its kept boxes (all when fewer).
        min_height: boxes under this height in pixels (after clipping to the frame) are skipped.
        min_visibility: boxes whose visibility column (when present and ``>= 0``) is under this are skipped.
        classes: class ids kept when the class column exists (MOTChallenge: 1 = pedestrian); ``None`` keeps all.
        global_ids: file of ``track_id,global_id`` lines in each camera folder (default: ``global_ids.txt``
            beside the tracks file, used when present).
        global_id_column: 1-based column of the tracks file holding each track's global id, instead of the file.
        crops_dir: where the crops are cached (default ``$CCAFL_HF_CACHE/mot``).
    """

    tracks: str = "gt/gt.txt"
    crops_per_track: int = 16
    min_height: float = 32.0
    min_visibility: float = 0.25
    classes: tuple[int, ...] | None = (1,)
    global_ids: str | None = None
    global_id_column: int | None = None
    crops_dir: str | None = None

    @classmethod
    def from_options(cls, **options) -> MOTOptions:
        """Build from keyword options (e.g. ``--dataset_options``), rejecting unknown ones by name."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ReIDDatasetError(f"mot: unknown option(s) {unknown}; it accepts {names}")
        return cls(**options)

    def __post_init__(self) -> None:
        if self.classes is not None:
            values = [self.classes] if isinstance(self.classes, int) else list(self.classes)
            if not values or not all(isinstance(c, int) and not isinstance(c, bool) for c in values):
                raise ReIDDatasetError(f"mot: classes must be a list of integer class ids or null, got {self.classes!r}")
            object.__setattr__(self, "classes", tuple(values))
        problems = []
        if isinstance(self.crops_per_track, bool) or not isinstance(self.crops_per_track, int) or self.crops_per_track < 1:
            problems.append(f"crops_per_track must be an integer >= 1, got {self.crops_per_track!r}")
        if not _is_number(self.min_height) or self.min_height < 1:
            problems.append(f"min_height must be a number of pixels >= 1, got {self.min_height!r}")
        if not _is_number(self.min_visibility) or not 0 <= self.min_visibility <= 1:
            problems.append(f"min_visibility must be in [0, 1], got {self.min_visibility!r}")
        if self.global_id_column is not None and (
            isinstance(self.global_id_column, bool) or not isinstance(self.global_id_column, int)
            or self.global_id_column < 7
        ):
            problems.append(f"global_id_column must be a 1-based column number >= 7, got {self.global_id_column!r}")
        if self.global_id_column is not None and self.global_ids is not None:
            problems.append("pass global_ids (a file) or global_id_column, not both")
        if not isinstance(self.tracks, str) or not self.tracks:
            problems.append(f"tracks must be a file path inside each camera folder, got {self.tracks!r}")
        if problems:
            raise ReIDDatasetError("mot: " + "; ".join(problems))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class MOTCamera:
    """One camera's tracks file, parsed.

    Attributes:
        name: the camera folder's name.
        folder: the camera folder.
        tracks_file: the tracks file read.
        lines: the file's lines (without line ends).
        line_index: ``[R]`` 0-based index into ``lines`` of each box row.
        frames / track_ids: ``[R]`` int64 frame number and track id of each row.
        boxes: ``[R, 4]`` float64 ``x, y, w, h`` as written.
        kept: ``[R]`` bool, the row passed the filters.
        clipped: ``[R, 4]`` int64 ``x1, y1, x2, y2`` pixel box clipped to the frame.
        frame_paths: frame number -> image file.
        global_column: ``[R]`` the ``global_id_column`` values, when that option is set.
    """

    name: str
    folder: Path
    tracks_file: Path
    lines: list[str]
    line_index: np.ndarray
    frames: np.ndarray
    track_ids: np.ndarray
    boxes: np.ndarray
    kept: np.ndarray
    clipped: np.ndarray
    frame_paths: dict[int, Path]
    global_column: np.ndarray | None = None


@dataclass
class MOTTrack:
    """One (camera, track id): an intra-camera identity.

    Attributes:
        camid: 0-based camera index (cameras in folder-name order, numeric names numerically).
        camera: the camera folder's name.
        track_id: the id in the tracks file.
        global_id: cross-camera identity from the input (``-1`` unknown).
        crop_paths: the cached crops (``[]`` when no box passed the filters).
        crop_frames: the frame of each crop.
    """

    camid: int
    camera: str
    track_id: int
    global_id: int
    crop_paths: list[str] = field(default_factory=list)
    crop_frames: list[int] = field(default_factory=list)


@dataclass
class MOTScene:
    """Every camera and track of a MOTChallenge-layout folder, with the crops cut."""

    root: Path
    cameras: list[MOTCamera]
    tracks: list[MOTTrack]
    crops_root: Path
    options: MOTOptions

    @property
    def has_global_ids(self) -> bool:
        """Whether any track has a known cross-camera identity."""
        return any(t.global_id >= 0 for t in self.tracks)


# ------------------------------------------------------------------------------------------- reading
def read_mot_scene(root: str | os.PathLike | None, options: MOTOptions | None = None) -> MOTScene:
    """Read ``root`` (layout in the module docstring), check every line, and cut (or reuse) the crops.

    Raises:
        ReIDDatasetError: naming the file and line of a malformed line, a frame with no image, a box
            entirely outside its frame, a track with two boxes in one frame, a global id given twice
            differently; or a camera with no track, a missing folder or tracks file.
    """
    options = options or MOTOptions()
    if root is None:
        raise ReIDDatasetError("mot: data_dir is required (the folder holding one <camera>/img1/ folder per camera)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ReIDDatasetError(f"mot: data_dir {str(root)!r} does not exist or is not a folder")
    root = root.resolve()
    names = [n for n in list_subdirs(root) if (root / n / FRAMES_FOLDER).is_dir()]
    if not names:
        raise ReIDDatasetError(
            f"mot: {str(root)!r} holds no camera folder; expected {root}/<camera>/{FRAMES_FOLDER}/000001.jpg and "
            f"{root}/<camera>/{options.tracks}"
        )
    order = np.argsort(ordered_codes(names), kind="stable")
    names = [names[i] for i in order]
    cameras = [_read_camera(root / name, options) for name in names]
    tracks: list[MOTTrack] = []
    for camid, camera in enumerate(cameras):
        global_ids = _global_ids(camera, options)
        for track_id in np.unique(camera.track_ids).tolist():
            tracks.append(MOTTrack(camid, camera.name, int(track_id), global_ids.get(int(track_id), -1)))
    crops_root = _cut_crops(cameras, tracks, options)
    dropped = sum(not t.crop_paths for t in tracks)
    if dropped:
        logger.info("mot: %d of %d tracks have no box passing the filters (min_height=%s, min_visibility=%s, "
                    "classes=%s); they get no crop", dropped, len(tracks), options.min_height,
                    options.min_visibility, options.classes)
    return MOTScene(root, cameras, tracks, crops_root, options)


def _list_frames(folder: Path) -> dict[int, Path]:
    frames: dict[int, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if not (is_image_name(entry.name) and entry.is_file()):
                continue
            stem = os.path.splitext(entry.name)[0]
            if not stem.isdigit():
                raise ReIDDatasetError(
                    f"{folder / entry.name}: frame files must be named by their 1-based frame number (000001.jpg)"
                )
            number = int(stem)
            if number in frames:
                raise ReIDDatasetError(f"{folder / entry.name}: frame {number} also has the image {frames[number].name}")
            frames[number] = Path(entry.path)
    return frames


def _parse_number(text: str, where: str, column: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ReIDDatasetError(f"{where}: column {column} {text!r} is not a number; expected {MOT_LINE_FORM}") from None
    if not math.isfinite(value):
        raise ReIDDatasetError(f"{where}: column {column} is {text!r}; expected a finite number")
    return value


def _read_camera(folder: Path, options: MOTOptions) -> MOTCamera:
    tracks_file = folder / options.tracks
    if not tracks_file.is_file():
        raise ReIDDatasetError(f"{tracks_file}: missing tracks file (camera {folder.name!r}; lines {MOT_LINE_FORM})")
    frame_paths = _list_frames(folder / FRAMES_FOLDER)
    lines = tracks_file.read_text(encoding="utf-8-sig").splitlines()
    line_index, values, widths = [], [], []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{tracks_file}:{k + 1}"
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 6:
            raise ReIDDatasetError(f"{where}: {len(fields)} column(s) {line.strip()!r}; expected {MOT_LINE_FORM}")
        row = [_parse_number(f, where, c + 1) for c, f in enumerate(fields)]
        frame, track, x, y, w, h = row[:6]
        if not frame.is_integer() or frame < 1:
            raise ReIDDatasetError(f"{where}: frame {fields[0]!r} must be an integer >= 1 (frames are 1-based)")
        if not track.is_integer() or track < 0:
            raise ReIDDatasetError(f"{where}: track id {fields[1]!r} must be an integer >= 0 (a detection without a "
                                   "track id? run a tracker first)")
        if w <= 0 or h <= 0:
            raise ReIDDatasetError(f"{where}: box width and height must be > 0, got w={fields[4]} h={fields[5]} "
                                   "(columns are x,y,w,h, not x1,y1,x2,y2)")
        if options.global_id_column is not None and len(fields) < options.global_id_column:
            raise ReIDDatasetError(f"{where}: no column {options.global_id_column} (global_id_column)")
        line_index.append(k)
        widths.append(len(row))
        values.append(row)
    if not values:
        raise ReIDDatasetError(f"{tracks_file}: camera {folder.name!r} has no tracks (the file has no box line)")
    width = max(widths)
    table = np.full((len(values), max(width, 9)), -1.0)
    for i, row in enumerate(values):
        table[i, : len(row)] = row
    has = np.asarray(widths)
    line_index = np.asarray(line_index, dtype=np.int64)
    frames = table[:, 0].astype(np.int64)
    track_ids = table[:, 1].astype(np.int64)
    boxes = table[:, 2:6].copy()

    def where(i: int) -> str:
        return f"{tracks_file}:{int(line_index[i]) + 1}"

    # one box per (track, frame)
    keys = track_ids * (int(frames.max()) + 1) + frames
    unique, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = np.flatnonzero(np.isin(keys, unique[counts > 1]))
        i = int(dup[np.argsort(line_index[dup])][1])
        j = int(first[np.searchsorted(unique, keys[i])])
        raise ReIDDatasetError(f"{where(i)}: track {track_ids[i]} already has a box in frame {frames[i]} "
                               f"(line {int(line_index[j]) + 1}); a track id is one person, one box per frame")
    missing = [i for i, f in enumerate(frames.tolist()) if f not in frame_paths]
    if missing:
        i = missing[0]
        raise ReIDDatasetError(f"{where(i)}: frame {frames[i]} has no image in {folder / FRAMES_FOLDER} "
                               f"(expected e.g. {frames[i]:06d}.jpg)")
    sizes = {f: _frame_size(frame_paths[f]) for f in np.unique(frames).tolist()}
    frame_w = np.asarray([sizes[f][0] for f in frames.tolist()], dtype=np.float64)
    frame_h = np.asarray([sizes[f][1] for f in frames.tolist()], dtype=np.float64)
    x1 = np.clip(np.round(boxes[:, 0]), 0, frame_w)
    y1 = np.clip(np.round(boxes[:, 1]), 0, frame_h)
    x2 = np.clip(np.round(boxes[:, 0] + boxes[:, 2]), 0, frame_w)
    y2 = np.clip(np.round(boxes[:, 1] + boxes[:, 3]), 0, frame_h)
    outside = (x2 <= x1) | (y2 <= y1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        x, y, w, h = boxes[i]
        raise ReIDDatasetError(f"{where(i)}: box x={x:g} y={y:g} w={w:g} h={h:g} lies entirely outside frame "
                               f"{frames[i]} ({int(frame_w[i])}x{int(frame_h[i])} pixels)")
    clipped = np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)
    kept = (y2 - y1) >= options.min_height
    kept &= ~((has >= 7) & (table[:, 6] == 0))
    if options.classes is not None:
        kept &= ~((has >= 8) & (table[:, 7] >= 0) & ~np.isin(table[:, 7], options.classes))
    kept &= ~((has >= 9) & (table[:, 8] >= 0) & (table[:, 8] < options.min_visibility))
    column = table[:, options.global_id_column - 1] if options.global_id_column is not None else None
    return MOTCamera(folder.name, folder, tracks_file, lines, line_index, frames, track_ids, boxes, kept, clipped,
                     frame_paths, column)


def _frame_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:
        raise ReIDDatasetError(f"{path}: corrupt or unreadable frame ({error})") from None


def _check_global_id(value: float, where: str) -> int:
    if not float(value).is_integer() or not (value >= 1 or value == -1):
        raise ReIDDatasetError(f"{where}: global id {value:g} must be an integer >= 1 (-1: unknown)")
    return int(value)


def _global_ids(camera: MOTCamera, options: MOTOptions) -> dict[int, int]:
    """Track id -> global id of one camera (from the column or the file; empty when neither)."""
    if options.global_id_column is not None:
        column = camera.global_column
        result: dict[int, tuple[int, int]] = {}
        for i in np.argsort(camera.line_index, kind="stable").tolist():
            where = f"{camera.tracks_file}:{int(camera.line_index[i]) + 1}"
            gid = _check_global_id(column[i], where)
            track = int(camera.track_ids[i])
            if track in result and result[track][0] != gid:
                raise ReIDDatasetError(f"{where}: track {track} has global id {gid} but {result[track][0]} on line "
                                       f"{result[track][1]}; a track is one person")
            result.setdefault(track, (gid, int(camera.line_index[i]) + 1))
        return {t: g for t, (g, _) in result.items()}
    path = camera.folder / options.global_ids if options.global_ids else camera.tracks_file.parent / GLOBAL_IDS_NAME
    if not path.is_file():
        if options.global_ids:
            raise ReIDDatasetError(f"{path}: missing global ids file (global_ids option; lines track_id,global_id)")
        return {}
    known = set(camera.track_ids.tolist())
    result, seen = {}, {}
    for k, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{k}"
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2:
            raise ReIDDatasetError(f"{where}: {line.strip()!r}; expected track_id,global_id")
        track, gid = (_parse_number(f, where, c + 1) for c, f in enumerate(fields))
        if not track.is_integer() or int(track) not in known:
            raise ReIDDatasetError(f"{where}: track {fields[0]} is not a track of {camera.tracks_file}")
        gid = _check_global_id(gid, where)
        track = int(track)
        if track in result and result[track] != gid:
            raise ReIDDatasetError(f"{where}: track {track} has global id {gid} but {result[track]} on line "
                                   f"{seen[track]}; a track is one person")
        result[track] = gid
        seen.setdefault(track, k)
    return result


# ------------------------------------------------------------------------------------------- crops
def even_picks(count: int, k: int) -> np.ndarray:
    """Indices of ``k`` items spread evenly over ``count`` (first and last included; all when ``count <= k``)."""
    if count <= k:
        return np.arange(count)
    return np.unique(np.round(np.linspace(0, count - 1, k)).astype(np.int64))


def _cut_crops(cameras: list[MOTCamera], tracks: list[MOTTrack], options: MOTOptions) -> Path:
    """Choose each track's crops, then write them (or find them) in the cache; fills ``crop_paths``."""
    plan: list[tuple[MOTTrack, MOTCamera, int]] = []  # (track, camera, row)
    by_key = {(t.camid, t.track_id): t for t in tracks}
    for camid, camera in enumerate(cameras):
        rows = np.flatnonzero(camera.kept)
        rows = rows[np.lexsort((camera.frames[rows], camera.track_ids[rows]))]
        tracks_of_rows = camera.track_ids[rows]
        starts = np.flatnonzero(np.r_[True, tracks_of_rows[1:] != tracks_of_rows[:-1]])
        for s, e in zip(starts.tolist(), np.r_[starts[1:], len(rows)].tolist()):
            track = by_key[(camid, int(tracks_of_rows[s]))]
            for pick in even_picks(e - s, options.crops_per_track).tolist():
                plan.append((track, camera, int(rows[s + pick])))
    if not plan:
        raise ReIDDatasetError(f"mot: no box passes the filters (min_height={options.min_height}, "
                               f"min_visibility={options.min_visibility}, classes={options.classes})")
    for camid, camera in enumerate(cameras):
        if not any(track.camid == camid for track, _, _ in plan):
            raise ReIDDatasetError(f"{camera.tracks_file}: camera {camera.name!r} has no tracks left after the filters "
                                   f"(min_height={options.min_height}, min_visibility={options.min_visibility}, "
                                   f"classes={options.classes})")
    digests: dict[Path, str] = {}
    entries = []
    for track, camera, row in plan:
        frame = int(camera.frames[row])
        path = camera.frame_paths[frame]
        if path not in digests:
            digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        box = camera.clipped[row].tolist()
        name = f"{camera.name}/{track.track_id:06d}_{frame:06d}.png"
        entries.append({"file": name, "frame_sha256": digests[path], "box": box})
        track.crop_paths.append(name)
        track.crop_frames.append(frame)
    key = fingerprint({"version": MOT_READER_VERSION, "crops": entries})
    base = Path(options.crops_dir).expanduser() if options.crops_dir else cache_dir("mot")
    root = base / key
    manifest = [e["file"] for e in entries]

    def ready(folder: Path) -> bool:
        try:
            return json.loads((folder / CROPS_MANIFEST).read_text()) == manifest
        except (OSError, json.JSONDecodeError):
            return False

    if not ready(root):
        if root.exists() and any(root.iterdir()):
            raise ReIDDatasetError(f"{root}: an unfinished or foreign crops folder; delete it to cut the crops again")
        logger.info("mot: cutting %d crops into %s", len(entries), root)
        write_folder_atomically(root, lambda target: _write_crops(target, plan, entries), ready)
    for track in tracks:
        track.crop_paths = [os.fspath(root / p) for p in track.crop_paths]
    return root


def _write_crops(target: Path, plan: list[tuple[MOTTrack, MOTCamera, int]], entries: list[dict]) -> None:
    target.mkdir(parents=True)
    by_frame: dict[Path, list[int]] = {}
    for n, (_, camera, row) in enumerate(plan):
        by_frame.setdefault(camera.frame_paths[int(camera.frames[row])], []).append(n)
    for path, items in by_frame.items():
        with Image.open(path) as opened:
            frame = opened.convert("RGB")
        for n in items:
            out = target / entries[n]["file"]
            out.parent.mkdir(parents=True, exist_ok=True)
            frame.crop(tuple(entries[n]["box"])).save(out, compress_level=1)
    (target / CROPS_MANIFEST).write_text(json.dumps([e["file"] for e in entries]))


# ------------------------------------------------------------------------------------------- writing
def write_mot_with_ids(camera: MOTCamera, new_ids: dict[int, int], path: str | os.PathLike) -> Path:
    """Write ``camera``'s tracks file with every row's id replaced by ``new_ids[track id]`` (other columns,
    line order and skipped rows as in the input)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for k, track in zip(camera.line_index.tolist(), camera.track_ids.tolist()):
        fields = [f.strip() for f in camera.lines[k].split(",")]
        fields[1] = str(new_ids[int(track)])
        out.append(",".join(fields))
    path.write_text("\n".join(out) + "\n")
    return path


def options_dict(options: MOTOptions) -> dict:
    """JSON-ready options."""
    values = asdict(options)
    values["classes"] = list(options.classes) if options.classes is not None else None
    return values


__all__ = [
    "MOTCamera",
    "MOTOptions",
    "MOTScene",
    "MOTTrack",
    "even_picks",
    "read_mot_scene",
    "write_mot_with_ids",
]
