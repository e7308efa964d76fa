"""CLIP's modified ResNet (RN50) as a CCAFL image tower: stem, bottleneck stages, attention pool, GeM.

Differences from CLIP's ResNet, both for person re-identification:
- ``last_stride=1``: layer4's first block does not down-sample (no anti-aliasing average pool in the
  block or its shortcut), so a 256x128 input gives a 16x8 layer4 map;
- the attention pool's position embeddings are stored for the ReID grid (``1 + h*w`` rows), resized
  once when CLIP weights are converted (`resize_attention_pool_positions`), never at run time;
- a learnable GeM pooling of the layer4 map gives the retrieval feature.

This file is also shipped next to saved weights as custom code (`trust_remote_code=True`), so it
imports nothing from `ccafl_hf`: only torch, transformers and the sibling configuration file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_ccafl import CCAFLResNetVisionConfig


def resize_attention_pool_positions(weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize attention-pool position embeddings ``[1 + S*S, C]`` of a square grid to
    ``[1 + h*w, C]`` (row 0, the mean token's embedding, is kept). Returns the input unchanged when
    the grid already has the requested size."""
    num_cells = weight.shape[0] - 1
    side = int(round(num_cells**0.5))
    if side * side != num_cells:
        raise ValueError(f"expected a square grid of attention-pool positions, got {num_cells} cells")
    if (side, side) == tuple(grid):
        return weight
    cells = weight[1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    cells = F.interpolate(cells, size=tuple(grid), mode="bilinear", align_corners=False)
    cells = cells.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(weight.dtype)
    return torch.cat([weight[:1], cells], dim=0)


@dataclass
class CCAFLResNetVisionOutput(ModelOutput):
    """
    Outputs of [`CCAFLResNetVisionModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size, height, width)`):
            The layer4 map (16x8 at 256x128 with `last_stride=1`).
        pooler_output (`torch.FloatTensor` of shape `(batch_size, output_dim)`):
            Attention-pool output: CLIP's image embedding (the alignment feature).
        gem_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            GeM pooling of the layer4 map (the retrieval feature before the neck).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    gem_output: torch.FloatTensor | None = None


class CCAFLResNetStem(nn.Module):
    """Three 3x3 convolutions (the first with stride 2), then a 2x2 average pool: stride 4."""

    def __init__(self, config: CCAFLResNetVisionConfig):
        super().__init__()
        half = config.width // 2
        self.conv1 = nn.Conv2d(config.num_channels, half, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, config.width, 3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(config.width)
        self.pool = nn.AvgPool2d(2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(pixel_values)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = F.relu(self.norm3(self.conv3(x)))
        return self.pool(x)


class CCAFLResNetShortcut(nn.Module):
    """Projection shortcut: anti-aliasing average pool (when the block down-samples), 1x1 conv, BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.pool(x)))


class CCAFLResNetBottleneck(nn.Module):
    """CLIP's bottleneck: 1x1, 3x3, [average pool when down-sampling], 1x1 (x4 channels), residual."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(planes)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.norm3 = nn.BatchNorm2d(out_channels)
        self.norm3.zero_init = True  # CLIP's init: every residual branch starts at zero
        needs_projection = stride > 1 or in_channels != out_channels
        self.downsample = CCAFLResNetShortcut(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.pool(F.relu(self.norm2(self.conv2(out))))
        out = self.norm3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class CCAFLResNetAttentionPool(nn.Module):
    """CLIP's attention pool: the mean token attends (multi-head) to itself and every layer4 cell,
    each with a learnt position embedding; its projected output is the image embedding."""

    def __init__(self, config: CCAFLResNetVisionConfig, grid: tuple[int, int]):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.grid = tuple(grid)
        self.position_embedding = nn.Parameter(torch.zeros(1 + grid[0] * grid[1], dim))
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, config.output_dim)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` → ``[B, output_dim]``.

        Only the mean token queries, so keys and values are never materialised: with ``q_h`` the
        query of head ``h`` and ``W^k_h``, ``W^v_h`` its ``[d, C]`` slices, the scores are
        ``((q_h W^k_h) . x_t + q_h . b^k_h) / sqrt(d)`` and the output is ``W^v_h (sum_t a_t x_t) + b^v_h`` (the weights sum to 1). That is
        ``O(B (C^2 + H L C))`` instead of the ``O(B L C^2)`` of projecting all ``L = 1 + hw``
        tokens: for RN50 about 34x fewer multiply-adds at 256x128 (20x at 224x224), same result up
        to rounding.
        """
        batch, channels, height, width = feature_map.shape
        if (height, width) != self.grid:
            raise ValueError(
                f"the layer4 map is {height}x{width} but the attention pool stores positions for "
                f"{self.grid[0]}x{self.grid[1]}; resize the input with the model's image processor"
            )
        tokens = feature_map.flatten(2).transpose(1, 2)  # [B, hw, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.position_embedding.to(tokens.dtype)  # [B, L, C]
        heads = self.num_heads
        head_dim = channels // heads
        query = self.q_proj(tokens[:, 0]).view(batch, heads, head_dim)  # [B, H, d]
        key_weight = self.k_proj.weight.view(heads, head_dim, channels)
        value_weight = self.v_proj.weight.view(heads, head_dim, channels)
        query_in_tokens = torch.einsum("bhd,hdc->bhc", query, key_weight.to(query.dtype))  # [B, H, C]
        # the key-bias term is the same for every token (it cancels in the softmax); it is kept so the
        # scores equal CLIP's and every parameter takes part in the graph (DDP expects it)
        key_bias = torch.einsum("bhd,hd->bh", query, self.k_proj.bias.view(heads, head_dim).to(query.dtype))
        scores = (torch.einsum("bhc,blc->bhl", query_in_tokens, tokens) + key_bias.unsqueeze(-1)) * head_dim**-0.5
        weights = scores.softmax(dim=-1).to(tokens.dtype)  # [B, H, L]
        context = torch.einsum("bhl,blc->bhc", weights, tokens)  # [B, H, C]
        attended = torch.einsum("bhc,hdc->bhd", context, value_weight.to(context.dtype))
        attended = attended + self.v_proj.bias.view(heads, head_dim).to(attended.dtype)
        return self.out_proj(attended.reshape(batch, channels))


class CCAFLGeMPooling(nn.Module):
    """Generalised-mean pooling ``(mean x^p)^(1/p)`` over the spatial cells, learnable ``p``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` → ``[B, C]`` (computed in float32: x^p overflows half precision)."""
        p = self.p.float()
        pooled = feature_map.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / p).to(feature_map.dtype)


class CCAFLResNetVisionModel(PreTrainedModel):
    """CLIP's modified ResNet for ReID: stem → 4 bottleneck stages → attention pool (CLIP embedding)
    and GeM (retrieval feature). ``image_size`` (height, width) fixes the stored attention-pool grid."""

    config_class = CCAFLResNetVisionConfig
    config: CCAFLResNetVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "vision_model"

    def __init__(self, config: CCAFLResNetVisionConfig, image_size: tuple[int, int] | None = None):
        super().__init__(config)
        height, width = image_size if image_size is not None else (config.image_size, config.image_size)
        stride = config.output_stride
        if height % stride or width % stride:
            raise ValueError(
                f"image_size {height}x{width} gives no integer layer4 grid (the tower down-samples by {stride})"
            )
        self.image_size = (height, width)
        self.grid = (height // stride, width // stride)
        self.stem = CCAFLResNetStem(config)
        stages, in_channels = [], config.width
        strides = (1, 2, 2, config.last_stride)
        for index, (blocks, stride) in enumerate(zip(config.layers, strides)):
            planes = config.width * 2**index
            stage = [CCAFLResNetBottleneck(in_channels, planes, stride)]
            in_channels = planes * CCAFLResNetBottleneck.expansion
            stage += [CCAFLResNetBottleneck(in_channels, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(stages)
        self.attention_pool = CCAFLResNetAttentionPool(config, self.grid)
        self.gem = CCAFLGeMPooling(config.gem_p)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        _init_resnet_weights(module, self.config)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> CCAFLResNetVisionOutput:
        """``pixel_values [B, 3, H, W]`` at the model's ``image_size`` → [`CCAFLResNetVisionOutput`]."""
        height, width = pixel_values.shape[-2:]
        if (height, width) != self.image_size:
            raise ValueError(
                f"pixel_values are {height}x{width} (height x width) but the model expects "
                f"{self.image_size[0]}x{self.image_size[1]}; resize with the model's image processor"
            )
        x = self.stem(pixel_values.to(self.stem.conv1.weight.dtype))
        for stage in self.stages:
            x = stage(x)
        return CCAFLResNetVisionOutput(last_hidden_state=x, pooler_output=self.attention_pool(x), gem_output=self.gem(x))


def _init_resnet_weights(module: nn.Module, config: CCAFLResNetVisionConfig) -> None:
    """CLIP's ResNet initialisation: He-normal convolutions, attention-pool projections N(0, C^-1/2),
    the last BN of each bottleneck at zero (each block starts as identity), GeM p at its initial value."""
    from transformers import initialization as init

    if isinstance(module, nn.Conv2d):
        init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        (init.zeros_ if getattr(module, "zero_init", False) else init.ones_)(module.weight)
        init.zeros_(module.bias)
        init.zeros_(module.running_mean)
        init.ones_(module.running_var)
        init.zeros_(module.num_batches_tracked)
    elif isinstance(module, CCAFLResNetAttentionPool):
        std = module.q_proj.in_features**-0.5
        init.normal_(module.position_embedding, std=std)
        for linear in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            init.normal_(linear.weight, std=std)
            init.zeros_(linear.bias)
    elif isinstance(module, CCAFLGeMPooling):
        init.constant_(module.p, config.gem_p)


__all__ = [
    "CCAFLGeMPooling",
    "CCAFLResNetAttentionPool",
    "CCAFLResNetBottleneck",
    "CCAFLResNetVisionModel",
    "CCAFLResNetVisionOutput",
    "resize_attention_pool_positions",
]
