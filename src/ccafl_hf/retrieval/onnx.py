"""ONNX export of the image tower: ``pixel_values [B, 3, H, W]`` → retrieval features ``[B, D]``.

The exported graph computes exactly `CCAFLModel.get_reid_features` in eval mode (BN-neck with its
running statistics, L2 normalisation included), with a dynamic batch axis and the model's fixed
``(H, W)``. Preprocessing (resize, mean/std) is not in the graph; the values are stored in the ONNX
file's metadata (``image_size``, ``image_mean``, ``image_std``, ``feature_dim``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..modeling_ccafl import CCAFLModel

logger = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "reid_features"
DEFAULT_OPSET = 17
ONNX_INSTALL = 'pip install "ccafl-hf[onnx]"'


def require_onnx() -> None:
    """Raise a one-line `ImportError` with the install command when `onnx` (needed by
    ``torch.onnx.export``) cannot be imported."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError(f"ONNX export needs the onnx package, which is not installed: {ONNX_INSTALL}") from None


class ReIDFeatureModule(nn.Module):
    """``pixel_values [B, 3, H, W]`` → L2-normalised retrieval features ``[B, D]`` (what is exported)."""

    def __init__(self, model: CCAFLModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_reid_features(pixel_values)


def onnxruntime_available() -> bool:
    """True when `onnxruntime` can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


def export_onnx(
    model: CCAFLModel,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    image_processor: Any = None,
    example_batch_size: int = 2,
) -> Path:
    """Export the image tower of ``model`` to ``path`` (ONNX, dynamic batch axis).

    Args:
        model: a `CCAFLModel`; exported in eval mode and float32 (a float32 copy is made for half
            precision models); its own mode is left as it was.
        opset: ONNX opset version.
        image_processor: the model's image processor; its mean/std go into the file's metadata.
        example_batch_size: batch of the tracing input (any batch size runs afterwards).
    Returns:
        ``path``. Input ``pixel_values`` ``[batch, 3, H, W]`` float32, output ``reid_features`` ``[batch, D]``.
    """
    if not isinstance(model, CCAFLModel):
        raise TypeError(f"export_onnx expects a CCAFLModel, got {type(model).__name__}")
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = model if model.dtype == torch.float32 else copy.deepcopy(model).float()
    height, width = source.config.image_size
    example = torch.randn(example_batch_size, 3, height, width, device=source.device)
    was_training = model.training
    wrapper = ReIDFeatureModule(source).eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # tracing warns about the (constant) input-size check and the legacy exporter; both are expected
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                do_constant_folding=True, dynamo=False,
            )
    finally:
        model.train(was_training)
    _write_metadata(path, source, image_processor)
    logger.info("exported the image tower to %s (opset %d, input [batch, 3, %d, %d])", path, opset, height, width)
    return path


def _write_metadata(path: Path, model: CCAFLModel, image_processor: Any) -> None:
    if importlib.util.find_spec("onnx") is None:
        return
    import onnx

    processor = getattr(image_processor, "image_processor", image_processor)
    props = {
        "image_size": json.dumps(list(model.config.image_size)),
        "feature_dim": str(model.reid_feature_dim),
        "producer": "ccafl_hf",
    }
    for key in ("image_mean", "image_std"):
        if getattr(processor, key, None) is not None:
            props[key] = json.dumps([float(v) for v in getattr(processor, key)])
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def verify_onnx(
    model: CCAFLModel,
    path: str | os.PathLike,
    *,
    pixel_values: torch.Tensor | None = None,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Run the exported file with onnxruntime (CPU) and compare with ``model.get_reid_features``.

    Checks ``pixel_values [B, 3, H, W]`` if given, else random inputs for each of ``batch_sizes``.
    Returns the largest absolute difference.

    Raises:
        ImportError: onnxruntime is not installed.
        ValueError: the difference exceeds ``atol``.
    """
    if not onnxruntime_available():
        raise ImportError("verify_onnx needs onnxruntime: pip install onnxruntime (or the `onnx` extra)")
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file (write one with export_onnx)")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    height, width = model.config.image_size
    if pixel_values is not None:
        inputs = [pixel_values]
    else:
        generator = torch.Generator().manual_seed(seed)
        inputs = [torch.randn(b, 3, height, width, generator=generator) for b in batch_sizes]
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        with torch.no_grad():
            for x in inputs:
                expected = model.get_reid_features(x.to(model.device, model.dtype)).float().cpu().numpy()
                got = session.run([OUTPUT_NAME], {INPUT_NAME: x.float().cpu().numpy()})[0]
                if got.shape != expected.shape:
                    raise ValueError(f"{path}: ONNX output shape {got.shape} differs from the model's {expected.shape}")
                worst = max(worst, float(np.abs(got - expected).max()))
    finally:
        model.train(was_training)
    if worst > atol:
        raise ValueError(f"{path}: ONNX features differ from the model's by {worst:.2e} (> atol {atol:.0e})")
    return worst


__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "ReIDFeatureModule", "export_onnx", "onnxruntime_available",
           "require_onnx", "verify_onnx"]
