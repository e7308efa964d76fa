"""Readers: counts, labels and the intra-camera index on tiny trees of every format, and a clear
error for every kind of bad input."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from ccafl_hf.data import (
    ReIDDatasetError,
    available_datasets,
    dataset_summary,
    intra_camera_index,
    load_reid_dataset,
)


def col(split, name):
    return np.asarray(split[name][:])


def names(split):
    return [os.path.basename(p) for p in split["image_path"][:]]


def intra_index_reference(camids, labels):
    """docs/method.md §1 literally: walk cameras in order, local ids in order, count up."""
    table, n = {}, 0
    for cam in sorted(set(camids)):
        for local in sorted({lab for c, lab in zip(camids, labels) if c == cam}):
            table[cam, local] = n
            n += 1
    return [table[c, lab] for c, lab in zip(camids, labels)]


# ----------------------------------------------------------------------------------- Market-1501
def test_market1501_labels_and_columns(market_root):
    ds = load_reid_dataset("market1501", market_root)
    train, query, gallery = ds["train"], ds["query"], ds["gallery"]
    assert train.column_names == ["image_path", "camid", "cam_pid", "intra_id", "diagnostic_pid"]
    assert query.column_names == gallery.column_names == ["image_path", "pid", "camid"]
    assert names(train) == sorted(names(train))
    # train: pids 2, 7 in camera 0; 2, 11 in camera 1; 7, 11 in camera 2
    assert col(train, "camid").tolist() == [0, 0, 1, 0, 2, 2, 1, 2]
    assert col(train, "diagnostic_pid").tolist() == [2, 2, 2, 7, 7, 7, 11, 11]
    assert col(train, "intra_id").tolist() == [0, 0, 2, 1, 4, 4, 3, 5]
    assert col(train, "cam_pid").tolist() == [0, 0, 0, 1, 0, 0, 1, 1]
    assert col(train, "intra_id").tolist() == intra_index_reference(
        col(train, "camid").tolist(), col(train, "diagnostic_pid").tolist()
    )
    # junk dropped, distractor kept, Thumbs.db ignored
    assert sorted(col(gallery, "pid").tolist()) == [0, 100, 100, 200]
    assert col(query, "pid").tolist() == [100, 200] and col(query, "camid").tolist() == [0, 1]
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in train["image_path"][:])


def test_parent_folder_and_aliases_are_accepted(market_root):
    a = load_reid_dataset("Market-1501", market_root.parent)
    b = load_reid_dataset("market1501", market_root)
    assert a["train"]["image_path"][:] == b["train"]["image_path"][:]
    assert set(available_datasets()) >= {"market1501", "dukemtmc", "msmt17", "custom", "synthetic"}


def test_summary(market_root):
    info = dataset_summary(load_reid_dataset("market1501", market_root))
    assert (info.num_train_images, info.num_train_identities, info.num_cameras) == (8, 6, 3)
    assert info.identity_camids.tolist() == [0, 0, 1, 1, 2, 2]
    assert info.identity_cam_pids.tolist() == [0, 1, 0, 1, 0, 1]
    assert info.identity_diagnostic_pids.tolist() == [2, 7, 2, 11, 7, 11]
    assert info.identity_num_images.tolist() == [2, 1, 1, 1, 2, 1]
    assert (info.num_query, info.num_gallery, info.num_query_identities) == (2, 4, 2)


def test_intra_camera_index_matches_reference():
    rng = np.random.default_rng(0)
    cams, labels = rng.integers(0, 5, 300), rng.integers(0, 40, 300)
    intra, cam_pid, identity_cams = intra_camera_index(cams, labels)
    assert intra.tolist() == intra_index_reference(cams.tolist(), labels.tolist())
    for c in range(5):  # cam_pid is 0-based contiguous per camera
        assert sorted(set(cam_pid[cams == c].tolist())) == list(range(len(set(labels[cams == c].tolist()))))
    assert (identity_cams[intra] == cams).all()


# -------------------------------------------------------------------------------- DukeMTMC, MSMT
def test_dukemtmc(tmp_path, make_tree):
    make_tree(tmp_path / "DukeMTMC-reID", {
        "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0000001.jpg", "0005_c2_f0000100.jpg"],
        "query": ["0010_c1_f0000001.jpg"],
        "bounding_box_test": ["0010_c3_f0000002.jpg", "0000_c1_f0000003.jpg"],
    })
    ds = load_reid_dataset("dukemtmc", tmp_path)
    assert col(ds["train"], "camid").tolist() == [1, 4, 1]
    assert col(ds["train"], "intra_id").tolist() == [0, 2, 1]
    assert col(ds["gallery"], "pid").tolist() == [0, 10]


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17_list_layouts(make_msmt, version):
    root = make_msmt(version)
    ds = load_reid_dataset("msmt17", root.parent)
    train = ds["train"]
    assert len(train) == 5  # list_train + list_val
    assert col(train, "camid").tolist() == [0, 1, 0, 2, 1]
    assert col(train, "diagnostic_pid").tolist() == [0, 0, 1, 1, 2]
    assert col(train, "intra_id").tolist() == intra_index_reference([0, 1, 0, 2, 1], [0, 0, 1, 1, 2])
    assert col(ds["query"], "camid").tolist() == [3, 4] and col(ds["query"], "pid").tolist() == [0, 1]
    assert len(load_reid_dataset("msmt17", root, include_val=False)["train"]) == 4


def test_msmt17_market_style_copy(tmp_path, make_tree):
    make_tree(tmp_path / "MSMT17", {
        "bounding_box_train": ["0000_c1_0000.jpg", "0000_c14_0001.jpg"],
        "query": ["0100_c2_0000.jpg"],
        "bounding_box_test": ["0100_c15_0003.jpg"],
    })
    ds = load_reid_dataset("msmt17", tmp_path)
    assert col(ds["train"], "camid").tolist() == [13, 0]  # sorted names: "0000_c14_" < "0000_c1_"
    assert col(ds["gallery"], "camid").tolist() == [14]


def test_msmt17_bad_list_line_and_missing_file(make_msmt):
    root = make_msmt("MSMT17_V1")
    good = (root / "list_query.txt").read_text()
    (root / "list_query.txt").write_text(good + "0003/0003_000_01_x_0001_0.jpg 3\n")
    with pytest.raises(ReIDDatasetError, match=r"0003_000_01_x_0001_0\.jpg.*does not exist"):
        load_reid_dataset("msmt17", root)
    (root / "list_query.txt").write_text(good + "just-a-name\n")
    with pytest.raises(ReIDDatasetError, match=r"list_query\.txt:3: 'just-a-name'"):
        load_reid_dataset("msmt17", root)
    (root / "list_query.txt").write_text(good + "0003/badname.jpg 3\n")
    with pytest.raises(ReIDDatasetError, match=r"badname\.jpg.*expected pattern"):
        load_reid_dataset("msmt17", root)
    (root / "list_query.txt").write_text(good)
    (root / "list_val.txt").unlink()
    with pytest.raises(ReIDDatasetError, match="list_val.txt.*include_val=False"):
        load_reid_dataset("msmt17", root)


# -------------------------------------------------------------------------------------- custom
def _custom_rows(root, write_image):
    rows = []
    for cam, ident, n in ((3, "alice", 2), (3, "bob", 1), (7, "alice", 1), (7, "carol", 2)):
        for k in range(n):
            rel = f"imgs/{cam}_{ident}_{k}.png"
            write_image(root / rel)
            rows.append({"path": rel, "camera": cam, "identity": ident, "split": "train", "global_id": ""})
    for split, cam, gid in (("query", 3, 5), ("gallery", 7, 5), ("gallery", 3, 0)):
        rel = f"imgs/{split}_{cam}_{gid}.png"
        write_image(root / rel)
        rows.append({"path": rel, "camera": cam, "identity": "", "split": split, "global_id": gid})
    return rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_custom_manifest(tmp_path, write_image, write_manifest, suffix):
    manifest = write_manifest(tmp_path / f"data{suffix}", _custom_rows(tmp_path, write_image))
    ds = load_reid_dataset("custom", manifest)
    train = ds["train"]
    assert col(train, "camid").tolist() == [0, 0, 0, 1, 1, 1]  # cameras 3, 7 -> 0, 1
    assert col(train, "cam_pid").tolist() == [0, 0, 1, 0, 1, 1]  # alice, bob | alice, carol
    assert col(train, "intra_id").tolist() == [0, 0, 1, 2, 3, 3]
    assert col(train, "diagnostic_pid").tolist() == [-1] * 6
    assert dataset_summary(ds).identity_diagnostic_pids is None
    assert col(ds["query"], "pid").tolist() == [5] and col(ds["gallery"], "pid").tolist() == [5, 0]
    assert train["image_path"][0] == str(tmp_path / "imgs" / "3_alice_0.png")
    # a folder holding manifest.csv is read the same way
    if suffix == ".csv":
        manifest.rename(tmp_path / "manifest.csv")
        assert load_reid_dataset("custom", tmp_path)["train"]["image_path"][:] == train["image_path"][:]


def test_custom_manifest_errors(tmp_path, write_image, write_manifest):
    rows = _custom_rows(tmp_path, write_image)

    def load_with(changed_rows, suffix=".csv"):
        return load_reid_dataset("custom", write_manifest(tmp_path / f"m{suffix}", changed_rows))

    with pytest.raises(ReIDDatasetError, match=r"missing column\(s\) \['camera'\]"):
        load_with([{k: v for k, v in r.items() if k != "camera"} for r in rows])
    with pytest.raises(ReIDDatasetError, match=r"m\.jsonl:1: missing field\(s\) \['split'\]"):
        load_with([{k: v for k, v in r.items() if k != "split"} for r in rows], ".jsonl")
    with pytest.raises(ReIDDatasetError, match=r"m\.csv:3: unknown split 'validation'"):
        load_with([{**r, "split": "validation"} if i == 1 else r for i, r in enumerate(rows)])
    with pytest.raises(ReIDDatasetError, match=r"m\.csv:2: camera 'cam3' is not an integer"):
        load_with([{**r, "camera": "cam3"} if i == 0 else r for i, r in enumerate(rows)])
    with pytest.raises(ReIDDatasetError, match="query rows need an integer global_id"):
        load_with([{**r, "global_id": ""} if r["split"] == "query" else r for r in rows])
    with pytest.raises(ReIDDatasetError, match=r"nothere\.png.*does not exist"):
        load_with([{**r, "path": "imgs/nothere.png"} if i == 2 else r for i, r in enumerate(rows)])
    with pytest.raises(ReIDDatasetError, match="single camera.*cross-camera learning is impossible"):
        load_with([r for r in rows if not (r["split"] == "train" and r["camera"] == 7)])


def test_custom_folder_layouts(tmp_path, make_tree):
    make_tree(tmp_path / "split", {
        "train/gate/anna": ["a.jpg", "b.jpg"], "train/gate/ben": ["a.jpg"], "train/lobby/anna": ["x.jpg"],
        "query/gate/12": ["q.jpg"], "gallery/lobby/12": ["g.jpg"], "gallery/gate/0": ["d.jpg"],
    })
    ds = load_reid_dataset("custom", tmp_path / "split")
    assert col(ds["train"], "camid").tolist() == [0, 0, 0, 1]  # gate, lobby
    assert col(ds["train"], "intra_id").tolist() == [0, 0, 1, 2]
    assert col(ds["gallery"], "camid").tolist() == [0, 1] and col(ds["gallery"], "pid").tolist() == [0, 12]

    make_tree(tmp_path / "trainonly", {"2/p1": ["a.jpg"], "10/p1": ["a.jpg", "b.jpg"], "10/p2": ["c.jpg"]})
    ds = load_reid_dataset("custom", tmp_path / "trainonly")
    assert len(ds["query"]) == len(ds["gallery"]) == 0
    by_camera = dict(zip(names(ds["train"]), col(ds["train"], "camid").tolist()))
    assert sorted(col(ds["train"], "camid").tolist()) == [0, 1, 1, 1]  # "2" < "10" numerically
    assert len(by_camera) == 3

    make_tree(tmp_path / "stray", {"cam1/p1": ["a.jpg"], "cam2": ["loose.jpg"]})
    with pytest.raises(ReIDDatasetError, match=r"loose\.jpg: images must sit in identity folders"):
        load_reid_dataset("custom", tmp_path / "stray")
    make_tree(tmp_path / "badgid", {"train/c1/a": ["a.jpg"], "train/c2/a": ["a.jpg"], "query/c1/bob": ["q.jpg"],
                                    "gallery/c2/bob": ["g.jpg"]})
    with pytest.raises(ReIDDatasetError, match="identity folder .*'bob' is not an integer"):
        load_reid_dataset("custom", tmp_path / "badgid")


# ------------------------------------------------------------------------------------ bad input
def test_missing_root_and_split_folders(tmp_path, market_root):
    with pytest.raises(ReIDDatasetError, match="does not exist"):
        load_reid_dataset("market1501", tmp_path / "nowhere")
    with pytest.raises(ReIDDatasetError, match="holds none of"):
        load_reid_dataset("dukemtmc", market_root / "query")
    os.rename(market_root / "bounding_box_test", market_root / "elsewhere")
    with pytest.raises(ReIDDatasetError, match=r"missing folder .*bounding_box_test"):
        load_reid_dataset("market1501", market_root)


def test_empty_split(market_root):
    for f in (market_root / "query").iterdir():
        f.unlink()
    with pytest.raises(ReIDDatasetError, match="the query split .* is empty"):
        load_reid_dataset("market1501", market_root)


def test_bad_file_names(market_root, write_image):
    write_image(market_root / "bounding_box_train" / "0003_cam1_000001.jpg")
    with pytest.raises(ReIDDatasetError, match=r"0003_cam1_000001\.jpg: file name does not follow .*0002_c1s1_000451_03"):
        load_reid_dataset("market1501", market_root)
    (market_root / "bounding_box_train" / "0003_cam1_000001.jpg").unlink()
    write_image(market_root / "query" / "0003_c0s1_000001_01.jpg")
    with pytest.raises(ReIDDatasetError, match=r"0003_c0s1_000001_01\.jpg: camera numbers .* start at 1"):
        load_reid_dataset("market1501", market_root)


def test_single_camera_train(tmp_path, make_tree):
    make_tree(tmp_path, {"bounding_box_train": ["0001_c1s1_000001_01.jpg", "0002_c1s1_000001_01.jpg"],
                         "query": ["0003_c1s1_000001_01.jpg"], "bounding_box_test": ["0003_c2s1_000001_01.jpg"]})
    with pytest.raises(ReIDDatasetError, match="single camera .*cross-camera learning is impossible"):
        load_reid_dataset("market1501", tmp_path)


def test_query_without_cross_camera_match_warns(market_root, write_image, caplog):
    write_image(market_root / "query" / "0300_c1s1_000001_00.jpg")  # no gallery image at all
    write_image(market_root / "query" / "0400_c2s1_000001_00.jpg")
    write_image(market_root / "bounding_box_test" / "0400_c2s1_000009_01.jpg")  # same camera only
    with caplog.at_level(logging.WARNING, logger="ccafl_hf.data"):
        ds = load_reid_dataset("market1501", market_root)
    assert len(ds["query"]) == 4
    assert "2 of 4 query images have no gallery image of the same identity from another camera" in caplog.text


def test_corrupt_images(market_root, caplog):
    bad = market_root / "bounding_box_train" / "0011_c2s1_004000_01.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    assert len(load_reid_dataset("market1501", market_root)["train"]) == 8  # lazy by default
    with pytest.raises(ReIDDatasetError, match=r"0011_c2s1_004000_01\.jpg: corrupt or unreadable"):
        load_reid_dataset("market1501", market_root, verify_images=True)
    with caplog.at_level(logging.WARNING, logger="ccafl_hf.data"):
        ds = load_reid_dataset("market1501", market_root, verify_images=True, on_corrupt="skip")
    assert len(ds["train"]) == 7 and "skipping 1 unreadable images" in caplog.text
    assert dataset_summary(ds).num_train_identities == 5  # identity (camera 1, pid 11) is gone


def test_unknown_name_and_options(market_root):
    with pytest.raises(ReIDDatasetError, match="unknown dataset 'cuhk03'"):
        load_reid_dataset("cuhk03", market_root)
    with pytest.raises(ReIDDatasetError, match=r"unknown option\(s\) \['include_val'\]"):
        load_reid_dataset("market1501", market_root, include_val=True)
    with pytest.raises(ValueError, match="on_corrupt"):
        load_reid_dataset("market1501", market_root, on_corrupt="ignore")


def test_custom_train_only_manifest_and_pid_alias(tmp_path, write_image, write_manifest, caplog):
    rows = [r for r in _custom_rows(tmp_path, write_image) if r["split"] == "train"]
    rows = [{**{k: v for k, v in r.items() if k != "global_id"}, "pid": 40 + i % 2} for i, r in enumerate(rows)]
    with caplog.at_level(logging.WARNING, logger="ccafl_hf.data"):
        ds = load_reid_dataset("custom", write_manifest(tmp_path / "train.csv", rows))
    assert len(ds["query"]) == len(ds["gallery"]) == 0 and "cannot be evaluated" in caplog.text
    assert col(ds["train"], "diagnostic_pid").tolist() == [40, 41, 40, 41, 40, 41]
