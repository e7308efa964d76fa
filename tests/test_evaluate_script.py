"""scripts/evaluate.py: a saved model on a dataset gives the library's metrics; bad inputs give one error line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ccafl_hf import create_tiny_model
from ccafl_hf.commands.evaluate import evaluate_main
from ccafl_hf.data import ReIDCollator, build_eval_transform
from ccafl_hf.evaluation import evaluate_reid_model
from ccafl_hf.retrieval import FeatureSet
from synthetic_options import SMALL_SYNTHETIC

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("mAP", "rank1", "rank5", "rank10", "mINP")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model, processor = create_tiny_model(seed=3)
    folder = tmp_path_factory.mktemp("saved") / "tiny-ccafl"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model.eval(), processor


def _data_args(dataset):
    root = Path(dataset["query"][0]["image_path"]).parent.parent
    return ["--dataset", "synthetic", "--data_dir", str(root), "--dataset_options", json.dumps(SMALL_SYNTHETIC)]


@pytest.mark.parametrize("extra", [[], ["--flip", "--rerank"]], ids=["plain", "flip-rerank"])
def test_evaluate_reproduces_the_library(saved_model, small_synthetic, tmp_path, extra, capsys):
    folder, model, processor = saved_model
    dataset, _ = small_synthetic
    output = tmp_path / "results.json"
    argv = ["--model", str(folder), *_data_args(dataset), "--output", str(output), "--no_progress", *extra]
    if not extra:
        argv += ["--save_ranked_lists", str(tmp_path / "lists"), "--num_lists", "3", "--topk", "4",
                 "--save_features", str(tmp_path / "features")]
    assert evaluate_main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads(output.read_text())

    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    collate = ReIDCollator(build_eval_transform(64, 32, mean, std))
    expected = evaluate_reid_model(model, dataset["query"], dataset["gallery"], collate, progress=False,
                                   flip="--flip" in extra, rerank="--rerank" in extra)
    for key in METRICS:
        assert results[key] == pytest.approx(expected[key], abs=1e-9), key
    assert results["cmc"] == pytest.approx(expected["cmc"], abs=1e-9)
    assert results["settings"]["rerank"] == ("--rerank" in extra)
    assert f"{100 * expected['mAP']:.1f}%" in printed

    if not extra:
        layout_rows = min(3, expected["num_valid_queries"])
        from ccafl_hf.evaluation.visualization import RankedListLayout

        assert Image.open(tmp_path / "lists" / "worst.png").size == RankedListLayout().picture_size(layout_rows, 4)
        assert (tmp_path / "lists" / "best.png").is_file()
        gallery = FeatureSet.load(tmp_path / "features" / "gallery.safetensors")
        assert gallery.absolute_paths() == dataset["gallery"]["image_path"][:]
        assert gallery.pids.tolist() == dataset["gallery"]["pid"][:]


def test_bad_inputs_give_one_error_line(saved_model, small_synthetic, tmp_path, capsys):
    folder, _, _ = saved_model
    dataset, _ = small_synthetic
    cases = [
        (["--model", str(tmp_path / "no_model"), *_data_args(dataset)], "no_model"),
        (["--model", str(folder), "--dataset", "no_such_dataset"], "no_such_dataset"),
        (["--model", str(folder), "--dataset", "synthetic", "--dataset_options", "{oops"], "--dataset_options"),
        (["--model", str(tmp_path), *_data_args(dataset)], "config.json"),
    ]
    for argv, named in cases:
        assert evaluate_main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err


def test_script_reports_a_missing_model(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(tmp_path / "missing"),
         "--dataset", "synthetic"],
        capture_output=True, text=True, timeout=120, env={**_env(), "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --model {tmp_path / 'missing'}: no such model folder"]


def _env():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def _corrupt(kind: str, folder: Path) -> str:
    """Damage a copy of a saved model; return the file name the error must mention."""
    weights, config = folder / "model.safetensors", folder / "config.json"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return "model.safetensors"
    if kind == "garbage":
        weights.write_bytes(bytes(range(256)) * 40)
        return "model.safetensors"
    if kind == "wrong-type":
        values = json.loads(config.read_text())
        values["vision_config"]["hidden_size"] = "wide"
        config.write_text(json.dumps(values))
        return "config.json"
    if kind == "bad-json":
        config.write_text(config.read_text()[:30])
        return "config.json"
    if kind == "pickle-only":
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(str(weights)), folder / "pytorch_model.bin")
        weights.unlink()
        return "pytorch_model.bin"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "wrong-type", "bad-json", "pickle-only"])
def test_damaged_model_folder_is_one_line_naming_the_file(saved_model, tmp_path, capsys, kind):
    import shutil

    from ccafl_hf.commands import retrieval_main

    folder, _, _ = saved_model
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    named = _corrupt(kind, damaged)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 64)).save(images / "a.jpg")
    for main, argv in (
        (evaluate_main, ["--model", str(damaged), "--dataset", "synthetic", "--no_progress"]),
        (retrieval_main, ["embed", "--model", str(damaged), "--images", str(images), "--output",
                          str(tmp_path / "f.safetensors"), "--no_progress"]),
    ):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: --model ") and named in err[0], err
    if kind == "pickle-only":
        assert "safetensors" in err[0]


def test_bad_integer_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        evaluate_main(["--model", "m", "--dataset", "synthetic", "--batch_size", "0"])
    assert exited.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: argument --batch_size: must be an integer >= 1"), err
