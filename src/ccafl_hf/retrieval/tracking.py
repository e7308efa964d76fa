"""ReID inside a tracker: embed a frame's detections, link tracklets across cameras into global ids.

    features = embed_detections(model, frame, boxes, image_processor)       # [N, D], boxes x1 y1 x2 y2
    links = link_tracklets(tracklet_features, tracklet_camids, rate=1.0)    # links.global_ids [T]

`link_tracklets` is the stage-3 (ICAL) cross-camera association of the package
(`ccafl_hf.association.associate_across_cameras`): the ``M`` closest pairs of tracklets from different
cameras are walked in ascending distance, a pair accepted only when neither tracklet already has a
partner in the other's camera. A tracker adds one rule ICAL does not need: a global id never holds two
tracklets of one camera (they are different people by construction), so an accepted pair whose groups
already share a camera is not joined (the closer links, walked first, win). With two cameras the rule
never fires and the result is ICAL's association exactly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..association import (
    associate_across_cameras,
    association_diagnostics,
    camera_centered,
    identity_mean_features,
)
from ..data.mot import MOTScene, options_dict, write_mot_with_ids
from ..modeling_ccafl import CCAFLModel
from .errors import RetrievalError
from .features import _embed_rows


# ------------------------------------------------------------------------------------ detections
def _as_boxes(boxes: Any) -> np.ndarray:
    """``boxes`` (array, tensor, list, or anything with an ``xyxy`` attribute such as
    ``supervision.Detections``) as ``[N, 4]`` float64."""
    if hasattr(boxes, "xyxy"):
        boxes = boxes.xyxy
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4))
    if array.ndim != 2 or array.shape[1] != 4:
        raise RetrievalError(f"boxes must be [N, 4] (x1, y1, x2, y2), got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise RetrievalError("boxes hold NaN or infinite values")
    return array


def _as_image(frame: Any) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise RetrievalError(f"frame must be a PIL image or an H x W x 3 uint8 array (RGB), got "
                             f"{array.dtype} of shape {tuple(array.shape)}")
    return Image.fromarray(array)


def crop_boxes(frame: Any, boxes: Any) -> list[Image.Image]:
    """The ``N`` crops of ``frame`` (PIL image or ``H x W x 3`` uint8 RGB array) at ``boxes`` ``[N, 4]``
    ``x1, y1, x2, y2`` in pixels (rounded to whole pixels, clipped to the frame).

    Raises:
        RetrievalError: malformed boxes, or a box with no pixel inside the frame.
    """
    image = _as_image(frame)
    array = _as_boxes(boxes)
    width, height = image.size
    pixel = np.round(array)
    pixel[:, [0, 2]] = np.clip(pixel[:, [0, 2]], 0, width)
    pixel[:, [1, 3]] = np.clip(pixel[:, [1, 3]], 0, height)
    empty = (pixel[:, 2] <= pixel[:, 0]) | (pixel[:, 3] <= pixel[:, 1])
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise RetrievalError(f"box {i} {array[i].tolist()} has no pixel inside the {width}x{height} frame "
                             "(boxes are x1, y1, x2, y2)")
    return [image.crop(tuple(int(v) for v in box)) for box in pixel.tolist()]


def embed_detections(
    model: CCAFLModel,
    frame: Any,
    boxes: Any,
    processor: Any = None,
    *,
    batch_size: int = 64,
    mixed_precision: str | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Retrieval features of a frame's detections, as embedding each cropped box would give.

    Args:
        model: a CCAFL model (`load_reid_model`).
        frame: a PIL image or an ``H x W x 3`` uint8 RGB array.
        boxes: ``[N, 4]`` ``x1, y1, x2, y2`` pixels (numpy, torch or a list), or a ``supervision.Detections``
            (anything with an ``xyxy`` attribute; ``supervision`` itself is not needed).
        processor: the model's image processor (mean/std), see `eval_transform_for`.
        batch_size / mixed_precision / flip: as `embed_images`.
    Returns:
        ``[N, D]`` float32 L2-normalised features on the CPU; ``[0, D]`` when there is no box.
    """
    crops = crop_boxes(frame, boxes)
    if not crops:
        return torch.zeros(0, model.reid_feature_dim)
    features = _embed_rows(model, [{"image": crop} for crop in crops], processor, batch_size=batch_size,
                           num_workers=0, mixed_precision=mixed_precision, flip=flip, progress=False)
    return features.float().cpu()


# ------------------------------------------------------------------------------------------- linking
@dataclass
class TrackletLinks:
    """The result of `link_tracklets`.

    Attributes:
        global_ids: ``[T]`` int64 global id ``>= 0`` of every tracklet, numbered in order of each group's
            first tracklet; tracklets without a link keep an id of their own.
        pairs: ``[A, 2]`` int64 links ``(i, j)``, ``i < j``, in walk (ascending distance) order.
        distances: ``[A]`` float64 squared Euclidean distance of each link (``2 - 2 cos`` for unit features).
        num_pairs: ``M``, the closest cross-camera pairs walked.
        refused: ``[R, 2]`` pairs the association accepted but that would have put two tracklets of one
            camera under one global id.
    """

    global_ids: np.ndarray
    pairs: np.ndarray
    distances: np.ndarray
    num_pairs: int
    refused: np.ndarray

    @property
    def num_global_ids(self) -> int:
        """Distinct global ids."""
        return int(self.global_ids.max()) + 1 if self.global_ids.size else 0


def _cross_camera_pairs_within(x: np.ndarray, cam: np.ndarray, threshold: float) -> int:
    """Number of cross-camera pairs ``i < j`` with squared distance ``<= threshold`` (float64, in row
    blocks of about 2^22 distances)."""
    sq = np.einsum("nd,nd->n", x, x)
    chunk = max(1, (1 << 22) // len(x))
    count = 0
    for s in range(0, len(x), chunk):
        block = sq[s:s + chunk, None] + sq[None, :] - 2.0 * (x[s:s + chunk] @ x.T)
        rows = np.arange(s, min(s + chunk, len(x)))[:, None]
        upper = np.arange(len(x))[None, :] > rows
        count += int(((block <= threshold) & upper & (cam[rows] != cam[None, :])).sum())
    return count


def link_tracklets(
    features: np.ndarray | torch.Tensor,
    camids: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    threshold: float | None = None,
    rate: float | None = None,
    camera_centering: bool = False,
    use_gpu: bool | None = None,
) -> TrackletLinks:
    """Global ids for tracklets of several cameras, by the package's cross-camera association (ICAL).

    Args:
        features: ``[T, D]`` one feature per tracklet, e.g. the normalised mean of its crops' features.
        camids: ``[T]`` camera of each tracklet (any integers).
        threshold: link pairs whose squared Euclidean distance is ``<= threshold`` (``M`` = their number).
        rate: walk the ``M = round(rate * T)`` closest cross-camera pairs (ICAL's ``association_rate``).
            Pass one of ``threshold`` / ``rate``; neither means ``rate=1.0``.
        camera_centering: subtract each camera's mean feature first (ICAL's ``association_camera_centering``).
        use_gpu: faiss on GPU (``None``: when available).
    Returns:
        `TrackletLinks`: deterministic (ties broken by tracklet index); two tracklets of one camera never
        share a global id.
    """
    if threshold is not None and rate is not None:
        raise RetrievalError("pass threshold or rate, not both")
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    cams = camids.detach().cpu().numpy() if isinstance(camids, torch.Tensor) else np.asarray(camids)
    if x.ndim != 2 or x.shape[0] != cams.reshape(-1).shape[0]:
        raise RetrievalError(f"features must be [T, D] with one row per camid, got {tuple(x.shape)} and "
                             f"{cams.reshape(-1).shape[0]} camids")
    if not np.isfinite(x).all():
        raise RetrievalError("features hold NaN or infinite values")
    if not np.issubdtype(cams.dtype, np.integer):
        raise RetrievalError(f"camids must be integers, got dtype {cams.dtype}")
    cams = cams.reshape(-1).astype(np.int64)
    n = x.shape[0]
    _, cam_index = np.unique(cams, return_inverse=True)
    if n == 0 or cam_index.max() < 1:
        return TrackletLinks(np.arange(n, dtype=np.int64), np.zeros((0, 2), np.int64), np.zeros(0), 0,
                             np.zeros((0, 2), np.int64))
    if camera_centering:
        x = camera_centered(torch.from_numpy(x), torch.from_numpy(cam_index)).numpy()
    if threshold is not None:
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
            raise RetrievalError(f"threshold must be a finite squared distance >= 0, got {threshold!r}")
        num_pairs = _cross_camera_pairs_within(x, cam_index, float(threshold))
    else:
        rate = 1.0 if rate is None else rate
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
            raise RetrievalError(f"rate must be a finite number >= 0 (M = rate x tracklets), got {rate!r}")
        num_pairs = int(round(rate * n))
    _, accepted = associate_across_cameras(x, cam_index, num_pairs, use_gpu=use_gpu, return_pairs=True)
    keep = _camera_exclusive(accepted, cam_index)
    pairs, refused = accepted[keep], accepted[~keep]
    diff = x[pairs[:, 0]] - x[pairs[:, 1]]
    distances = np.einsum("pd,pd->p", diff, diff)
    return TrackletLinks(_groups(pairs, n), pairs, distances, num_pairs, refused)


def _camera_exclusive(pairs: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """``[A]`` bool: walking ``pairs`` in order, join two groups only when they share no camera."""
    parent = list(range(len(cam)))
    cameras = [1 << int(c) for c in cam.tolist()]

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    keep = np.zeros(len(pairs), dtype=bool)
    for t, (i, j) in enumerate(pairs.tolist()):
        a, b = find(i), find(j)
        if cameras[a] & cameras[b]:
            continue
        parent[b] = a
        cameras[a] |= cameras[b]
        keep[t] = True
    return keep


def _groups(pairs: np.ndarray, n: int) -> np.ndarray:
    """Connected components of ``pairs`` over ``n`` nodes, numbered in order of each one's first node."""
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    _, first = np.unique(comp, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[comp]


def link_metrics(global_ids: np.ndarray, true_ids: np.ndarray) -> dict[str, float]:
    """Pairwise precision, recall and F1 of ``global_ids [T]`` against ground truth ``true_ids [T]``
    (tracklets with a negative true id are left out): over unordered tracklet pairs, the share of pairs
    given one global id that are one person, and of one person's pairs given one global id."""
    global_ids, true_ids = np.asarray(global_ids, np.int64), np.asarray(true_ids, np.int64)
    known = true_ids >= 0
    stats = association_diagnostics(global_ids[known], true_ids[known])
    precision, recall = stats["pairwise_precision"], stats["pairwise_recall"]
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "num_tracklets": int(known.sum()),
            "num_identities": int(np.unique(true_ids[known]).size), "num_global_ids": int(np.unique(global_ids).size)}


def links_report(links: TrackletLinks, tracklets: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """JSON-ready ``links.json`` content: every tracklet (its fields plus ``global_id``, 1-based as written
    in the MOT files) and every link with its distance."""
    rows = [{**dict(t), "global_id": int(g) + 1} for t, g in zip(tracklets, links.global_ids.tolist())]
    return {
        "tracklets": rows,
        "links": [{"a": int(i), "b": int(j), "distance": float(d)}
                  for (i, j), d in zip(links.pairs.tolist(), links.distances.tolist())],
        "refused_same_camera": [[int(i), int(j)] for i, j in links.refused.tolist()],
        "num_pairs_walked": links.num_pairs,
        "num_global_ids": links.num_global_ids,
    }


# ------------------------------------------------------------------------------ a MOTChallenge folder
LINKS_FILE = "links.json"


def link_output_files(scene: MOTScene, output_dir: str | os.PathLike) -> list[Path]:
    """The files `link_mot_scene` writes: ``<camera>.txt`` per camera and ``links.json``."""
    out = Path(output_dir)
    return [out / f"{camera.name}.txt" for camera in scene.cameras] + [out / LINKS_FILE]


def link_mot_scene(
    model: CCAFLModel,
    scene: MOTScene,
    output_dir: str | os.PathLike,
    processor: Any = None,
    *,
    threshold: float | None = None,
    rate: float | None = None,
    camera_centering: bool = False,
    use_gpu: bool | None = None,
    **embed_kwargs,
) -> dict[str, Any]:
    """Embed every track's crops, link the tracks across cameras (`link_tracklets` on each track's
    normalised mean feature) and write ``output_dir/<camera>.txt`` (the input's lines with the global id,
    1-based, in the id column) and ``output_dir/links.json``.

    Tracks without a crop (no box passed the reader's filters) are not linked and get ids of their own.
    ``embed_kwargs`` go to `embed_images` (batch size, mixed precision, flip).

    Returns:
        the ``links.json`` content; with ``"metrics"`` (pairwise precision / recall / F1 over the tracks
        with a known global id) when the input has global ids.
    """
    from .features import embed_images

    linked = [k for k, t in enumerate(scene.tracks) if t.crop_paths]
    paths = [p for k in linked for p in scene.tracks[k].crop_paths]
    owner = torch.as_tensor(np.repeat(np.arange(len(linked)), [len(scene.tracks[k].crop_paths) for k in linked]))
    crops = embed_images(model, paths, processor, **embed_kwargs).features
    features = identity_mean_features(crops, owner, len(linked))
    links = link_tracklets(features, [scene.tracks[k].camid for k in linked], threshold=threshold, rate=rate,
                           camera_centering=camera_centering, use_gpu=use_gpu)
    global_ids = np.full(len(scene.tracks), -1, dtype=np.int64)
    global_ids[linked] = links.global_ids
    unlinked = np.flatnonzero(global_ids < 0)
    global_ids[unlinked] = links.num_global_ids + np.arange(len(unlinked))
    out = Path(output_dir)
    for camid, camera in enumerate(scene.cameras):
        ids = {t.track_id: int(global_ids[k]) + 1 for k, t in enumerate(scene.tracks) if t.camid == camid}
        write_mot_with_ids(camera, ids, out / f"{camera.name}.txt")
    tracklets = [{"camera": t.camera, "track_id": t.track_id, "num_crops": len(t.crop_paths),
                  "true_global_id": t.global_id} for t in scene.tracks]
    to_track = np.asarray(linked, dtype=np.int64)  # linked tracklet -> scene track index
    everything = TrackletLinks(global_ids, to_track[links.pairs], links.distances, links.num_pairs,
                               to_track[links.refused])
    report = links_report(everything, tracklets)
    report["settings"] = {"threshold": threshold, "rate": rate if threshold is None else None,
                          "camera_centering": camera_centering, "reader": options_dict(scene.options),
                          "data_dir": os.fspath(scene.root)}
    if scene.has_global_ids:
        truth = np.asarray([t.global_id for t in scene.tracks], dtype=np.int64)
        report["metrics"] = link_metrics(global_ids[linked], truth[linked])
    (out / LINKS_FILE).write_text(json.dumps(report, indent=2))
    return report


__all__ = [
    "LINKS_FILE",
    "TrackletLinks",
    "crop_boxes",
    "embed_detections",
    "link_metrics",
    "link_mot_scene",
    "link_output_files",
    "link_tracklets",
    "links_report",
]
