"""Images stored in a 🤗 dataset (an ``image`` column; ``image_path`` is only a name) reach every tool
that draws or embeds them: ``evaluate --save_ranked_lists`` and ``retrieval embed --dataset hf``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from ccafl_hf import create_tiny_model
from ccafl_hf.commands import evaluate_main, retrieval_main
from ccafl_hf.data import load_image, load_reid_dataset
from ccafl_hf.evaluation import split_image_sources
from ccafl_hf.retrieval import FeatureSet

TINY = dict(num_train_identities=4, num_test_identities=4, num_cameras=2, images_per_identity_per_camera=2,
            image_size=(32, 16), num_distractors=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny synthetic dataset as image files: its folder and its splits."""
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    return root, load_reid_dataset("synthetic", root, **TINY)


@pytest.fixture(scope="module")
def stored(files, tmp_path_factory):
    """The same rows as a ``save_to_disk`` folder whose images are bytes named ``stored-<split>-<i>.png``
    (no such file exists, so only the stored bytes can be read)."""
    _, reference = files
    splits = {}
    for split, table in reference.items():
        images = [{"bytes": Path(p).read_bytes(), "path": f"stored-{split}-{i:04d}.png"}
                  for i, p in enumerate(table["image_path"][:])]
        columns = {"image": images, "camera": table["camid"][:]}
        if split == "train":
            columns["identity"] = table["cam_pid"][:]
        columns["pid"] = table["diagnostic_pid"][:] if split == "train" else table["pid"][:]
        features = Features({"image": Image(), **{k: Value("int64") for k in columns if k != "image"}})
        splits[split] = Dataset.from_dict(columns, features=features)
    folder = tmp_path_factory.mktemp("hf") / "saved"
    DatasetDict(splits).save_to_disk(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model, processor = create_tiny_model(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_split_image_sources_reads_stored_images(stored, files):
    split = load_reid_dataset("hf", stored)["query"]
    sources = split_image_sources(split)
    assert len(sources) == len(split) and split["image_path"][0] == "stored-query-0000.png"
    decoded = np.asarray(load_image(sources[1]))
    expected = np.asarray(PILImage.open(files[1]["query"]["image_path"][1]).convert("RGB"))
    np.testing.assert_array_equal(decoded, expected)


def test_evaluate_draws_ranked_lists_of_stored_images(stored, files, model_dir, tmp_path):
    """The ranked-list pictures of the stored images equal those of the same images as files."""
    root, _ = files
    common = ["--model", str(model_dir), "--no_progress", "--num_lists", "3", "--topk", "4"]
    assert evaluate_main([*common, "--dataset", "hf", "--data_dir", str(stored),
                          "--save_ranked_lists", str(tmp_path / "hf"), "--save_features", str(tmp_path / "hf")]) == 0
    assert evaluate_main([*common, "--dataset", "synthetic", "--data_dir", str(root),
                          "--dataset_options", json.dumps(TINY), "--save_ranked_lists", str(tmp_path / "files")]) == 0
    for name in ("worst.png", "best.png"):
        hf, on_disk = (np.asarray(PILImage.open(tmp_path / run / name)) for run in ("hf", "files"))
        np.testing.assert_array_equal(hf, on_disk)
    summary = json.loads((tmp_path / "hf" / "ranked_lists.json").read_text())
    assert summary["worst"][0]["query"].startswith("stored-query-")  # named by the stored names
    query = FeatureSet.load(tmp_path / "hf" / "query.safetensors")
    assert query.root is None and query.paths[0] == "stored-query-0000.png"


def test_retrieval_embeds_stored_images(stored, files, model_dir, tmp_path):
    """``embed --dataset hf`` gives the features of the same images embedded from their files."""
    root, reference = files
    common = ["embed", "--model", str(model_dir), "--split", "gallery", "--no_progress"]
    assert retrieval_main([*common, "--dataset", "hf", "--data_dir", str(stored),
                           "--output", str(tmp_path / "hf.safetensors")]) == 0
    assert retrieval_main([*common, "--dataset", "synthetic", "--data_dir", str(root),
                           "--dataset_options", json.dumps(TINY), "--output", str(tmp_path / "files.safetensors")]) == 0
    hf, on_disk = FeatureSet.load(tmp_path / "hf.safetensors"), FeatureSet.load(tmp_path / "files.safetensors")
    assert hf.paths == [f"stored-gallery-{i:04d}.png" for i in range(len(reference["gallery"]))]
    np.testing.assert_allclose(hf.features.numpy(), on_disk.features.numpy(), atol=1e-6)
    assert hf.pids.tolist() == on_disk.pids.tolist() and hf.camids.tolist() == on_disk.camids.tolist()
