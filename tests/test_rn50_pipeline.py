"""The tiny RN50 through the main job: all three stages of scripts/train.py, evaluate.py, retrieval."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from ccafl_hf import CCAFLModel
from ccafl_hf.commands import evaluate_main, retrieval_main, train_main
from ccafl_hf.data import ReIDCollator, build_eval_transform
from ccafl_hf.evaluation import evaluate_reid_model
from ccafl_hf.retrieval import FeatureSet
from synthetic_options import SMALL_SYNTHETIC

RUN = [
    "--model_name_or_path", "tiny-rn50", "--dataset_options", json.dumps(SMALL_SYNTHETIC),
    "--prompt_epochs", "2", "--icdl_epochs", "1", "--ical_epochs", "2", "--iters_per_epoch", "3",
    "--ical_image_text_start_epoch", "1", "--adversarial_start_epoch", "2", "--adversarial_end_epoch", "3",
    "--disable_tqdm", "true",
]


@pytest.fixture(scope="module")
def trained_rn50(tmp_path_factory):
    out = tmp_path_factory.mktemp("rn50-run") / "out"
    old = os.environ.get("CCAFL_HF_CACHE")
    os.environ["CCAFL_HF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        assert train_main(["--output_dir", str(out), *RUN]) == 0
    finally:
        if old is None:
            os.environ.pop("CCAFL_HF_CACHE")
        else:
            os.environ["CCAFL_HF_CACHE"] = old
    return out


def test_all_stages_train_the_resnet(trained_rn50):
    results = json.loads((trained_rn50 / "eval_results.json").read_text())
    assert list(results["stages"]) == ["untrained", "prompt", "icdl", "ical"]
    assert all(0.0 <= m["mAP"] <= 1.0 for m in results["stages"].values())
    model = AutoModel.from_pretrained(trained_rn50)
    assert isinstance(model, CCAFLModel) and model.config.is_resnet
    assert (trained_rn50 / "modeling_ccafl_resnet.py").is_file()
    # stages 2-3 trained the tower (GeM exponent included); the text tower stayed frozen
    assert model.vision_model.gem.p.item() != pytest.approx(3.0, abs=1e-7)


def test_evaluate_script_reproduces_the_library(trained_rn50, small_synthetic, tmp_path):
    dataset, _ = small_synthetic
    root = Path(dataset["query"][0]["image_path"]).parent.parent
    output = tmp_path / "results.json"
    argv = ["--model", str(trained_rn50), "--dataset", "synthetic", "--data_dir", str(root),
            "--dataset_options", json.dumps(SMALL_SYNTHETIC), "--output", str(output), "--no_progress",
            "--save_features", str(tmp_path / "features")]
    assert evaluate_main(argv) == 0
    results = json.loads(output.read_text())
    model = AutoModel.from_pretrained(trained_rn50).eval()
    processor = AutoImageProcessor.from_pretrained(trained_rn50)
    collate = ReIDCollator(build_eval_transform(64, 32, processor.image_mean, processor.image_std))
    expected = evaluate_reid_model(model, dataset["query"], dataset["gallery"], collate, progress=False)
    assert results["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)
    gallery = FeatureSet.load(tmp_path / "features" / "gallery.safetensors")
    assert gallery.dim == model.reid_feature_dim == 256


def test_retrieval_finds_exact_copies(trained_rn50, tmp_path):
    rng = np.random.default_rng(0)
    gallery_dir, query_dir = tmp_path / "gallery", tmp_path / "queries"
    gallery_dir.mkdir()
    query_dir.mkdir()
    for i in range(6):
        pixels = rng.integers(0, 256, size=(64, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(gallery_dir / f"img_{i}.png")
        if i % 2:
            Image.fromarray(pixels).save(query_dir / f"img_{i}.png")
    common = ["--model", str(trained_rn50), "--no_progress"]
    gallery_file, out_json = tmp_path / "g.safetensors", tmp_path / "r.json"
    assert retrieval_main(["embed", *common, "--images", str(gallery_dir), "--output", str(gallery_file)]) == 0
    assert retrieval_main(["search", *common, "--gallery", str(gallery_file), "--query_images", str(query_dir),
                           "--k", "2", "--output", str(out_json)]) == 0
    for result in json.loads(out_json.read_text()):
        assert Path(result["matches"][0]["path"]).name == Path(result["query"]).name
        assert result["matches"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(FeatureSet.load(gallery_file).features).all()
