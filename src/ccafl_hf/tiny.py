"""The tiny CCAFL preset: random initialisation, small enough for tests and the CPU demo."""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPProcessor, PreTrainedTokenizerBase

from .configuration_ccafl import CCAFLConfig
from .modeling_ccafl import CCAFLModel
from .processing import build_reid_processor, build_tiny_tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerBase | None = None, **overrides: Any) -> CCAFLConfig:
    """A tiny `CCAFLConfig` (hidden 64, 2 layers, 64x32 input, patch 8) matching ``tokenizer``.

    ``overrides`` are config fields (e.g. ``image_size=(128, 64)``); ``text_config`` /
    ``vision_config`` dicts are merged into the tiny defaults.
    """
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
    }
    text_config.update(overrides.pop("text_config", {}) or {})
    vision_config.update(overrides.pop("vision_config", {}) or {})
    defaults = {"projection_dim": 32, "image_size": (64, 32)}
    defaults.update(overrides)
    return CCAFLConfig(text_config=text_config, vision_config=vision_config, **defaults)


def create_tiny_model(
    seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None, **overrides: Any
) -> tuple[CCAFLModel, CLIPProcessor]:
    """A randomly initialised tiny `CCAFLModel` and its processor (``tokenizer`` default: the tiny
    one built in code; the text vocabulary follows it)."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = tiny_config(tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CCAFLModel(config)
    return model, build_reid_processor(config, tokenizer)


__all__ = ["create_tiny_model", "tiny_config"]
