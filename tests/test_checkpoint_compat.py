"""A checkpoint written by an earlier layout of the package still loads and gives the same features.

The fixture (tests/fixtures/tiny-vit-63d83ec, see its README) was saved by commit 63d83ec: it loads
through the registered Auto classes with the package imported, and with ``trust_remote_code=True``
(the code exported into the folder) in a process that cannot import ccafl_hf.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel

from ccafl_hf import CCAFLModel

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-vit-63d83ec"


def _pixels(height: int, width: int) -> torch.Tensor:
    """The fixed input the expected features were computed for, ``[2, 3, H, W]``."""
    return torch.linspace(-2, 2, 2 * 3 * height * width).reshape(2, 3, height, width).sin()


def _expected() -> torch.Tensor:
    return load_file(str(FIXTURE / "expected_reid_features.safetensors"))["reid_features"]


def test_old_checkpoint_loads_with_the_package():
    model = AutoModel.from_pretrained(FIXTURE)
    assert isinstance(model, CCAFLModel)  # the package's class, not the exported copy
    model.eval()
    with torch.no_grad():
        features = model.get_reid_features(_pixels(*model.config.image_size))
    torch.testing.assert_close(features, _expected(), rtol=1e-5, atol=1e-6)
    processor = AutoImageProcessor.from_pretrained(FIXTURE)
    assert (processor.size["height"], processor.size["width"]) == tuple(model.config.image_size)


def test_old_checkpoint_loads_with_remote_code_without_the_package(tmp_path):
    script = f"""
import json, sys
sys.modules["ccafl_hf"] = None  # importing ccafl_hf now raises ImportError
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(FIXTURE)!r}, trust_remote_code=True).eval()
assert "ccafl_hf" not in type(model).__module__, type(model).__module__
h, w = model.config.image_size
pixels = torch.linspace(-2, 2, 2 * 3 * h * w).reshape(2, 3, h, w).sin()
with torch.no_grad():
    print(json.dumps(model.get_reid_features(pixels).tolist()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    features = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(features, _expected(), rtol=1e-5, atol=1e-6)
