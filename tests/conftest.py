"""Shared fixtures: offline Hub, a temporary package cache, tiny models, small synthetic data."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Everything the package caches (synthetic datasets, pre-trained models) goes to a temporary folder
# for this session, never to the user's ~/.cache/ccafl_hf; subprocesses inherit it.
_CACHE = tempfile.mkdtemp(prefix="ccafl_hf-test-cache-")
os.environ["CCAFL_HF_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_model():
    """A tiny randomly initialised CCAFL model (eval mode) and its processor."""
    from ccafl_hf import create_tiny_model

    model, processor = create_tiny_model(seed=0)
    return model.eval(), processor


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory):
    """A tiny random CCAFL model and its processor saved in a folder (seed 0)."""
    from ccafl_hf import create_tiny_model

    model, processor = create_tiny_model(seed=0)
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """A small synthetic multi-camera dataset (DatasetDict) and its summary."""
    from ccafl_hf.data import dataset_summary, load_reid_dataset
    from synthetic_options import SMALL_SYNTHETIC

    root = tmp_path_factory.mktemp("synthetic") / "small"
    dataset = load_reid_dataset("synthetic", root, **SMALL_SYNTHETIC)
    return dataset, dataset_summary(dataset)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One small end-to-end run (all stages, `training_runs.SMALL_RUN`) of the train script's entry point:
    ``(output folder, package cache)``."""
    from ccafl_hf.commands import train_main
    from training_runs import SMALL_RUN

    out = tmp_path_factory.mktemp("run") / "out"
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("CCAFL_HF_CACHE")
    os.environ["CCAFL_HF_CACHE"] = str(cache)
    threads = torch.get_num_threads()
    try:
        assert train_main(["--output_dir", str(out), *SMALL_RUN]) == 0
        assert torch.get_num_threads() == threads  # --num_threads is for the run only
    finally:
        os.environ["CCAFL_HF_CACHE"] = old if old is not None else _CACHE
    return out, cache
