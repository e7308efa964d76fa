"""🤗 datasets as a source: a save_to_disk folder, parquet files and a single parquet table give the same
labels and pixels as the image files they were made from; every kind of bad input is one clear error."""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Image, Value, concatenate_datasets
from PIL import Image as PILImage
from torch.utils.data import DataLoader

from ccafl_hf.data import (
    RandomIdentitySampler,
    ReIDCollator,
    ReIDDatasetError,
    available_datasets,
    build_eval_transform,
    dataset_summary,
    load_image,
    load_reid_dataset,
)

TINY = dict(num_train_identities=6, num_test_identities=4, num_cameras=3, images_per_identity_per_camera=2,
            image_size=(32, 16), num_distractors=2)
LABELS = {"train": ("camid", "cam_pid", "intra_id", "diagnostic_pid"), "query": ("pid", "camid"),
          "gallery": ("pid", "camid")}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
STORED_IMAGE = Image()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny synthetic dataset read from its image files (the ground truth of every hf source)."""
    return load_reid_dataset("synthetic", tmp_path_factory.mktemp("synthetic") / "tiny", **TINY)


def as_hf(reference: DatasetDict, camera, identity, uniform: bool = False) -> dict[str, Dataset]:
    """The reference in the hf reader's default columns, images stored in Arrow. ``camera`` / ``identity``
    encode camid / cam_pid (any order-preserving code); ``uniform`` gives every split the same columns
    (nulls where a split has no value) and a ``split`` column."""
    features = {"image": Image(), "camera": Value("string" if isinstance(camera(0), str) else "int64"),
                "identity": Value("string" if isinstance(identity(0), str) else "int64"), "pid": Value("int64")}
    splits = {}
    for split, table in reference.items():
        n = len(table)
        columns = {"image": table["image_path"][:], "camera": [camera(c) for c in table["camid"][:]]}
        if split == "train":
            columns["identity"] = [identity(p) for p in table["cam_pid"][:]]
            columns["pid"] = table["diagnostic_pid"][:]
        else:
            columns["pid"] = table["pid"][:]
            if uniform:
                columns["identity"] = [None] * n
        split_features = {k: v for k, v in features.items() if k in columns}
        if uniform:
            columns["split"] = [split] * n
            split_features["split"] = Value("string")
        splits[split] = Dataset.from_dict(columns, features=Features(split_features))
    return splits


@pytest.fixture(scope="module")
def sources(reference, tmp_path_factory):
    """One folder per form: ``save_to_disk`` (string cameras and identities), parquet files per split
    (integer cameras 10, 20, 30), one parquet table with a split column."""
    root = tmp_path_factory.mktemp("hf_sources")
    DatasetDict(as_hf(reference, lambda c: f"cam-{c}", lambda p: f"person{p:02d}")).save_to_disk(root / "saved")
    (root / "parquet").mkdir()
    for split, table in as_hf(reference, lambda c: 10 * (c + 1), lambda p: 7 * p + 3).items():
        table.to_parquet(root / "parquet" / f"{split}.parquet")
    table = concatenate_datasets(list(as_hf(reference, lambda c: c, lambda p: p, uniform=True).values()))
    table.to_parquet(root / "table.parquet")
    return {"save_to_disk": root / "saved", "parquet_folder": root / "parquet", "parquet_table": root / "table.parquet"}


def collate(rows):
    return ReIDCollator(build_eval_transform(32, 16, MEAN, STD))(rows)


@pytest.mark.parametrize("form", ["save_to_disk", "parquet_folder", "parquet_table"])
def test_hf_source_equals_the_image_files(form, sources, reference, tmp_path):
    dataset = load_reid_dataset("hf", sources[form], cache_dir=tmp_path / "cache")
    for split, columns in LABELS.items():
        assert dataset[split].column_names == ["image_path", *columns, "image"]
        for column in columns:
            assert dataset[split][column][:] == reference[split][column][:], (split, column)
        # the stored file names survive in image_path
        names = [os.path.basename(p) for p in dataset[split]["image_path"][:]]
        assert names == [os.path.basename(p) for p in reference[split]["image_path"][:]]
    ours, theirs = dataset_summary(dataset), dataset_summary(reference)
    assert ours.num_cameras == theirs.num_cameras == TINY["num_cameras"]
    np.testing.assert_array_equal(ours.identity_diagnostic_pids, theirs.identity_diagnostic_pids)

    # training rows through a sampler and the collator: the pixels of the same images read from their files
    sampler = RandomIdentitySampler(dataset["train"]["intra_id"][:], num_instances=2, batch_size=8, seed=0)
    batches = list(DataLoader(dataset["train"], batch_size=8, sampler=sampler, collate_fn=collate))
    expected = list(DataLoader(reference["train"], batch_size=8, sampler=sampler, collate_fn=collate))
    assert len(batches) == len(expected) > 0
    for got, want in zip(batches, expected):
        assert got.keys() == want.keys() == {"pixel_values", "camids", "intra_ids", "cam_pids"}
        for key in got:
            assert torch.equal(got[key], want[key]), key
    gallery = collate([dataset["gallery"][i] for i in range(len(dataset["gallery"]))])
    assert torch.equal(gallery["pixel_values"], collate(list(reference["gallery"]))["pixel_values"])


def test_path_column_reads_the_files(reference, tmp_path):
    """An image column of file paths (relative to the parquet files' folder) gives ``image_path`` only."""
    folder = tmp_path / "parquet"
    folder.mkdir()
    for split, table in as_hf(reference, lambda c: c, lambda p: p).items():
        relative = [os.path.relpath(p, folder) for p in reference[split]["image_path"][:]]
        table.remove_columns("image").add_column("image", relative).to_parquet(folder / f"{split}.parquet")
    dataset = load_reid_dataset("hf", folder, cache_dir=tmp_path / "cache")
    for split, columns in LABELS.items():
        assert dataset[split].column_names == ["image_path", *columns]
        assert dataset[split]["image_path"][:] == reference[split]["image_path"][:]
    (folder / "query.parquet").unlink()
    Dataset.from_dict({"image": ["missing.jpg"], "camera": [0], "pid": [1]}).to_parquet(folder / "query.parquet")
    with pytest.raises(ReIDDatasetError, match=r"query column 'image' lists '.*missing.jpg', which does not exist"):
        load_reid_dataset("hf", folder, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------ bad input
def png(value: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((8, 4, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def small(**changes) -> dict[str, dict]:
    """Columns of a valid tiny source (2 cameras × 2 identities; one query and two gallery images)."""
    columns = {
        "train": {"image": [png(i) for i in range(8)], "camera": [1, 1, 1, 1, 2, 2, 2, 2],
                  "identity": [5, 5, 9, 9, 5, 5, 8, 8]},
        "query": {"image": [png(20)], "camera": [1], "pid": [3]},
        "gallery": {"image": [png(30), png(31)], "camera": [2, 1], "pid": [3, 0]},
    }
    for key, value in changes.items():
        split, _, column = key.partition("__")
        if value is None:
            columns[split].pop(column) if column else columns.pop(split)
        else:
            columns[split][column] = value
    return columns


def save(columns: dict[str, dict], folder, image_feature=STORED_IMAGE) -> str:
    splits = {}
    for split, table in columns.items():
        dataset = Dataset.from_dict(table)
        if "image" in table and isinstance(table["image"][0], bytes):
            dataset = dataset.cast_column("image", image_feature)
        splits[split] = dataset
    DatasetDict(splits).save_to_disk(folder)
    return str(folder)


@pytest.mark.parametrize("changes,options,message", [
    ({"gallery": None}, {}, r"no split 'gallery' \(splits: \['query', 'train'\]\)"),
    ({}, {"split_names": {"gallery": "test"}}, r"no split 'test'"),
    ({}, {"split_names": {"test": "gallery"}}, r"split_names keys \['test'\]"),
    ({"train__camera": None}, {}, r"hf:.* train: missing column\(s\) \['camera'\]"),
    ({}, {"camera_column": "cam"}, r"train: missing column\(s\) \['cam'\]"),
    ({"train__identity": None, "train__pid": [1] * 8}, {}, r"pass identity_column='pid'"),
    ({"query__pid": [3.0]}, {}, r"query: column 'pid' holds Value\('float64'\); expected integers"),
    ({"gallery__pid": ["3", "0"]}, {}, r"gallery: column 'pid' holds Value\('string'\); expected integers"),
    ({"train__camera": [1, 1, 1, None, 2, 2, 2, 2]}, {}, r"train: column 'camera' is empty in 1 row\(s\), e.g. row 3"),
    ({"train__camera": [1.5] * 8}, {}, r"train: column 'camera' holds Value\('float64'\)"),
    ({"train__camera": [4] * 8}, {}, r"the train split has a single camera"),
    ({"query__image": [3]}, {}, r"query: column 'image' holds Value\('int64'\); expected a datasets Image"),
    ({}, {"image_column": "camera"}, r"train: column 'camera' holds Value\('int64'\); expected a datasets Image"),
    ({}, {"num_identities": 3}, r"dataset 'hf' got unknown option\(s\) \['num_identities'\]"),
])
def test_bad_source_is_one_clear_error(changes, options, message, tmp_path):
    source = save(small(**changes), tmp_path / "source")
    with pytest.raises(ReIDDatasetError, match=message):
        load_reid_dataset("hf", source, **options)


def test_bad_location_is_one_clear_error(tmp_path):
    with pytest.raises(ReIDDatasetError, match="data_dir is required"):
        load_reid_dataset("hf")
    with pytest.raises(ReIDDatasetError, match=r"'\./missing' does not exist \(expected a Hub dataset id"):
        load_reid_dataset("hf", "./missing")
    with pytest.raises(ReIDDatasetError, match="holds no parquet file and no save_to_disk dataset"):
        load_reid_dataset("hf", tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ReIDDatasetError, match="is not a parquet file"):
        load_reid_dataset("hf", tmp_path / "notes.txt")
    Dataset.from_dict(small()["train"]).to_parquet(tmp_path / "train_only_table.parquet")
    with pytest.raises(ReIDDatasetError, match="a single table without a 'split' column"):
        load_reid_dataset("hf", tmp_path / "train_only_table.parquet", cache_dir=tmp_path / "cache")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ReIDDatasetError, match=r"cannot read the parquet files"):
        load_reid_dataset("hf", tmp_path / "broken.parquet", cache_dir=tmp_path / "cache")


def test_offline_hub_dataset_not_cached_is_one_actionable_line(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ReIDDatasetError) as error:
        load_reid_dataset("hf", "someone/reid-dataset-that-is-not-cached", cache_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message and "offline (HF_HUB_OFFLINE=1)" in message and "load it once online" in message


def test_registered_under_its_aliases():
    assert "hf" in available_datasets()
    with pytest.raises(ReIDDatasetError, match="'./missing' does not exist"):
        load_reid_dataset("HuggingFace", "./missing")


def test_train_only_source_and_renamed_columns_and_splits(tmp_path):
    columns = small()
    columns["train"]["cam"] = columns["train"].pop("camera")
    columns["train"]["who"] = [str(v) for v in columns["train"].pop("identity")]
    source = save({"training": columns["train"]}, tmp_path / "source")
    dataset = load_reid_dataset("hf", source, camera_column="cam", identity_column="who",
                                split_names={"train": "training"})
    assert len(dataset["query"]) == len(dataset["gallery"]) == 0
    assert dataset["train"]["camid"][:] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert dataset["train"]["cam_pid"][:] == [0, 0, 1, 1, 0, 0, 1, 1]  # "5" < "9"; "5" < "8"
    assert dataset["train"]["intra_id"][:] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert dataset["train"]["diagnostic_pid"][:] == [-1] * 8  # no pid column: no ground truth


def test_cameras_map_jointly_over_splits(tmp_path):
    """Camera values map to 0-based camids in sorted order over all splits, numerically when every value is
    an integer, even when one split stores them as text."""
    columns = small(train__camera=[10, 10, 10, 10, 9, 9, 9, 9], query__camera=["10"], gallery__camera=["9", "10"])
    dataset = load_reid_dataset("hf", save(columns, tmp_path / "source"))
    assert dataset["train"]["camid"][:] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert dataset["query"]["camid"][:] == [1] and dataset["gallery"]["camid"][:] == [0, 1]


def test_images_as_raw_bytes_or_paths_decode_alike(tmp_path):
    columns = small()
    source = save(columns, tmp_path / "bytes", image_feature=Value("binary"))
    dataset = load_reid_dataset("hf", source)
    assert dataset["train"]["image_path"][:5] == ["train/000000", "train/000001", "train/000002", "train/000003",
                                                  "train/000004"]
    pixels = collate([dataset["train"][i] for i in range(8)])["pixel_values"]
    assert torch.equal(pixels[:, 0, 0, 0], (torch.arange(8) / 255 - 0.5) / 0.25)
    path = tmp_path / "one.png"
    path.write_bytes(png(7))
    reference = np.asarray(load_image(path))
    for source_form in ({"bytes": png(7), "path": None}, {"bytes": None, "path": str(path)}, PILImage.open(path)):
        assert np.array_equal(np.asarray(load_image(source_form)), reference)
    with pytest.raises(ReIDDatasetError, match="image value without bytes or path"):
        load_image({"bytes": None, "path": None})


def test_corrupt_stored_image(tmp_path, caplog):
    columns = small()
    columns["gallery"]["image"][1] = b"not an image"
    source = save(columns, tmp_path / "source", image_feature=Value("binary"))
    with pytest.raises(ReIDDatasetError, match=r"gallery/000001: corrupt or unreadable image \(1 in hf:.* gallery\)"):
        load_reid_dataset("hf", source, verify_images=True)
    with caplog.at_level(logging.WARNING, logger="ccafl_hf.data"):
        dataset = load_reid_dataset("hf", source, verify_images=True, on_corrupt="skip")
    assert "skipping 1 unreadable images" in caplog.text
    assert dataset["gallery"]["pid"][:] == [3] and len(collate([dataset["gallery"][0]])["pixel_values"]) == 1
    rows = list(load_reid_dataset("hf", source)["gallery"])
    with pytest.raises(ReIDDatasetError, match="gallery/000001: corrupt or unreadable image"):
        collate(rows)
    skipped = ReIDCollator(build_eval_transform(32, 16, MEAN, STD), on_corrupt="skip")(rows)
    assert skipped["pids"].tolist() == [3]


def test_junk_rows_are_dropped_with_their_images(tmp_path):
    columns = small(gallery__pid=[-1, 3], gallery__camera=[2, 2])
    dataset = load_reid_dataset("hf", save(columns, tmp_path / "source"))
    assert dataset["gallery"]["pid"][:] == [3]
    assert collate([dataset["gallery"][0]])["pixel_values"][0, 0, 0, 0] == (31 / 255 - 0.5) / 0.25


# ------------------------------------------------------------------------------------------ scripts
def test_evaluate_script_reads_an_hf_source(sources, reference, tmp_path):
    """``ccafl-evaluate --dataset hf --data_dir FOLDER`` gives the metrics of the same images as files."""
    from ccafl_hf import create_tiny_model
    from ccafl_hf.commands import evaluate_main

    model, processor = create_tiny_model(seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--no_progress"]
    assert evaluate_main([*common, "--dataset", "hf", "--data_dir", str(sources["save_to_disk"]),
                          "--output", str(tmp_path / "hf.json")]) == 0
    files_root = os.path.dirname(os.path.dirname(reference["train"]["image_path"][0]))
    assert evaluate_main([*common, "--dataset", "market1501", "--data_dir", files_root,
                          "--output", str(tmp_path / "files.json")]) == 0
    hf, files = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("hf", "files"))
    for key in ("mAP", "rank1", "mINP"):
        assert hf[key] == pytest.approx(files[key], abs=1e-6), key


def test_train_script_reads_an_hf_source(sources, tmp_path, capsys):
    """``scripts/train.py --dataset hf --data_dir FOLDER`` trains every stage on the 🤗 dataset."""
    from ccafl_hf.commands import train_main

    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--model_name_or_path", "tiny", "--dataset", "hf",
            "--data_dir", str(sources["parquet_folder"]), "--dataset_options", json.dumps({"cache_dir": str(tmp_path)}),
            "--prompt_epochs", "1", "--icdl_epochs", "1", "--ical_epochs", "1", "--iters_per_epoch", "1",
            "--num_identities_per_batch", "4", "--ical_image_text_start_epoch", "1", "--adversarial_start_epoch", "1",
            "--adversarial_end_epoch", "2", "--disable_tqdm", "true"]
    assert train_main(argv) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert list(results["stages"]) == ["untrained", "prompt", "icdl", "ical"]
    capsys.readouterr()
    assert train_main(["--output_dir", str(tmp_path / "bad"), "--dataset", "hf", "--data_dir", "./missing"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: hf:./missing: './missing' does not exist"), err
