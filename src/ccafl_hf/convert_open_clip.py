"""Read open_clip RN50 checkpoints (Hub id or folder with ``open_clip_config.json`` +
``open_clip_model.safetensors``) as a CCAFL configuration and state dict.

Only safetensors are read: pickled checkpoints (OpenAI's TorchScript ``RN50.pt``, ``*.bin``) are
refused before anything is opened. Used by `CCAFLModel.from_clip`.

This file is also shipped next to saved weights as custom code (it is imported by
``modeling_ccafl.py``), so it imports nothing from `ccafl_hf`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")

#: open_clip ResNet towers by (layers, width); the converter accepts RN50 only.
RESNET_NAMES = {
    ((3, 4, 6, 3), 64): "RN50",
    ((3, 4, 23, 3), 64): "RN101",
    ((4, 6, 10, 6), 80): "RN50x4",
    ((6, 8, 18, 8), 96): "RN50x16",
    ((3, 15, 36, 10), 128): "RN50x64",
}
EXPECTED = "RN50 (ResNet layers [3, 4, 6, 3], width 64)"
#: text-tower options CLIP's RN50 leaves off and transformers' CLIPTextModel cannot express.
UNSUPPORTED_TEXT_OPTIONS = ("hf_model_name", "embed_cls", "no_causal_mask", "ls_init_value", "proj_bias",
                            "attentional_pool", "final_ln_after_pool")


@dataclass
class OpenCLIPCheckpoint:
    """An open_clip checkpoint found on disk: its ``model_cfg`` and the safetensors file."""

    name: str
    model_cfg: dict[str, Any]
    weights_file: Path


def refuse_pickled(name_or_path: str | os.PathLike) -> None:
    """Raise `ValueError` when ``name_or_path`` is a pickled checkpoint file, or a local folder whose
    only weights are pickled (nothing is unpickled)."""
    path = Path(name_or_path)
    advice = (f"ccafl_hf reads safetensors only and never unpickles a checkpoint: pass a Hub id or folder with "
              f"{OPEN_CLIP_CONFIG} + {OPEN_CLIP_WEIGHTS} (e.g. timm/resnet50_clip.openai) or a transformers CLIP "
              "folder with model.safetensors")
    if path.suffix.lower() in PICKLE_SUFFIXES and not path.is_dir():
        raise ValueError(f"{path}: a pickled checkpoint (TorchScript/pickle). {advice}")
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickled:
            raise ValueError(f"{path}: holds only pickled weights ({', '.join(pickled)}). {advice}")


def find_open_clip_checkpoint(name_or_path: str | os.PathLike) -> OpenCLIPCheckpoint | None:
    """The open_clip checkpoint at ``name_or_path`` (local folder, or Hub id: downloaded or cached),
    or None when it is not in open_clip format (or not reachable: the caller reports that).

    Raises:
        ValueError: an open_clip folder / repo without ``open_clip_model.safetensors``.
    """
    name = os.fspath(name_or_path)
    local = Path(name)
    if local.is_dir():
        config_file = local / OPEN_CLIP_CONFIG
        if not config_file.is_file():
            return None
        weights = local / OPEN_CLIP_WEIGHTS
        if not weights.is_file():
            raise ValueError(f"{local}: has {OPEN_CLIP_CONFIG} but no {OPEN_CLIP_WEIGHTS}; only safetensors are read "
                             "(pickled open_clip_pytorch_model.bin is never unpickled)")
        return OpenCLIPCheckpoint(name, _read_model_cfg(config_file), weights)
    if local.exists():
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    from .utils.hub_utils import hub_local_files_only

    local_only = hub_local_files_only(name)  # offline or unreachable Hub: the cache only, no minute of retries
    try:
        config_file = hf_hub_download(name, OPEN_CLIP_CONFIG, local_files_only=local_only)
    except (OSError, ValueError, HfHubHTTPError):
        return None  # not an open_clip repo, or offline and not cached: the CLIP loader reports it
    try:
        weights = hf_hub_download(name, OPEN_CLIP_WEIGHTS, local_files_only=local_only)
    except (OSError, ValueError, HfHubHTTPError) as error:
        raise ValueError(f"{name}: could not get {OPEN_CLIP_WEIGHTS} ({type(error).__name__}); only safetensors "
                         "are read (pickled open_clip_pytorch_model.bin is never unpickled)") from None
    return OpenCLIPCheckpoint(name, _read_model_cfg(Path(config_file)), Path(weights))


def _read_model_cfg(config_file: Path) -> dict[str, Any]:
    data = json.loads(config_file.read_text())
    model_cfg = data.get("model_cfg", data)
    if "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise ValueError(f"{config_file}: expected an open_clip config with model_cfg.vision_cfg and .text_cfg")
    return model_cfg


def describe_architecture(model_cfg: dict[str, Any]) -> str:
    """A short name of an open_clip image tower, e.g. ``"RN101 (ResNet layers [3, 4, 23, 3], width 64)"``."""
    vision = model_cfg["vision_cfg"]
    if vision.get("timm_model_name"):
        return f"timm image tower {vision['timm_model_name']!r}"
    layers, width = vision.get("layers"), vision.get("width")
    if isinstance(layers, (list, tuple)):
        resnet = f"ResNet layers {list(layers)}, width {width}"
        name = RESNET_NAMES.get((tuple(layers), width))
        return f"{name} ({resnet})" if name else resnet
    return f"ViT (width {width}, {layers} layers, patch {vision.get('patch_size')})"


def open_clip_config_kwargs(checkpoint: OpenCLIPCheckpoint) -> dict[str, Any]:
    """`CCAFLConfig` keyword arguments (text/vision sub-configs, projection size) of an open_clip RN50.

    Raises:
        ValueError: another architecture (one line naming the expected and the found one), or a
            text-tower option transformers' `CLIPTextModel` cannot express.
    """
    cfg = checkpoint.model_cfg
    found = describe_architecture(cfg)
    if not found.startswith("RN50 "):
        raise ValueError(f"{checkpoint.name}: expected an open_clip {EXPECTED} checkpoint, found {found}")
    text = cfg["text_cfg"]
    unsupported = [key for key in UNSUPPORTED_TEXT_OPTIONS if text.get(key)]
    if unsupported or text.get("pool_type", "argmax") != "argmax":
        raise ValueError(f"{checkpoint.name}: text-tower options {unsupported or ['pool_type']} are not CLIP's "
                         "and cannot be converted")
    vision = cfg["vision_cfg"]
    width, vocab = int(text.get("width", 512)), int(text.get("vocab_size", 49408))
    quick_gelu = text_activation_is_quick_gelu(checkpoint)
    text_config = {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": int(width * text.get("mlp_ratio", 4.0)),
        "num_hidden_layers": int(text.get("layers", 12)),
        "num_attention_heads": int(text.get("heads", 8)),
        "max_position_embeddings": int(text.get("context_length", 77)),
        "hidden_act": "quick_gelu" if quick_gelu else "gelu",
        "projection_dim": int(cfg["embed_dim"]),
        "bos_token_id": vocab - 2,  # CLIP's <|startoftext|>, <|endoftext|> close the vocabulary
        "eos_token_id": vocab - 1,
    }
    vision_config = {
        "model_type": "ccafl_resnet_vision",
        "layers": list(vision["layers"]),
        "width": int(vision["width"]),
        "output_dim": int(cfg["embed_dim"]),
        "num_attention_heads": int(vision.get("heads") or vision["width"] * 32 // 64),
        "image_size": int(vision.get("image_size", 224)),
    }
    return {"text_config": text_config, "vision_config": vision_config, "projection_dim": int(cfg["embed_dim"])}


def text_activation_is_quick_gelu(checkpoint: OpenCLIPCheckpoint) -> bool:
    """Whether the text tower uses QuickGELU (OpenAI's CLIP weights) or GELU.

    The config's ``model_cfg.quick_gelu`` decides. open_clip keeps that flag on the pretrained tag rather than
    in every exported config, so a config that does not say is read as QuickGELU when the checkpoint's name
    carries open_clip's ``openai`` tag (e.g. ``timm/resnet50_clip.openai``). Anything else is refused rather
    than guessed: the wrong activation loads without error and silently degrades every text feature.

    Raises:
        ValueError: neither the config nor the name says (one line naming the key to add).
    """
    flag = checkpoint.model_cfg.get("quick_gelu")
    if flag is not None:
        return bool(flag)
    if "openai" in str(checkpoint.name).lower():
        return True
    raise ValueError(f"{checkpoint.name}: its {OPEN_CLIP_CONFIG} does not say whether the text tower uses QuickGELU "
                     "and its name has no 'openai' tag; add \"quick_gelu\": true (OpenAI's CLIP weights) or false "
                     "(weights trained with GELU) to its model_cfg")


_VISION_RULES = [
    (r"^visual\.conv(\d)\.", r"vision_model.stem.conv\1."),
    (r"^visual\.bn(\d)\.", r"vision_model.stem.norm\1."),
    (r"^visual\.layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"vision_model.stages.{int(m[1]) - 1}.{m[2]}.downsample.conv."),
    (r"^visual\.layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"vision_model.stages.{int(m[1]) - 1}.{m[2]}.downsample.norm."),
    (r"^visual\.layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"vision_model.stages.{int(m[1]) - 1}.{m[2]}.conv{m[3]}."),
    (r"^visual\.layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"vision_model.stages.{int(m[1]) - 1}.{m[2]}.norm{m[3]}."),
    (r"^visual\.attnpool\.positional_embedding$", "vision_model.attention_pool.position_embedding"),
    (r"^visual\.attnpool\.([qkv])_proj\.", r"vision_model.attention_pool.\1_proj."),
    (r"^visual\.attnpool\.c_proj\.", "vision_model.attention_pool.out_proj."),
]
_TEXT_RULES = [
    (r"^token_embedding\.weight$", "text_model.embeddings.token_embedding.weight"),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"text_model.encoder.layers.\1.layer_norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"text_model.encoder.layers.\1.layer_norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"text_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"text_model.encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"text_model.encoder.layers.\1.mlp.fc2."),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^logit_scale$", "logit_scale"),
]
_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def convert_open_clip_state_dict(state: dict[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename an open_clip RN50 state dict to `CCAFLModel` keys (attention-pool positions still for
    the checkpoint's square grid). Fused text ``in_proj`` weights are split into q/k/v; the text
    projection (``x @ P``) becomes a linear weight ``P.T``.

    Raises:
        ValueError: keys that belong to no part of CLIP RN50.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key == "attn_mask":
            continue
        if key == "text_projection":
            converted["text_projection.weight"] = value.t().contiguous()
            continue
        fused = _IN_PROJ.match(key)
        if fused:
            prefix = f"text_model.encoder.layers.{fused[1]}.self_attn"
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                converted[f"{prefix}.{part}_proj.{fused[2]}"] = chunk.contiguous()
            continue
        for pattern, replacement in _VISION_RULES + _TEXT_RULES:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                converted[new_key] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{name}: keys that are not part of CLIP RN50: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return converted


def load_open_clip_state_dict(checkpoint: OpenCLIPCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read with safetensors, renamed to `CCAFLModel` keys."""
    from safetensors.torch import load_file

    return convert_open_clip_state_dict(load_file(str(checkpoint.weights_file)), checkpoint.name)


__all__ = [
    "OPEN_CLIP_CONFIG",
    "OPEN_CLIP_WEIGHTS",
    "OpenCLIPCheckpoint",
    "convert_open_clip_state_dict",
    "describe_architecture",
    "find_open_clip_checkpoint",
    "load_open_clip_state_dict",
    "open_clip_config_kwargs",
    "refuse_pickled",
]
