"""CLIP weights → `CCAFLModel` (`CCAFLModel.from_clip`): transformers CLIP (ViT tower) or open_clip RN50.

Kept outside `modeling_ccafl.py`, as transformers keeps its ``convert_*.py`` scripts, so a saved model's
remote code is the modelling files only. The open_clip checkpoint reading is `convert_open_clip`; the Hub
look-ups are `utils.hub_utils`.
"""

from __future__ import annotations

import os

import torch
from transformers import CLIPModel

from .configuration_ccafl import CCAFLConfig
from .convert_open_clip import (
    find_open_clip_checkpoint,
    load_open_clip_state_dict,
    open_clip_config_kwargs,
    refuse_pickled,
)
from .modeling_ccafl import CCAFLModel, resize_position_embeddings
from .modeling_ccafl_resnet import resize_attention_pool_positions
from .utils.hub_utils import hub_local_files_only, hub_offline


def from_clip(
    clip: str | os.PathLike | CLIPModel,
    image_size: tuple[int, int] = (256, 128),
    model_class: type[CCAFLModel] = CCAFLModel,
    **config_kwargs,
) -> CCAFLModel:
    """A ``model_class`` built from a CLIP checkpoint; see `CCAFLModel.from_clip` (its public name)."""
    if not isinstance(clip, CLIPModel):
        refuse_pickled(clip)
        checkpoint = find_open_clip_checkpoint(clip)
        if checkpoint is not None:
            return _from_open_clip(model_class, checkpoint, image_size, **config_kwargs)
        clip = load_clip(clip)
    resnet_only = sorted(set(config_kwargs) & {"last_stride", "gem_p"})
    if resnet_only:
        raise ValueError(f"{', '.join(resnet_only)} only applies to a ResNet (RN50) tower, not to CLIP ViT weights")
    clip_config = clip.config
    config = CCAFLConfig(
        text_config=clip_config.text_config.to_dict(),
        vision_config=clip_config.vision_config.to_dict(),
        projection_dim=clip_config.projection_dim,
        logit_scale_init_value=clip_config.logit_scale_init_value,
        image_size=tuple(image_size),
        **config_kwargs,
    )
    model = model_class(config).to(clip.dtype)
    state = clip.state_dict()
    key = "vision_model.embeddings.position_embedding.weight"
    state[key] = resize_position_embeddings(state[key], config.patch_grid)
    load_converted(model, state, allowed_missing=("neck.",))
    return model


def _from_open_clip(model_class, checkpoint, image_size: tuple[int, int], **config_kwargs) -> CCAFLModel:
    """CCAFL model with the ResNet tower from an open_clip RN50 checkpoint (see `from_clip`)."""
    kwargs = open_clip_config_kwargs(checkpoint)
    for field in ("last_stride", "gem_p"):
        if field in config_kwargs:
            kwargs["vision_config"][field] = config_kwargs.pop(field)
    state = load_open_clip_state_dict(checkpoint)
    config = CCAFLConfig(
        **kwargs, logit_scale_init_value=float(state["logit_scale"]), image_size=tuple(image_size), **config_kwargs
    )
    model = model_class(config)
    key = "vision_model.attention_pool.position_embedding"
    state[key] = resize_attention_pool_positions(state[key], config.patch_grid)
    load_converted(model, state, allowed_missing=("neck.", "vision_model.gem."))
    return model


def load_converted(model: CCAFLModel, state: dict[str, torch.Tensor], allowed_missing: tuple[str, ...]) -> None:
    """Load converted CLIP weights; anything missing (beyond the new ReID parts) or left over is an error."""
    incompatible = model.load_state_dict(state, strict=False)
    unexpected = [k for k in incompatible.unexpected_keys if not k.endswith("position_ids")]
    missing = [k for k in incompatible.missing_keys if not k.startswith(allowed_missing)]
    if missing or unexpected:
        raise ValueError(f"CLIP weights do not fit a CCAFL model: missing {missing}, unexpected {unexpected}")


def load_clip(name_or_path: str | os.PathLike) -> CLIPModel:
    """Load a `CLIPModel`, turning "not found / offline" into one actionable error."""
    try:  # an unreachable Hub is detected once, instead of by a minute of retries
        return CLIPModel.from_pretrained(name_or_path, local_files_only=hub_local_files_only(name_or_path))
    except (OSError, ValueError) as error:
        reason = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub could not be reached or has no such repo"
        raise OSError(
            f"Could not load CLIP weights {str(name_or_path)!r} ({type(error).__name__}: {reason}; it is not a "
            "local folder or cached checkpoint either). Download them on a machine with network access (e.g. "
            f"`hf download {name_or_path} --local-dir ./clip-weights`), copy the folder here and pass its path "
            "instead (--model_name_or_path ./clip-weights)."
        ) from None


__all__ = ["from_clip", "load_clip", "load_converted"]
