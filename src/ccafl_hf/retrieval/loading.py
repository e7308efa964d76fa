"""Loading a trained model for inference: the model in eval mode, its image processor and test transform."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..data import build_eval_transform
from ..modeling_ccafl import CCAFLModel
from ..processing import CLIP_MEAN, CLIP_STD
from ..utils.model_files import is_path_like
from .errors import RetrievalError

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ model
def load_reid_model(
    name_or_path: str | os.PathLike, device: torch.device | str | None = None, trust_remote_code: bool = False
) -> tuple[CCAFLModel, Any]:
    """Load a saved CCAFL model (folder or Hub id) in eval mode, and its image processor.

    Returns ``(model, image_processor)``; ``image_processor`` is ``None`` when the checkpoint has
    none (preprocessing then uses CLIP's mean/std, see `eval_transform_for`).

    Raises:
        RetrievalError: not a local folder and not loadable from the Hub cache, or not a CCAFL model.
    """
    from transformers import AutoImageProcessor, AutoModel

    from ..utils.hub_utils import hub_local_files_only, hub_offline

    name = os.fspath(name_or_path)
    local = Path(name)
    if not local.expanduser().exists() and is_path_like(name):
        raise RetrievalError(f"--model {name}: no such model folder")
    if local.is_dir() and not (local / "config.json").is_file():
        raise RetrievalError(f"--model {name}: the folder has no config.json; expected a saved CCAFL model folder")
    try:
        model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code,
                                          local_files_only=hub_local_files_only(name))
    except (OSError, ValueError) as error:
        where = "is not a local folder and is not in the local Hub cache" + (
            " (HF_HUB_OFFLINE is set, so nothing is downloaded)" if hub_offline() else ""
        )
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RetrievalError(
            f"--model {name}: could not load a CCAFL model: {name!r} {where}, or it is not a model folder "
            f"({reason}). Pass a folder written by scripts/train.py, e.g. outputs/ccafl-demo."
        ) from None
    if not isinstance(model, CCAFLModel):
        raise RetrievalError(
            f"--model {name}: {type(model).__name__} is not a CCAFL model (config model_type "
            f"{getattr(model.config, 'model_type', '?')!r}, expected 'ccafl'); convert CLIP weights with "
            "CCAFLModel.from_clip or train one with scripts/train.py"
        )
    try:
        image_processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        logger.warning("%s has no image processor; using CLIP's mean/std at the model's input size", name)
        image_processor = None
    if device is not None:
        model.to(device)
    return model.eval(), image_processor


def eval_transform_for(model: CCAFLModel, image_processor: Any = None):
    """Test-time transform (PIL image → ``[3, H, W]``) at the model's ``image_size`` with the image
    processor's mean/std (a `CLIPProcessor` or its image processor; ``None``: CLIP's mean/std)."""
    processor = getattr(image_processor, "image_processor", image_processor)
    mean = getattr(processor, "image_mean", None) or CLIP_MEAN
    std = getattr(processor, "image_std", None) or CLIP_STD
    height, width = model.config.image_size
    size = getattr(processor, "size", None)
    if isinstance(size, Mapping) and "height" in size and (size["height"], size["width"]) != (height, width):
        logger.warning("image processor size %sx%s differs from the model's %sx%s; using the model's",
                       size["height"], size["width"], height, width)
    return build_eval_transform(height, width, list(mean), list(std))



__all__ = ["eval_transform_for", "load_reid_model"]
