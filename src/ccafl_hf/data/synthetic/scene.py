"""A synthetic multi-camera scene in the MOTChallenge layout (tests and the video demo).

The synthetic dataset's people (`identity_look`) walk across the frames of several cameras (each camera
with its `CameraStyle`: background, colour cast, blur, noise), each person seen by two or more cameras
under a different track id in each. Written as ``ROOT/cam<k>/img1/000001.jpg``, ground-truth tracks in
``ROOT/cam<k>/gt/gt.txt`` (``frame,id,x,y,w,h,1,1,visibility``, visibility = the share of the box not
hidden by nearer people or the frame edge) and the cross-camera identities in
``ROOT/cam<k>/gt/global_ids.txt``; read it back with ``load_reid_dataset("mot", root)``. Everything is
a function of the config (same seed, identical files), cached like the synthetic dataset.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ...cache import cache_dir, fingerprint, write_folder_atomically
from ..errors import ReIDDatasetError
from .config import SyntheticReIDConfig
from .looks import identity_look, keyed_rng
from .render import MARGIN, apply_camera, camera_styles, draw_person

logger = logging.getLogger(__name__)

SCENE_VERSION = 1
SCENE_CONFIG_FILE = "scene_config.json"
#: a track must be at least this visible in one frame (else it is drawn again, up to _MAX_REDRAWS times)
MIN_PEAK_VISIBILITY = 0.6
_MAX_REDRAWS = 50


@dataclass(frozen=True)
class SyntheticSceneConfig:
    """Size and seed of a synthetic multi-camera scene (the defaults: a CI-sized scene).

    Attributes:
        num_people: people (global ids ``1..num_people``).
        num_cameras: cameras (>= 2).
        min_cameras_per_person: each person is seen by a random subset of at least this many cameras.
        num_frames: frames per camera.
        frame_size: ``(height, width)`` of a frame.
        person_size: ``(height, width)`` of a person's box at depth 1 (boxes are scaled by 0.85-1.15).
        min_track_length: frames a track lasts at least (at most the whole video).
        seed: everything is a function of the config, this included.
    """

    num_people: int = 6
    num_cameras: int = 3
    min_cameras_per_person: int = 2
    num_frames: int = 12
    frame_size: tuple[int, int] = (128, 192)
    person_size: tuple[int, int] = (80, 40)
    min_track_length: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "frame_size", tuple(int(v) for v in self.frame_size))
        object.__setattr__(self, "person_size", tuple(int(v) for v in self.person_size))
        problems = []
        if self.num_people < 1:
            problems.append("num_people must be >= 1")
        if not 2 <= self.num_cameras <= 99:
            problems.append(f"num_cameras must be in [2, 99], got {self.num_cameras}")
        if not 2 <= self.min_cameras_per_person <= self.num_cameras:
            problems.append(f"min_cameras_per_person must be in [2, num_cameras], got {self.min_cameras_per_person}")
        if not 1 <= self.min_track_length <= self.num_frames:
            problems.append(f"min_track_length must be in [1, num_frames], got {self.min_track_length}")
        if len(self.frame_size) != 2 or len(self.person_size) != 2 or min(self.person_size) < 16:
            problems.append("frame_size and person_size are (height, width), a person at least 16 pixels")
        elif self.person_size[0] * 1.15 > self.frame_size[0] or self.person_size[1] * 2 > self.frame_size[1]:
            problems.append(f"person_size {self.person_size} does not fit frame_size {self.frame_size}")
        if problems:
            raise ReIDDatasetError("synthetic scene: " + "; ".join(problems))

    @classmethod
    def from_options(cls, **options) -> SyntheticSceneConfig:
        """Build from keyword options, rejecting unknown ones by name."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ReIDDatasetError(f"synthetic scene: unknown option(s) {unknown}; it accepts {names}")
        return cls(**options)

    def to_dict(self) -> dict:
        """JSON-ready options plus the scene generator's version."""
        return {**asdict(self), "frame_size": list(self.frame_size), "person_size": list(self.person_size),
                "scene_version": SCENE_VERSION}


@dataclass
class _Track:
    pid: int
    track_id: int
    start: int
    length: int
    x0: float
    x1: float
    feet: float
    scale: float


def _draw_track(rc: np.random.Generator, pid: int, track_id: int, config: SyntheticSceneConfig) -> _Track:
    height, width = config.frame_size
    ph, pw = config.person_size
    length = int(rc.integers(config.min_track_length, config.num_frames + 1))
    start = int(rc.integers(0, config.num_frames - length + 1))
    scale = float(rc.uniform(0.85, 1.15))
    w = pw * scale
    left, right = -0.25 * w, width - 0.75 * w
    x0, x1 = (left, right) if rc.random() < 0.5 else (right, left)
    feet = float(rc.uniform(ph * scale, height))
    return _Track(pid, track_id, start, length, x0, x1, feet, scale)


def _plan(config: SyntheticSceneConfig) -> list[list[_Track]]:
    """Every camera's tracks: who walks where and when (a function of the config). A track hidden by
    nearer people all along (never ``MIN_PEAK_VISIBILITY`` visible) is drawn again, so every person is
    seen in each of their cameras."""
    r = keyed_rng(config.seed, 10)
    per_camera: list[list[int]] = [[] for _ in range(config.num_cameras)]
    for pid in range(1, config.num_people + 1):
        count = int(r.integers(config.min_cameras_per_person, config.num_cameras + 1))
        for cam in np.sort(r.choice(config.num_cameras, size=count, replace=False)).tolist():
            per_camera[cam].append(pid)
    plan = []
    for cam, pids in enumerate(per_camera):
        rc = keyed_rng(config.seed, 11, cam)
        track_ids = rc.permutation(len(pids)) + 1 + int(rc.integers(0, 50))  # unrelated to the global ids
        tracks = [_draw_track(rc, pid, int(t), config) for pid, t in zip(pids, track_ids.tolist())]
        for _ in range(_MAX_REDRAWS):
            peak = np.zeros(len(tracks))
            for frame in range(config.num_frames):
                for k, visibility in _visible(tracks, frame, config):
                    peak[k] = max(peak[k], visibility)
            hidden = np.flatnonzero(peak < MIN_PEAK_VISIBILITY).tolist()
            if not hidden:
                break
            for k in hidden:
                tracks[k] = _draw_track(rc, tracks[k].pid, tracks[k].track_id, config)
        plan.append(tracks)
    return plan


def _boxes_at(tracks: list[_Track], frame: int, config: SyntheticSceneConfig) -> list[tuple[int, int, int, int, int]]:
    """``(track index, x, y, w, h)`` integer boxes of the tracks in 0-based ``frame``, far to near."""
    ph, pw = config.person_size
    out = []
    for k, track in enumerate(tracks):
        t = frame - track.start
        if not 0 <= t < track.length:
            continue
        progress = t / max(track.length - 1, 1)
        w, h = round(pw * track.scale), round(ph * track.scale)
        x = round(track.x0 + (track.x1 - track.x0) * progress)
        out.append((k, x, round(track.feet) - h, w, h))
    out.sort(key=lambda item: (item[2] + item[4], tracks[item[0]].track_id))  # feet higher in the frame = farther
    return out


def _visible(tracks: list[_Track], frame: int, config: SyntheticSceneConfig) -> list[tuple[int, float]]:
    """``(track index, visibility)`` in 0-based ``frame``: the share of the box inside the frame and not
    covered by a nearer person's box."""
    owner = np.full(config.frame_size, -1, dtype=np.int64)
    boxes = _boxes_at(tracks, frame, config)
    for k, x, y, w, h in boxes:
        owner[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = k
    return [(k, float((owner[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] == k).sum()) / (w * h))
            for k, x, y, w, h in boxes]


def _write_scene(target: Path, config: SyntheticSceneConfig) -> None:
    height, width = config.frame_size
    styles = camera_styles(SyntheticReIDConfig(num_cameras=config.num_cameras, image_size=config.frame_size,
                                               seed=config.seed))
    for cam, tracks in enumerate(_plan(config)):
        style = styles[cam]
        folder = target / f"cam{cam + 1}"
        (folder / "img1").mkdir(parents=True)
        (folder / "gt").mkdir()
        lines = []
        for frame in range(config.num_frames):
            r = keyed_rng(config.seed, 12, cam, frame)
            background = style.background[MARGIN:MARGIN + height, MARGIN:MARGIN + width] * r.uniform(0.97, 1.03)
            image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
            for k, x, y, w, h in _boxes_at(tracks, frame, config):
                layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
                draw_person(ImageDraw.Draw(layer), identity_look(config.seed, tracks[k].pid), style,
                            keyed_rng(config.seed, 13, tracks[k].pid, cam, frame), h, w)
                image.paste(layer, (x, y), layer)
            apply_camera(image, style, r).save(folder / "img1" / f"{frame + 1:06d}.jpg", quality=95)
            boxes = {k: (x, y, w, h) for k, x, y, w, h in _boxes_at(tracks, frame, config)}
            for k, visibility in _visible(tracks, frame, config):
                x, y, w, h = boxes[k]
                track_id = tracks[k].track_id
                lines.append((track_id, frame + 1, f"{frame + 1},{track_id},{x},{y},{w},{h},1,1,{visibility:.3f}"))
        lines.sort(key=lambda item: (item[0], item[1]))
        (folder / "gt" / "gt.txt").write_text("".join(line + "\n" for _, _, line in lines))
        (folder / "gt" / "global_ids.txt").write_text(
            "".join(f"{t.track_id},{t.pid}\n" for t in sorted(tracks, key=lambda t: t.track_id)))
        (folder / "seqinfo.ini").write_text(
            f"[Sequence]\nname=cam{cam + 1}\nimDir=img1\nframeRate=10\nseqLength={config.num_frames}\n"
            f"imWidth={width}\nimHeight={height}\nimExt=.jpg\n")
    (target / SCENE_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))


def generate_synthetic_scene(
    root: str | os.PathLike | None = None,
    config: SyntheticSceneConfig | None = None,
    *,
    overwrite: bool = False,
    **options,
) -> Path:
    """Write the scene to ``root`` (default ``$CCAFL_HF_CACHE/scene/<hash of the config>``) unless it is there.

    Args:
        root: destination folder (it receives one ``cam<k>/`` folder per camera).
        config: a `SyntheticSceneConfig`, or ``**options`` to build one.
        overwrite: replace a scene made with other options instead of raising.
    Returns:
        the scene folder (``data_dir`` of ``load_reid_dataset("mot", ...)``).
    """
    if config is not None and options:
        raise ReIDDatasetError("pass either config or keyword options, not both")
    config = config if config is not None else SyntheticSceneConfig.from_options(**options)
    wanted = config.to_dict()
    root = Path(root).expanduser() if root is not None else cache_dir("scene", fingerprint(wanted))
    if root.exists():
        existing = _read_config(root)
        if existing == wanted:
            return root
        if existing is not None or any(root.iterdir()):
            if not overwrite or existing is None:
                what = "a scene made with other options" if existing else "other files"
                raise ReIDDatasetError(f"{root} holds {what}; choose another folder, delete it"
                                       + (", or pass overwrite=True" if existing else ""))
            shutil.rmtree(root)
    logger.info("generating the synthetic multi-camera scene in %s", root)
    write_folder_atomically(root, lambda target: _write_scene(target, config),
                            ready=lambda folder: _read_config(folder) == wanted)
    return root


def _read_config(root: Path) -> dict | None:
    try:
        return json.loads((root / SCENE_CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


__all__ = ["SCENE_CONFIG_FILE", "SyntheticSceneConfig", "generate_synthetic_scene"]
