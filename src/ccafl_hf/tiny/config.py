"""The tiny CCAFL presets: random initialisation, small enough for tests and the CPU demo.

Two image towers, like the full-size models: ``backbone="vit"`` (``--model_name_or_path tiny``) and
``backbone="rn50"`` (``tiny-rn50``: CLIP's modified ResNet, 1 block per stage, width 8).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPProcessor, CLIPTextConfig, CLIPVisionConfig, PreTrainedTokenizerBase

from ..configuration_ccafl import CCAFLConfig, CCAFLResNetVisionConfig
from ..modeling_ccafl import CCAFLModel
from ..processing import build_reid_processor
from .tokenizer import build_tiny_tokenizer

#: ``--model_name_or_path`` names of the randomly initialised tiny models → their image tower.
TINY_MODELS = {"tiny": "vit", "tiny-rn50": "rn50"}

#: Vision config of the tiny ResNet: CLIP's RN50 layout with 1 block per stage and width 8 (layer4:
#: 256 channels, a 4x2 map at 64x32 with last stride 1).
TINY_RESNET_VISION = {"model_type": "ccafl_resnet_vision", "layers": [1, 1, 1, 1], "width": 8, "output_dim": 32,
                      "num_attention_heads": 4, "image_size": 32}


def tiny_config(
    tokenizer: PreTrainedTokenizerBase | None = None, backbone: str = "vit", **overrides: Any
) -> CCAFLConfig:
    """A tiny `CCAFLConfig` (text hidden 64, 2 layers, 64x32 input) matching ``tokenizer``.

    ``backbone``: ``"vit"`` (hidden 64, 2 layers, patch 8) or ``"rn50"`` (`TINY_RESNET_VISION`).
    ``overrides`` are config fields (e.g. ``image_size=(128, 64)``); ``text_config`` /
    ``vision_config`` dicts are merged into the tiny defaults.
    """
    if backbone not in ("vit", "rn50"):
        raise ValueError(f"backbone must be 'vit' or 'rn50', got {backbone!r}")
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    text_config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 8,
        "image_size": 32,
    } if backbone == "vit" else dict(TINY_RESNET_VISION)
    text_overrides, vision_overrides = overrides.pop("text_config", {}) or {}, overrides.pop("vision_config", {}) or {}
    _refuse_unknown(overrides, CCAFLConfig(), "")
    _refuse_unknown(text_overrides, CLIPTextConfig(), "text_config.")
    _refuse_unknown(vision_overrides, CLIPVisionConfig() if backbone == "vit" else CCAFLResNetVisionConfig(),
                    "vision_config.")
    text_config.update(text_overrides)
    vision_config.update(vision_overrides)
    defaults = {"projection_dim": 32, "image_size": (64, 32)}
    defaults.update(overrides)
    return CCAFLConfig(text_config=text_config, vision_config=vision_config, **defaults)


def _refuse_unknown(overrides: dict, config, prefix: str) -> None:
    """A `ValueError` naming the first key of ``overrides`` that is not a field of ``config`` (a typo would
    otherwise be stored in the config and change nothing)."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'the overrides'} must be a JSON object, got {overrides!r}")
    known = set(config.to_dict()) | {f for f in vars(type(config)) if not f.startswith("_")}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config field {prefix}{unknown[0]} (not a field of {type(config).__name__})")


def create_tiny_model(
    seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None, backbone: str = "vit", **overrides: Any
) -> tuple[CCAFLModel, CLIPProcessor]:
    """A randomly initialised tiny `CCAFLModel` and its processor (``tokenizer`` default: the tiny
    one built in code; the text vocabulary follows it). ``backbone``: ``"vit"`` or ``"rn50"``."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = tiny_config(tokenizer, backbone=backbone, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CCAFLModel(config)
    return model, build_reid_processor(config, tokenizer)


__all__ = ["TINY_MODELS", "TINY_RESNET_VISION", "create_tiny_model", "tiny_config"]
