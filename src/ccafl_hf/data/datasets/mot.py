"""Multi-camera video in the MOTChallenge layout: tracks as intra-camera labels (`ccafl_hf.data.mot`).

Each camera folder is one camera and each (camera, track id) one intra-camera identity; the train split
holds ``crops_per_track`` crops of every track. Where cross-camera global ids are given
(``global_ids.txt`` or ``global_id_column``) they become the train split's ``diagnostic_pid`` and the
query/gallery splits: the middle crop of every track with a known global id is a query, its other crops
are gallery images. The evaluation then measures what the model is trained for, matching *these*
cameras' people across cameras; the global ids never reach training. Without global ids the
query/gallery splits are empty and runs skip the evaluation.
"""

from __future__ import annotations

import os

import numpy as np

from ..mot import MOTOptions, read_mot_scene
from .base import ReIDSource, SplitRecords, register_reader


@register_reader("mot", "motchallenge", "video")
def read_mot(
    data_dir: str | os.PathLike | None,
    *,
    tracks: str = "gt/gt.txt",
    crops_per_track: int = 16,
    min_height: float = 32.0,
    min_visibility: float = 0.25,
    classes: list[int] | None = (1,),
    global_ids: str | None = None,
    global_id_column: int | None = None,
    crops_dir: str | None = None,
) -> ReIDSource:
    """Read ``data_dir/<camera>/{img1,gt}`` (options: `ccafl_hf.data.mot.MOTOptions`)."""
    options = MOTOptions(tracks, crops_per_track, min_height, min_visibility, classes, global_ids,
                         global_id_column, crops_dir)
    scene = read_mot_scene(data_dir, options)
    train: dict[str, list] = {"paths": [], "labels": [], "camids": [], "pids": []}
    test = {"query": {"paths": [], "pids": [], "camids": []}, "gallery": {"paths": [], "pids": [], "camids": []}}
    for track in scene.tracks:
        count = len(track.crop_paths)
        train["paths"].extend(track.crop_paths)
        train["labels"].extend([track.track_id] * count)
        train["camids"].extend([track.camid] * count)
        train["pids"].extend([track.global_id] * count)
        if track.global_id < 1 or count == 0:
            continue
        middle = count // 2
        for k, path in enumerate(track.crop_paths):
            split = test["query"] if k == middle else test["gallery"]
            split["paths"].append(path)
            split["pids"].append(track.global_id)
            split["camids"].append(track.camid)
    diagnostic = np.asarray(train["pids"], dtype=np.int64)
    records = SplitRecords(train["paths"], train["labels"], train["camids"],
                           diagnostic if (diagnostic >= 0).any() else None)
    query, gallery = (SplitRecords(test[s]["paths"], test[s]["pids"], test[s]["camids"]) for s in ("query", "gallery"))
    if len(query) == 0 or len(gallery) == 0:
        empty = SplitRecords([], [], [])
        query, gallery = empty, empty
    return ReIDSource("mot", scene.root, records, query, gallery, allow_empty_test=True)
