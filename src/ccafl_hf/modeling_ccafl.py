"""CCAFL model: transformers' `CLIPModel` with a ReID input grid, a BN-neck and a prompt-embedding text path.

This file is also shipped next to saved weights as custom code (`trust_remote_code=True`), so it
imports nothing from `ccafl_hf`: only torch, transformers and the sibling configuration file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel
from transformers.masking_utils import create_causal_mask
from transformers.models.clip.configuration_clip import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
from transformers.utils import ModelOutput

from .configuration_ccafl import CCAFLConfig


def resize_position_embeddings(weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize ViT position embeddings ``[1 + S*S, D]`` of a square grid to ``[1 + h*w, D]``.

    The class-token embedding (row 0) is kept as is. Returns the input unchanged when the grid
    already has the requested size.
    """
    num_patches = weight.shape[0] - 1
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"expected a square grid of position embeddings, got {num_patches} patch positions")
    height, width = grid
    if (side, side) == (height, width):
        return weight
    cls_pos, patch_pos = weight[:1], weight[1:]
    patch_pos = patch_pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(height, width), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(height * width, -1).to(weight.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


class CCAFLVisionEmbeddings(CLIPVisionEmbeddings):
    """CLIP patch + position embeddings for a non-square ``(height, width)`` input.

    Position embeddings are stored for the ``(height / patch, width / patch)`` grid, so nothing is
    interpolated at run time.
    """

    def __init__(self, config: CLIPVisionConfig, image_size: tuple[int, int]):
        super().__init__(config)
        height, width = image_size
        self.image_size = (height, width)
        self.grid = (height // self.patch_size, width // self.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.position_ids = nn.Buffer(torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        if (height, width) != self.image_size:
            raise ValueError(
                f"pixel_values are {height}x{width} (height x width) but the model expects "
                f"{self.image_size[0]}x{self.image_size[1]}; resize with the model's image processor"
            )
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(dtype=target_dtype)).flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        return embeddings + self.position_embedding(self.position_ids)


@dataclass
class CCAFLOutput(ModelOutput):
    """
    Outputs of [`CCAFLModel.forward`].

    Args:
        reid_features (`torch.FloatTensor` of shape `(batch_size, dim)`):
            L2-normalised retrieval feature (the one evaluation, memories and association use).
        pooled_features (`torch.FloatTensor` of shape `(batch_size, vision_hidden_size)`):
            Pooled image feature before the neck (post-LN class token).
        neck_features (`torch.FloatTensor` of shape `(batch_size, vision_hidden_size)`):
            Pooled feature after the BN-neck (equal to `pooled_features` when there is no neck).
        alignment_features (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            CLIP-projected image embedding, used only by the image-text losses.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + num_patches, vision_hidden_size)`):
            Vision tower tokens.
    """

    reid_features: torch.FloatTensor | None = None
    pooled_features: torch.FloatTensor | None = None
    neck_features: torch.FloatTensor | None = None
    alignment_features: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class CCAFLModel(CLIPModel):
    """`CLIPModel` for intra-camera supervised person re-identification (METHOD.md §2).

    Adds to CLIP: a ``(height, width)`` ReID input grid with stored position embeddings, a BN-neck on
    the pooled image feature, [`get_reid_features`] (the retrieval feature) and
    [`encode_prompt_embeddings`] (text tower on token *embeddings*, pooled at end-of-text) for
    learnable identity prompts. `get_text_features` / `get_image_features` behave as in CLIP.
    """

    config_class = CCAFLConfig
    config: CCAFLConfig
    main_input_name = "pixel_values"

    def __init__(self, config: CCAFLConfig):
        super().__init__(config)
        self.vision_model.embeddings = CCAFLVisionEmbeddings(config.vision_config, config.image_size)
        self.neck = nn.BatchNorm1d(self.vision_embed_dim) if config.neck == "bnneck" else nn.Identity()
        if isinstance(self.neck, nn.BatchNorm1d):
            self.neck.bias.requires_grad_(False)  # BNNeck: the shift is not learnt
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.BatchNorm1d):
            module.weight.fill_(1.0)
            module.bias.zero_()
            if module.running_mean is not None:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()

    # ----------------------------------------------------------------------------------- image path
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> CCAFLOutput:
        """ReID forward of the image tower.

        Args:
            pixel_values: ``[B, 3, H, W]`` images at the config's ``image_size``.

        Returns:
            [`CCAFLOutput`] with the retrieval feature before/after the neck, the L2-normalised
            retrieval feature and the projected alignment feature.
        """
        vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        pooled = vision_outputs.pooler_output
        neck = self.neck(pooled)
        alignment = self.visual_projection(pooled)
        choice = {"neck": neck, "pooled": pooled, "projection": alignment}[self.config.reid_feature]
        return CCAFLOutput(
            reid_features=F.normalize(choice.float(), dim=-1),
            pooled_features=pooled,
            neck_features=neck,
            alignment_features=alignment,
            last_hidden_state=vision_outputs.last_hidden_state,
        )

    def get_reid_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised retrieval features ``[B, D]`` of ``pixel_values [B, 3, H, W]`` (METHOD.md §2)."""
        return self.forward(pixel_values).reid_features

    @property
    def reid_feature_dim(self) -> int:
        """Dimension ``D`` of `get_reid_features`."""
        return self.projection_dim if self.config.reid_feature == "projection" else self.vision_embed_dim

    # ------------------------------------------------------------------------------------ text path
    def encode_prompt_embeddings(self, inputs_embeds: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        """Projected text features ``[B, P]`` of prompt token *embeddings*.

        Args:
            inputs_embeds: ``[B, L, text_hidden]`` token embeddings (e.g. CLIP's token embeddings with
                learnable vectors spliced in at the placeholder positions), without position embeddings.
            eot_positions: ``[B]`` index of the end-of-text token of each sequence (the pooled position).
        """
        text_model = self.text_model
        seq_len = inputs_embeds.shape[1]
        hidden = text_model.embeddings(inputs_embeds=inputs_embeds, position_ids=text_model.embeddings.position_ids[:, :seq_len])
        mask = create_causal_mask(
            config=text_model.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None
        )
        hidden = text_model.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = text_model.final_layer_norm(hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, eot_positions.to(hidden.device)]
        return self.text_projection(pooled)

    # ----------------------------------------------------------------------------- from CLIP weights
    @classmethod
    def from_clip(
        cls,
        clip: str | os.PathLike | CLIPModel,
        image_size: tuple[int, int] = (256, 128),
        **config_kwargs,
    ) -> CCAFLModel:
        """Build a CCAFL model from a CLIP checkpoint (Hub id, local folder or a loaded `CLIPModel`).

        The square position-embedding grid is resized bicubically to the ``image_size`` grid once;
        every other CLIP weight is copied unchanged and the neck starts as identity-like BatchNorm.

        Raises:
            OSError: the checkpoint can't be found (e.g. offline and not cached), with how to fix it.
        """
        if not isinstance(clip, CLIPModel):
            clip = _load_clip(clip)
        clip_config = clip.config
        config = CCAFLConfig(
            text_config=clip_config.text_config.to_dict(),
            vision_config=clip_config.vision_config.to_dict(),
            projection_dim=clip_config.projection_dim,
            logit_scale_init_value=clip_config.logit_scale_init_value,
            image_size=tuple(image_size),
            **config_kwargs,
        )
        model = cls(config).to(clip.dtype)
        state = clip.state_dict()
        key = "vision_model.embeddings.position_embedding.weight"
        state[key] = resize_position_embeddings(state[key], config.patch_grid)
        incompatible = model.load_state_dict(state, strict=False)
        unexpected = [k for k in incompatible.unexpected_keys if not k.endswith("position_ids")]
        missing = [k for k in incompatible.missing_keys if not k.startswith("neck.")]
        if missing or unexpected:
            raise ValueError(f"CLIP weights do not fit a CCAFL model: missing {missing}, unexpected {unexpected}")
        return model


def _load_clip(name_or_path: str | os.PathLike) -> CLIPModel:
    """Load a `CLIPModel`, turning "not found / offline" into one actionable error."""
    from .hub_utils import hub_local_files_only, hub_offline

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


__all__ = ["CCAFLModel", "CCAFLOutput", "CCAFLVisionEmbeddings", "resize_position_embeddings"]
