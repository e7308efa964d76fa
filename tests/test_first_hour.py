"""What a new user meets first: the test cache, the feature-extraction pipeline, loading a saved folder
without ccafl_hf, the onnx hint, a fast error without the Hub, the faiss build and the version."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ccafl_hf
from ccafl_hf import create_tiny_model
from ccafl_hf.utils.cache import cache_dir
from ccafl_hf.utils.hub_utils import hub_local_files_only
from ccafl_hf.utils.neighbors import faiss_build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A tiny CCAFL model with non-trivial BN-neck statistics, saved with its processor."""
    model, processor = create_tiny_model(seed=1)
    with torch.no_grad():
        model.neck.running_mean.normal_(0, 0.5)
        model.neck.running_var.uniform_(0.5, 2.0)
    out = tmp_path_factory.mktemp("saved") / "ccafl-tiny"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, model.eval(), processor


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _run(code: str, tmp_path: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with stdin closed (an interactive prompt would fail)."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=timeout)


def test_tests_use_a_temporary_cache():
    home_cache = Path("~/.cache/ccafl_hf").expanduser()
    assert cache_dir() != home_cache and home_cache not in cache_dir().parents
    assert os.environ["CCAFL_HF_CACHE"] == str(cache_dir())


def test_feature_extraction_pipeline_gives_the_retrieval_features(saved_folder):
    from transformers import pipeline

    out, model, processor = saved_folder
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (80, 40, 3), dtype=np.uint8)) for _ in range(3)]
    extractor = pipeline("image-feature-extraction", model=str(out), trust_remote_code=True)
    features = torch.cat([f for f in extractor(images, return_tensors=True)])  # one [1, D] per image
    with torch.no_grad():
        expected = model.get_reid_features(processor.image_processor(images, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))


def test_saved_folder_loads_without_the_package_and_without_a_prompt(saved_folder, tmp_path):
    out, model, processor = saved_folder
    result = _run(f"""
        import sys
        sys.modules["ccafl_hf"] = None  # this process cannot import the package (even when pip-installed)
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor
        image_processor = AutoImageProcessor.from_pretrained({str(out)!r})
        processor = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
        model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)
        print(type(processor).__name__, type(image_processor).__name__, type(model).__name__)
        print(dict(image_processor.size)["height"], dict(processor.image_processor.size)["width"])
        print(" ".join(processor.tokenizer.tokenize("a photo of a person")))
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom code" not in result.stdout + result.stderr  # no "Do you wish to run the custom code?"
    lines = result.stdout.split("\n")
    assert lines[0] == "CLIPProcessor CLIPImageProcessor CCAFLModel"
    assert lines[1] == "64 32"
    assert lines[2] == " ".join(processor.tokenizer.tokenize("a photo of a person"))


def test_export_onnx_without_onnx_names_the_install_command(saved_folder, tmp_path):
    out, _, _ = saved_folder
    output = tmp_path / "m.onnx"
    result = _run(f"""
        import sys
        sys.modules["onnx"] = None  # as if onnx were not installed
        from ccafl_hf.commands.retrieval import retrieval_main
        # a real model folder, and one that does not exist: the check comes before the model is loaded
        for model in ({str(out)!r}, {str(tmp_path / "no-such-model")!r}):
            print(retrieval_main(["export-onnx", "--model", model, "--output", {str(output)!r}]))
    """, tmp_path)
    assert result.stdout.split() == ["2", "2"], result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == 2 * [
        'error: ONNX export needs the onnx package, which is not installed: pip install "ccafl-hf[onnx]"']
    assert not output.exists()


def test_clip_weights_offline_fail_fast():
    from ccafl_hf import CCAFLModel

    start = time.perf_counter()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set.*hf download openai/clip-vit-base-patch16"):
        CCAFLModel.from_clip("openai/clip-vit-base-patch16")  # the tests run with HF_HUB_OFFLINE=1
    assert time.perf_counter() - start < 10


def test_clip_weights_with_the_hub_unreachable_fail_fast(tmp_path):
    """Not cached, not offline, Hub unreachable: the one-line error comes at once (huggingface_hub alone
    retries for about 50 s)."""
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = _run("""
        import time
        from ccafl_hf import CCAFLModel
        start = time.perf_counter()
        try:
            CCAFLModel.from_clip("openai/clip-vit-base-patch16")
        except OSError as error:
            print(f"{time.perf_counter() - start:.2f}")
            print(error)
    """, tmp_path, env)
    seconds, message = result.stdout.strip().split("\n", 1)
    assert float(seconds) < 10, result.stdout
    assert "the Hub could not be reached" in message and "hf download openai/clip-vit-base-patch16" in message


def test_hub_local_files_only(tmp_path):
    assert not hub_local_files_only(tmp_path)  # a local folder never asks the Hub
    assert hub_local_files_only("openai/clip-vit-base-patch16")  # the tests run with HF_HUB_OFFLINE=1


def test_exactly_one_faiss_build():
    """The install metadata never asks for both faiss builds, and exactly one is installed."""
    project = _pyproject()
    faiss_packages = {"faiss-cpu", "faiss-gpu-cu12"}

    def names(requirements):
        return {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip() for r in requirements}

    assert not names(project["dependencies"]) & faiss_packages
    extras = project["optional-dependencies"]
    assert names(extras["cpu"]) & faiss_packages == {"faiss-cpu"}
    assert names(extras["gpu"]) & faiss_packages == {"faiss-gpu-cu12"}
    providers = importlib.metadata.packages_distributions().get("faiss", [])
    assert len(set(providers)) == 1, f"faiss provided by {providers}; keep one of faiss-cpu / faiss-gpu"
    print(f"faiss {faiss_build()} build from {providers[0]}")  # shown with -s / -rA


def test_version_has_one_home():
    project = _pyproject()
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("ccafl-hf") == ccafl_hf.__version__
