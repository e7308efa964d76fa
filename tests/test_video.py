"""From multi-camera video to global ids: `embed_detections`, `link_tracklets` (against a slow loop written
from the method), ``retrieval.py link`` on the synthetic scene, and the main job on ``--dataset mot``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ccafl_hf.association import associate_across_cameras
from ccafl_hf.commands import train_main
from ccafl_hf.commands.retrieval import retrieval_main
from ccafl_hf.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene
from ccafl_hf.retrieval import RetrievalError, embed_detections, embed_images, link_metrics, link_tracklets

SCENE = SyntheticSceneConfig(num_people=8, seed=1)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return generate_synthetic_scene(tmp_path_factory.mktemp("scene") / "s", SCENE)


# ---------------------------------------------------------------------------------- embed_detections
class FakeDetections:
    """What `embed_detections` needs of a ``supervision.Detections``: an ``xyxy`` array."""

    def __init__(self, xyxy):
        self.xyxy = xyxy


def test_embed_detections_equals_embedding_the_crops(tiny_model, tmp_path):
    model, processor = tiny_model
    frame = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 20, 40], [30, 5, 50, 60], [70, 10, 90, 30]], dtype=np.float32)
    files = []
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int).tolist()):
        files.append(tmp_path / f"crop{k}.png")
        Image.fromarray(frame[y1:y2, x1:x2]).save(files[-1])
    expected = embed_images(model, files, processor, progress=False).features
    got = embed_detections(model, frame, boxes, processor, batch_size=2)
    assert got.shape == (3, model.reid_feature_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(embed_detections(model, Image.fromarray(frame), torch.as_tensor(boxes), processor), got)
    torch.testing.assert_close(embed_detections(model, frame, FakeDetections(boxes), processor), got)
    empty = embed_detections(model, frame, np.zeros((0, 4)), processor)
    assert empty.shape == (0, model.reid_feature_dim)


def test_embed_detections_bad_inputs(tiny_model):
    model, processor = tiny_model
    frame = np.zeros((20, 20, 3), dtype=np.uint8)
    with pytest.raises(RetrievalError, match=r"boxes must be \[N, 4\]"):
        embed_detections(model, frame, np.zeros((2, 5)), processor)
    with pytest.raises(RetrievalError, match="has no pixel inside the 20x20 frame"):
        embed_detections(model, frame, [[30, 30, 40, 40]], processor)
    with pytest.raises(RetrievalError, match="H x W x 3 uint8"):
        embed_detections(model, frame.astype(np.float32), [[0, 0, 5, 5]], processor)


# ------------------------------------------------------------------------------------ link_tracklets
def slow_link(features: np.ndarray, cams: np.ndarray, num_pairs: int) -> np.ndarray:
    """The method written out: every cross-camera pair by distance (ties by index), walked greedily with
    ICAL's rule, joined only when the two groups share no camera; groups numbered by first member."""
    n = len(features)
    pairs = [(float(((features[i] - features[j]) ** 2).sum()), i, j)
             for i in range(n) for j in range(i + 1, n) if cams[i] != cams[j]]
    pairs.sort()
    partner, group = set(), list(range(n))
    for _, i, j in pairs[:num_pairs]:
        if (i, cams[j]) in partner or (j, cams[i]) in partner:
            continue
        partner |= {(i, cams[j]), (j, cams[i])}
        gi, gj = group[i], group[j]
        members_i = [k for k in range(n) if group[k] == gi]
        members_j = [k for k in range(n) if group[k] == gj]
        if {cams[k] for k in members_i} & {cams[k] for k in members_j}:
            continue
        for k in members_j:
            group[k] = gi
    first = {}
    return np.asarray([first.setdefault(g, len(first)) for g in group])


@pytest.mark.parametrize("seed", range(4))
def test_link_tracklets_matches_the_slow_loop_and_keeps_cameras_apart(seed):
    rng = np.random.default_rng(seed)
    n, cams = 40, rng.integers(0, 4, 40)
    features = rng.normal(size=(n, 8))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    for rate in (0.5, 1.0, 3.0):
        links = link_tracklets(features, cams, rate=rate)
        assert links.num_pairs == round(rate * n)
        np.testing.assert_array_equal(links.global_ids, slow_link(features, cams, links.num_pairs))
        for g in np.unique(links.global_ids):
            members = cams[links.global_ids == g]
            assert len(set(members.tolist())) == len(members)  # never two tracklets of one camera
        np.testing.assert_array_equal(link_tracklets(features, cams, rate=rate).global_ids, links.global_ids)
        np.testing.assert_allclose(links.distances, ((features[links.pairs[:, 0]] - features[links.pairs[:, 1]]) ** 2).sum(1))
    assert len(link_tracklets(features, cams, rate=3.0).refused) > 0  # the camera rule did fire here


def test_two_cameras_is_ical_association_exactly():
    rng = np.random.default_rng(5)
    features, cams = rng.normal(size=(30, 6)), rng.integers(0, 2, 30)
    links = link_tracklets(features, cams, rate=1.0)
    labels = associate_across_cameras(features, cams, 30)
    assert len(links.refused) == 0
    grouped = labels >= 0  # same partition on the associated tracklets, the rest alone
    assert np.array_equal(links.global_ids[grouped][:, None] == links.global_ids[grouped][None],
                          labels[grouped][:, None] == labels[grouped][None])
    assert len(np.unique(links.global_ids[~grouped])) == (~grouped).sum()


def separable(seed: int = 0):
    """People far apart, each seen by a random 2-4 of 4 cameras, tracklets = person + small noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 16)) * 10
    people, cams = [], []
    for person in range(12):
        for cam in np.sort(rng.choice(4, size=int(rng.integers(2, 5)), replace=False)):
            people.append(person)
            cams.append(int(cam))
    people, cams = np.asarray(people), np.asarray(cams)
    order = rng.permutation(len(people))
    features = centres[people[order]] + rng.normal(size=(len(order), 16)) * 0.01
    return features, cams[order], people[order]


def test_link_tracklets_recovers_people_exactly_on_separable_features():
    features, cams, people = separable()
    true_pairs = sum(c * (c - 1) // 2 for c in np.unique(people, return_counts=True)[1])
    for links in (link_tracklets(features, cams, threshold=1.0),
                  link_tracklets(features, cams, rate=true_pairs / len(people))):
        assert np.array_equal(links.global_ids[:, None] == links.global_ids[None], people[:, None] == people[None])
        metrics = link_metrics(links.global_ids, people)
        assert metrics["precision"] == metrics["recall"] == metrics["f1"] == 1.0
    assert link_tracklets(features, cams, threshold=1.0).num_pairs == true_pairs
    alone = link_tracklets(features, cams, threshold=0.0)
    assert alone.num_global_ids == len(people)
    with pytest.raises(RetrievalError, match="threshold or rate, not both"):
        link_tracklets(features, cams, threshold=1.0, rate=1.0)


def test_link_metrics_by_hand():
    # truth: {0,1,2} one person, {3} another; prediction {0,1}, {2,3}: pairs 01 right, 23 wrong; 02, 12 missed
    metrics = link_metrics(np.array([0, 0, 1, 1]), np.array([5, 5, 5, 6]))
    assert metrics["precision"] == 0.5 and metrics["recall"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx(2 * 0.5 / 3 / (0.5 + 1 / 3))


# ---------------------------------------------------------------------------------------- the CLI
def test_retrieval_link_writes_mot_files_and_f1(scene, saved_tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CCAFL_HF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "links"
    argv = ["link", "--model", str(saved_tiny), "--data_dir", str(scene), "--output", str(out), "--no_progress"]
    assert retrieval_main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "links.json").read_text())
    metrics = report["metrics"]
    assert f"F1 {metrics['f1']:.4f}" in printed and 0 <= metrics["f1"] <= 1
    assert metrics["num_identities"] == SCENE.num_people
    global_of = {}
    for camera in sorted(p.name for p in scene.iterdir() if p.is_dir()):
        given = (scene / camera / "gt" / "gt.txt").read_text().splitlines()
        written = (out / f"{camera}.txt").read_text().splitlines()
        assert len(written) == len(given)
        ids = {}
        for a, b in zip(given, written):
            fa, fb = a.split(","), b.split(",")
            assert fa[:1] + fa[2:] == fb[:1] + fb[2:]  # only the id column changes
            assert ids.setdefault(int(fa[1]), int(fb[1])) == int(fb[1])  # one global id per track
        assert len(set(ids.values())) == len(ids)  # two tracks of one camera: two global ids
        global_of.update({(camera, t): g for t, g in ids.items()})
    rows = report["tracklets"]
    assert {(r["camera"], r["track_id"]): r["global_id"] for r in rows} == global_of
    truth = np.asarray([r["true_global_id"] for r in rows])
    assert metrics == pytest.approx(link_metrics(np.asarray([r["global_id"] for r in rows]), truth))
    # a second run into the same folder is refused before the model loads, --overwrite replaces
    assert retrieval_main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert retrieval_main([*argv, "--overwrite", "--threshold", "0"]) == 0
    report = json.loads((out / "links.json").read_text())
    assert report["links"] == [] and report["num_global_ids"] == len(rows)


def test_retrieval_link_bad_tracks_is_one_line_before_the_model(scene, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CCAFL_HF_CACHE", str(tmp_path / "cache"))
    broken = shutil.copytree(scene, tmp_path / "broken")
    gt = broken / "cam2" / "gt" / "gt.txt"
    gt.write_text(gt.read_text() + "5,1,3,4\n")
    code = retrieval_main(["link", "--model", str(tmp_path / "no-model"), "--data_dir", str(broken),
                           "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and f"{gt}:{len(gt.read_text().splitlines())}: 4 column(s)" in err[0]


def test_main_job_trains_from_dataset_mot(scene, tmp_path, monkeypatch):
    from transformers import AutoModel

    from ccafl_hf import CCAFLModel

    monkeypatch.setenv("CCAFL_HF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--model_name_or_path", "tiny", "--dataset", "mot", "--data_dir", str(scene),
            "--dataset_options", json.dumps({"crops_per_track": 4}), "--num_identities_per_batch", "4",
            "--num_instances", "2", "--prompt_epochs", "1", "--icdl_epochs", "1", "--ical_epochs", "1",
            "--iters_per_epoch", "2", "--ical_image_text_start_epoch", "1", "--adversarial_start_epoch", "1",
            "--adversarial_end_epoch", "1", "--disable_tqdm", "true", "--num_threads", "1"]
    assert train_main(argv) == 0
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, CCAFLModel)
    results = json.loads((out / "eval_results.json").read_text())
    assert "mAP" in json.dumps(results)  # the scene's global ids gave query/gallery splits


@pytest.mark.parametrize("options,message", [
    ({}, "gt.txt:{line}: frame 99 has no image in"),
    ({"crops": 2}, "dataset 'mot' got unknown option(s) ['crops']"),
])
def test_main_job_bad_mot_input_is_one_line(options, message, scene, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CCAFL_HF_CACHE", str(tmp_path / "cache"))
    broken = shutil.copytree(scene, tmp_path / "broken")
    gt = broken / "cam1" / "gt" / "gt.txt"
    gt.write_text(gt.read_text() + "99,1,3,4,10,20\n")
    code = train_main(["--output_dir", str(tmp_path / "run"), "--model_name_or_path", "tiny", "--dataset", "mot",
                       "--data_dir", str(broken), "--dataset_options", json.dumps(options)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1
    assert message.format(line=len(gt.read_text().splitlines())) in err[0]
    assert not (tmp_path / "cache" / "mot").exists()
