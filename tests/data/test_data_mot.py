"""The ``mot`` reader (MOTChallenge layout): crops cut at the right place, filters, cache, bad inputs,
and the synthetic multi-camera scene."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccafl_hf.data import ReIDDatasetError, load_reid_dataset
from ccafl_hf.data import mot as mot_module
from ccafl_hf.data.datasets.base import TEST_FEATURES, TRAIN_FEATURES
from ccafl_hf.data.mot import MOTOptions, even_picks, read_mot_scene
from ccafl_hf.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

FRAME_W, FRAME_H = 40, 30


def _colour(camera: int, frame: int, track: int) -> tuple[int, int, int]:
    """The colour painted inside a box: identifies camera, frame and track."""
    return (20 + 10 * frame, 40 * camera + 30, 25 * track)


def write_camera(root: Path, camera: int, tracks: dict[int, dict[int, tuple[int, int, int, int]]],
                 num_frames: int = 10, extra_lines: str = "", global_ids: dict[int, int] | None = None) -> Path:
    """``root/cam<camera>/img1/00000<f>.png`` black frames with each box ``x, y, w, h`` painted in `_colour`,
    and ``gt/gt.txt`` (9 columns) listing them."""
    folder = root / f"cam{camera}"
    (folder / "img1").mkdir(parents=True)
    (folder / "gt").mkdir()
    lines = []
    for frame in range(1, num_frames + 1):
        pixels = np.zeros((FRAME_H, FRAME_W, 3), dtype=np.uint8)
        for track, boxes in tracks.items():
            if frame in boxes:
                x, y, w, h = boxes[frame]
                pixels[max(y, 0):y + h, max(x, 0):x + w] = _colour(camera, frame, track)
                lines.append(f"{frame},{track},{x},{y},{w},{h},1,1,1.0")
        Image.fromarray(pixels).save(folder / "img1" / f"{frame:06d}.png")
    (folder / "gt" / "gt.txt").write_text("\n".join(lines) + "\n" + extra_lines)
    if global_ids is not None:
        (folder / "gt" / "global_ids.txt").write_text("".join(f"{t},{g}\n" for t, g in global_ids.items()))
    return folder


@pytest.fixture
def two_cameras(tmp_path):
    """cam1: track 3 in frames 1-10 at (2+f, 4, 6, 12), track 8 in frames 2-5 at (20, 10, 8, 16);
    cam2: track 5 in frames 1-4 at (5, 2, 10, 20), partly outside the frame at frame 4."""
    root = tmp_path / "video"
    write_camera(root, 1, {3: {f: (2 + f, 4, 6, 12) for f in range(1, 11)}, 8: {f: (20, 10, 8, 16) for f in range(2, 6)}},
                 global_ids={3: 1, 8: 2})
    boxes = {f: (5, 2, 10, 20) for f in range(1, 4)}
    boxes[4] = (34, 15, 10, 20)  # clipped to x 34..40, y 15..30
    write_camera(root, 2, {5: boxes}, global_ids={5: 1})
    return root


def _crop_pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_crops_are_cut_at_x_y_w_h_of_one_based_frames(two_cameras, tmp_path):
    scene = read_mot_scene(two_cameras, MOTOptions(min_height=1, crops_per_track=100, crops_dir=str(tmp_path / "c")))
    assert [(t.camera, t.track_id, t.global_id) for t in scene.tracks] == [("cam1", 3, 1), ("cam1", 8, 2), ("cam2", 5, 1)]
    for track in scene.tracks:
        camera = int(track.camera[3:])
        for path, frame in zip(track.crop_paths, track.crop_frames):
            crop = _crop_pixels(path)
            # the whole crop is the box's colour: the box of this frame (1-based), not its neighbour's
            assert (crop == np.asarray(_colour(camera, frame, track.track_id), np.uint8)).all(), (path, frame)
    track3 = scene.tracks[0]
    assert track3.crop_frames == list(range(1, 11))
    assert all(Image.open(p).size == (6, 12) for p in track3.crop_paths)  # w x h, not x2 - x1 from x1 y1 x2 y2
    clipped = scene.tracks[2]
    assert [Image.open(p).size for p in clipped.crop_paths] == [(10, 20)] * 3 + [(6, 15)]


def test_crops_per_track_spread_evenly_and_filters(tmp_path):
    assert even_picks(10, 4).tolist() == [0, 3, 6, 9]
    assert even_picks(3, 8).tolist() == [0, 1, 2]
    root = tmp_path / "video"
    # track 1: 10 frames; track 2: only short boxes; track 3 (8th column 2: another class); track 4: hidden
    write_camera(root, 1, {1: {f: (0, 0, 5, 20) for f in range(1, 11)}, 2: {f: (10, 0, 5, 8) for f in range(1, 4)}})
    gt = root / "cam1" / "gt" / "gt.txt"
    gt.write_text(gt.read_text() + "1,3,20,0,5,20,1,2,1.0\n1,4,25,0,5,20,1,1,0.1\n2,4,25,0,5,20,0,1,1.0\n"
                  "3,4,25,0,5,20,1,1,0.9\n")
    write_camera(root, 2, {1: {f: (0, 0, 5, 20) for f in range(1, 4)}})
    scene = read_mot_scene(root, MOTOptions(min_height=10, crops_per_track=4, crops_dir=str(tmp_path / "c")))
    frames = {(t.camera, t.track_id): t.crop_frames for t in scene.tracks}
    assert frames == {("cam1", 1): [1, 4, 7, 10], ("cam1", 2): [], ("cam1", 3): [], ("cam1", 4): [3],
                      ("cam2", 1): [1, 2, 3]}
    everything = read_mot_scene(root, MOTOptions(min_height=1, min_visibility=0, classes=None, crops_per_track=4,
                                                 crops_dir=str(tmp_path / "c")))
    frames = {(t.camera, t.track_id): t.crop_frames for t in everything.tracks}
    assert frames[("cam1", 2)] == [1, 2, 3] and frames[("cam1", 3)] == [1]
    assert frames[("cam1", 4)] == [1, 3]  # the 7th column's 0 (MOTChallenge's "ignore") is still skipped


def test_dataset_columns_splits_and_global_ids(two_cameras, tmp_path):
    dataset = load_reid_dataset("mot", two_cameras, min_height=1, crops_per_track=4, crops_dir=str(tmp_path / "c"))
    assert dataset["train"].features == TRAIN_FEATURES
    assert dataset["query"].features == TEST_FEATURES and dataset["gallery"].features == TEST_FEATURES
    train = dataset["train"]
    assert train["camid"][:] == [0] * 8 + [1] * 4
    assert train["intra_id"][:] == [0] * 4 + [1] * 4 + [2] * 4
    assert train["diagnostic_pid"][:] == [1] * 4 + [2] * 4 + [1] * 4
    # one query (the middle crop) per track with a known global id, the rest in the gallery
    assert sorted(zip(dataset["query"]["pid"][:], dataset["query"]["camid"][:])) == [(1, 0), (1, 1), (2, 0)]
    assert len(dataset["gallery"]) == 9
    assert set(dataset["query"]["image_path"][:]).isdisjoint(dataset["gallery"]["image_path"][:])


def test_without_global_ids_the_test_splits_are_empty(two_cameras, tmp_path):
    for path in two_cameras.glob("*/gt/global_ids.txt"):
        path.unlink()
    dataset = load_reid_dataset("mot", two_cameras, min_height=1, crops_dir=str(tmp_path / "c"))
    assert len(dataset["query"]) == len(dataset["gallery"]) == 0
    assert set(dataset["train"]["diagnostic_pid"][:]) == {-1}


def test_global_id_column(two_cameras, tmp_path):
    for camera, gid in (("cam1", None), ("cam2", 7)):
        gt = two_cameras / camera / "gt" / "gt.txt"
        lines = [line + f",{gid if gid else (4 if line.split(',')[1] == '3' else -1)}"
                 for line in gt.read_text().splitlines()]
        gt.write_text("\n".join(lines) + "\n")
    scene = read_mot_scene(two_cameras, MOTOptions(min_height=1, global_id_column=10, crops_dir=str(tmp_path / "c")))
    assert [t.global_id for t in scene.tracks] == [4, -1, 7]


def test_crops_are_cached_by_content(two_cameras, tmp_path, monkeypatch):
    options = MOTOptions(min_height=1, crops_dir=str(tmp_path / "c"))
    first = read_mot_scene(two_cameras, options)

    def refuse(*args):
        raise AssertionError("the crops were cut again")

    monkeypatch.setattr(mot_module, "_write_crops", refuse)
    again = read_mot_scene(two_cameras, options)
    assert [t.crop_paths for t in again.tracks] == [t.crop_paths for t in first.tracks]
    # same size, same name, other pixels: new crops
    frame = two_cameras / "cam1" / "img1" / "000002.png"
    pixels = np.asarray(Image.open(frame)).copy()
    pixels[4:16, 4:10] = (1, 2, 3)
    Image.fromarray(pixels).save(frame)
    monkeypatch.undo()
    changed = read_mot_scene(two_cameras, options)
    assert changed.crops_root != first.crops_root
    crop = changed.tracks[0].crop_paths[changed.tracks[0].crop_frames.index(2)]
    assert (_crop_pixels(crop) == np.asarray((1, 2, 3), np.uint8)).all()


BAD_INPUTS = [
    ("missing_frame", lambda root: _append(root, "11,3,1,1,5,5,1,1,1.0"), "gt.txt:12: frame 11 has no image"),
    ("few_columns", lambda root: _append(root, "2,3,1,1"), "gt.txt:12: 4 column(s)"),
    ("not_a_number", lambda root: _append(root, "2,3,1,abc,5,5"), "gt.txt:12: column 4 'abc' is not a number"),
    ("zero_frame", lambda root: _append(root, "0,3,1,1,5,5"), "gt.txt:12: frame '0' must be an integer >= 1"),
    ("x1y1x2y2", lambda root: _append(root, "2,9,10,10,5,-3"), "gt.txt:12: box width and height must be > 0"),
    ("outside", lambda root: _append(root, "2,9,50,2,5,5"), "gt.txt:12: box x=50 y=2 w=5 h=5 lies entirely outside"),
    ("reused_id", lambda root: _append(root, "3,3,1,1,5,5"), "gt.txt:12: track 3 already has a box in frame 3 (line 4)"),
    ("empty_camera", lambda root: (root / "cam2" / "gt" / "gt.txt").write_text("\n"), "cam2/gt/gt.txt: camera 'cam2' has no tracks"),
    ("no_tracks_file", lambda root: (root / "cam2" / "gt" / "gt.txt").unlink(), "cam2/gt/gt.txt: missing tracks file"),
    ("global_id_twice", lambda root: (root / "cam1" / "gt" / "global_ids.txt").write_text("3,1\n8,2\n3,5\n"),
     "global_ids.txt:3: track 3 has global id 5 but 1 on line 1"),
    ("global_id_unknown_track", lambda root: (root / "cam1" / "gt" / "global_ids.txt").write_text("3,1\n4,2\n"),
     "global_ids.txt:2: track 4 is not a track of"),
]


def _append(root: Path, line: str) -> None:
    gt = root / "cam1" / "gt" / "gt.txt"
    text = gt.read_text()
    assert len(text.splitlines()) == 14  # the fixture's 10 + 4 boxes; the appended line is line 15
    gt.write_text(text + line + "\n")


@pytest.mark.parametrize("name,damage,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_error_naming_file_and_line(name, damage, message, two_cameras, tmp_path):
    damage(two_cameras)
    message = message.replace("gt.txt:12:", "gt.txt:15:")
    with pytest.raises(ReIDDatasetError) as raised:
        load_reid_dataset("mot", two_cameras, min_height=1, crops_dir=str(tmp_path / "c"))
    text = str(raised.value)
    assert message in text and "\n" not in text
    assert str(two_cameras) in text
    assert not (tmp_path / "c").exists()  # refused before a crop is cut


def test_bad_options_and_folders(tmp_path):
    with pytest.raises(ReIDDatasetError, match="unknown option"):
        load_reid_dataset("mot", tmp_path, crops=3)
    with pytest.raises(ReIDDatasetError, match="crops_per_track must be an integer >= 1"):
        load_reid_dataset("mot", tmp_path, crops_per_track=0)
    with pytest.raises(ReIDDatasetError, match="holds no camera folder"):
        load_reid_dataset("mot", tmp_path)


# ------------------------------------------------------------------------------------------- scene
@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return generate_synthetic_scene(tmp_path_factory.mktemp("scene") / "s", SyntheticSceneConfig(seed=3))


def test_scene_people_appear_in_several_cameras_under_other_track_ids(scene, tmp_path):
    data = read_mot_scene(scene, MOTOptions(crops_dir=str(tmp_path / "c")))
    config = SyntheticSceneConfig(seed=3)
    assert [c.name for c in data.cameras] == [f"cam{k + 1}" for k in range(config.num_cameras)]
    cameras_of = {}
    for track in data.tracks:
        assert track.global_id >= 1 and track.crop_paths
        cameras_of.setdefault(track.global_id, []).append(track.camid)
    assert sorted(cameras_of) == list(range(1, config.num_people + 1))
    assert all(len(set(c)) == len(c) >= 2 for c in cameras_of.values())
    for camera in data.cameras:  # boxes stay on their frame; visibility is a share
        assert (camera.boxes[:, 2:] > 0).all()
        with open(camera.tracks_file) as handle:
            visibility = [float(line.split(",")[8]) for line in handle]
        assert min(visibility) >= 0 and max(visibility) <= 1
    # a track's crops show one person: they are closer to each other than to other tracks' crops
    # (raw pixels of one camera; a weak but real check that boxes follow the people)
    same, other = [], []
    for camera in range(config.num_cameras):
        tracks = [t for t in data.tracks if t.camid == camera]
        pixels = [np.stack([np.asarray(Image.open(p).convert("RGB").resize((8, 16)), float) for p in t.crop_paths])
                  for t in tracks]
        means = [p.mean(0) for p in pixels]
        for i, p in enumerate(pixels):
            same.append(np.abs(p - means[i]).mean())
            other.extend(np.abs(p - means[j]).mean() for j in range(len(means)) if j != i)
    assert np.mean(same) < np.mean(other)


def test_scene_is_a_function_of_its_config(scene, tmp_path):
    again = generate_synthetic_scene(tmp_path / "again", SyntheticSceneConfig(seed=3))
    for path in sorted(p for p in scene.rglob("*") if p.is_file()):
        assert (again / path.relative_to(scene)).read_bytes() == path.read_bytes(), path
    assert json.loads((scene / "scene_config.json").read_text())["seed"] == 3
    assert generate_synthetic_scene(scene, SyntheticSceneConfig(seed=3)) == scene  # reused, not rewritten
    with pytest.raises(ReIDDatasetError, match="a scene made with other options"):
        generate_synthetic_scene(scene, SyntheticSceneConfig(seed=4))
    with pytest.raises(ReIDDatasetError, match="unknown option"):
        generate_synthetic_scene(tmp_path / "x", people=3)
