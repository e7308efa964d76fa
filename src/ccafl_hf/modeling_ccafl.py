"""CCAFL model: transformers' `CLIPModel` with a ReID input grid, a BN-neck and a prompt-embedding text path.

Two image towers: CLIP's ViT (transformers' `CLIPVisionModel`) and CLIP's modified ResNet (RN50,
`modeling_ccafl_resnet.py`), chosen by the vision config. The text tower is always `CLIPTextModel`.

This file is also shipped next to saved weights as custom code (`trust_remote_code=True`), so it
imports nothing from `ccafl_hf`: only torch, transformers and the sibling configuration file.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel
from transformers.masking_utils import create_causal_mask
from transformers.models.clip.configuration_clip import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPOutput, CLIPVisionEmbeddings
from transformers.utils import ModelOutput

from .configuration_ccafl import CCAFLConfig
from .modeling_ccafl_resnet import CCAFLResNetVisionModel


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
        if interpolate_pos_encoding:
            raise ValueError(
                "interpolate_pos_encoding=True is not supported: the position embeddings are stored for the model's "
                f"{self.image_size[0]}x{self.image_size[1]} grid; resize the images with the model's image processor"
            )
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
    Outputs of [`CCAFLModel.get_reid_outputs`] (and of `forward` called with images only).

    Args:
        reid_features (`torch.FloatTensor` of shape `(batch_size, dim)`):
            L2-normalised retrieval feature (the one evaluation, memories and association use).
        pooled_features (`torch.FloatTensor` of shape `(batch_size, vision_hidden_size)`):
            Pooled image feature before the neck (ViT: post-LN class token; ResNet: GeM of layer4).
        neck_features (`torch.FloatTensor` of shape `(batch_size, vision_hidden_size)`):
            Pooled feature after the BN-neck (equal to `pooled_features` when there is no neck).
        alignment_features (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            CLIP image embedding (ViT: projected class token; ResNet: attention-pool output), used only
            by the image-text losses.
        last_hidden_state (`torch.FloatTensor`):
            Vision tower output: ViT tokens `(batch_size, 1 + num_patches, hidden)`, ResNet layer4 map
            `(batch_size, hidden, rows, columns)`.
    """

    reid_features: torch.FloatTensor | None = None
    pooled_features: torch.FloatTensor | None = None
    neck_features: torch.FloatTensor | None = None
    alignment_features: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class CCAFLModel(CLIPModel):
    """`CLIPModel` for intra-camera supervised person re-identification (see docs/method.md).

    Adds to CLIP: a ``(height, width)`` ReID input grid with stored position embeddings, a BN-neck on
    the pooled image feature, [`get_reid_features`] (the retrieval feature), [`get_reid_outputs`]
    (retrieval and alignment features) and [`encode_prompt_embeddings`] (text tower on token
    *embeddings*, pooled at end-of-text) for learnable identity prompts. `forward`,
    `get_text_features` and `get_image_features` behave as in CLIP; `forward` with images only (as
    the image-feature-extraction pipeline calls it) returns [`CCAFLOutput`], retrieval feature first.

    The image tower is CLIP's ViT or, with a [`CCAFLResNetVisionConfig`], CLIP's modified ResNet
    (whose attention pool is its image projection: `visual_projection` is then the identity).
    """

    config_class = CCAFLConfig
    config: CCAFLConfig
    main_input_name = "pixel_values"

    def __init__(self, config: CCAFLConfig):
        # CLIPModel.__init__ would build a ViT from any vision config: the towers are built here instead
        super(CLIPModel, self).__init__(config)
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_model = CLIPTextModel._from_config(config.text_config)
        if config.is_resnet:
            self.vision_model = CCAFLResNetVisionModel(config.vision_config, config.image_size)
            self.visual_projection = nn.Identity()
        else:
            self.vision_model = CLIPVisionModel._from_config(config.vision_config)
            self.vision_model.embeddings = CCAFLVisionEmbeddings(config.vision_config, config.image_size)
            self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.neck = nn.BatchNorm1d(self.vision_embed_dim) if config.neck == "bnneck" else nn.Identity()
        if isinstance(self.neck, nn.BatchNorm1d):
            # BNNeck: the shift is not learnt. A buffer (same state-dict key), not a parameter, so it stays
            # frozen through save/load and is never handed to an optimiser.
            bias = self.neck.bias.detach()
            del self.neck.bias
            self.neck.register_buffer("bias", bias)
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
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs,
    ) -> CLIPOutput | CCAFLOutput:
        """CLIP's forward (image-text logits, `CLIPOutput`) when given ``input_ids`` and
        ``pixel_values``; with ``pixel_values [B, 3, H, W]`` only, the ReID outputs
        ([`CCAFLOutput`], see [`get_reid_outputs`]), so image-only callers such as
        ``pipeline("image-feature-extraction")`` get the retrieval feature."""
        if input_ids is None and pixel_values is not None:
            return self.get_reid_outputs(pixel_values)
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, **kwargs)

    def get_reid_outputs(self, pixel_values: torch.Tensor) -> CCAFLOutput:
        """ReID outputs of the image tower.

        Args:
            pixel_values: ``[B, 3, H, W]`` images at the config's ``image_size``.

        Returns:
            [`CCAFLOutput`] with the retrieval feature before/after the neck, the L2-normalised
            retrieval feature ``[B, D]`` and the alignment feature ``[B, projection_dim]``.
        """
        vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True)
        if self.config.is_resnet:
            pooled = vision_outputs.gem_output
        else:
            pooled = vision_outputs.pooler_output
        alignment = self.visual_projection(vision_outputs.pooler_output)
        neck = self.neck(pooled)
        choice = {"neck": neck, "pooled": pooled, "projection": alignment}[self.config.reid_feature]
        return CCAFLOutput(
            reid_features=F.normalize(choice.float(), dim=-1),
            pooled_features=pooled,
            neck_features=neck,
            alignment_features=alignment,
            last_hidden_state=vision_outputs.last_hidden_state,
        )

    def get_reid_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised retrieval features ``[B, D]`` of ``pixel_values [B, 3, H, W]``."""
        return self.get_reid_outputs(pixel_values).reid_features

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
        # positional: the cache argument was renamed (past_key_values -> cache) across transformers 5 releases
        mask = create_causal_mask(text_model.config, hidden, None, None)
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
        """Build a CCAFL model from a CLIP checkpoint.

        ``clip`` is a transformers CLIP (Hub id, local folder or a loaded `CLIPModel`: ViT tower) or an
        open_clip RN50 checkpoint (Hub id or folder with ``open_clip_config.json`` and
        ``open_clip_model.safetensors``, e.g. ``timm/resnet50_clip.openai``: ResNet tower). ViT position
        embeddings are resized bicubically, the ResNet's attention-pool positions bilinearly, to the
        ``image_size`` grid, once; every other CLIP weight is copied unchanged and the neck starts as
        identity-like BatchNorm. ``config_kwargs`` are `CCAFLConfig` fields; for the ResNet,
        ``last_stride`` and ``gem_p`` go to its vision config (``last_stride=2`` with
        ``image_size=(224, 224)`` is CLIP's own RN50). The tokenizer is not part of the model: load it
        from the same folder (`load_tokenizer`) when the checkpoint has one.

        Raises:
            OSError: the checkpoint can't be found (e.g. offline and not cached), with how to fix it.
            ValueError: a pickled checkpoint (never unpickled), or an open_clip tower other than RN50.
        """
        # the conversion lives in ccafl_hf.convert_clip, outside this file: a saved model's remote code is the
        # modelling files only (an import statement here would ship the converters and the Hub helpers with it)
        convert = importlib.import_module("ccafl_hf.convert_clip")
        return convert.from_clip(clip, image_size, model_class=cls, **config_kwargs)


__all__ = ["CCAFLModel", "CCAFLOutput", "CCAFLVisionEmbeddings", "resize_position_embeddings"]
