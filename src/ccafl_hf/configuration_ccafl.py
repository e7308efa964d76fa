"""Configuration of CCAFL models: a CLIP configuration plus the person re-identification fields.

This file is also shipped next to saved weights as custom code, so it must import nothing
from `ccafl_hf` (only transformers / huggingface_hub).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPVisionConfig, PreTrainedConfig

REID_FEATURES = ("neck", "pooled", "projection")
NECKS = ("bnneck", "none")


@strict
class CCAFLResNetVisionConfig(PreTrainedConfig):
    r"""
    Configuration of CLIP's modified ResNet image tower (RN50 by default) as a CCAFL vision tower.

    Select it with ``CCAFLConfig(vision_config={"model_type": "ccafl_resnet_vision", ...})``.

    layers (`tuple[int, int, int, int]`, defaults to `(3, 4, 6, 3)`):
        Bottleneck blocks per stage (RN50: 3, 4, 6, 3).
    width (`int`, defaults to 64):
        Stem width; stage ``i`` has ``width * 2**i`` planes and the layer4 map ``width * 32`` channels.
    output_dim (`int`, defaults to 1024):
        Output size of the attention pool (the CLIP image embedding); must equal the CLIP `projection_dim`.
    num_attention_heads (`int`, defaults to 32):
        Heads of the attention pool (CLIP: ``width * 32 // 64``).
    image_size (`int`, defaults to 224):
        Square input size of the CLIP checkpoint (information only: the attention-pool position
        embeddings are stored for the ReID grid of [`CCAFLConfig`]).
    last_stride (`int`, defaults to 1):
        Stride of layer4's first block. 1 (ReID): no down-sampling in layer4, so a 256x128 input
        gives a 16x8 map; 2: CLIP's original architecture.
    gem_p (`float`, defaults to 3.0):
        Initial exponent of the learnable GeM pooling that gives the retrieval feature.
    """

    model_type = "ccafl_resnet_vision"
    base_config_key = "vision_config"

    layers: list[int] | tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    output_dim: int = 1024
    num_attention_heads: int = 32
    num_channels: int = 3
    image_size: int = 224
    last_stride: int = 1
    gem_p: float = 3.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.layers = tuple(int(v) for v in self.layers)
        if self.last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 (ReID, layer4 keeps its resolution) or 2 (CLIP), got {self.last_stride}")
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts (RN50: (3, 4, 6, 3)), got {self.layers}")
        if self.width < 2 or self.width % 2:
            raise ValueError(f"width must be an even number >= 2, got {self.width}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"the layer4 width {self.hidden_size} (= 32 * width) must be divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.gem_p <= 0:
            raise ValueError(f"gem_p must be > 0, got {self.gem_p}")

    @property
    def hidden_size(self) -> int:
        """Channels of the layer4 map (2048 for RN50): the size of the GeM retrieval feature."""
        return self.width * 32

    @property
    def output_stride(self) -> int:
        """Input pixels per layer4 cell: 16 with ``last_stride=1``, 32 with CLIP's original stride."""
        return 16 * self.last_stride


@strict
class CCAFLConfig(CLIPConfig):
    r"""
    Configuration of a [`CCAFLModel`]: every [`CLIPConfig`] field plus the ReID fields below.

    The vision sub-config keeps the square `image_size` of the CLIP checkpoint the model was built
    from; the ReID input size `image_size` (height, width) of this config is the one the model
    runs at, and its position embeddings are stored for exactly that grid.

    image_size (`tuple[int, int]`, defaults to `(256, 128)`):
        ReID input size as (height, width); both must be multiples of the vision patch size.
    neck (`str`, defaults to `"bnneck"`):
        Head on the pooled image feature: `"bnneck"` (BatchNorm1d, bias frozen) or `"none"`.
    reid_feature (`str`, defaults to `"neck"`):
        Which feature `get_reid_features` returns (always L2-normalised): `"neck"` (pooled feature
        after the neck, docs/method.md §2), `"pooled"` (before the neck) or `"projection"` (the CLIP
        projected image embedding).
    prompt_template (`str`, defaults to `"A photo of a {prompt} person."`):
        Identity prompt template; `{prompt}` is replaced by `num_prompt_tokens` placeholder words
        whose token embeddings are learnt per identity (stage 1).
    prompt_placeholder (`str`, defaults to `"X"`):
        Placeholder word; it must be a single token of the tokenizer.
    num_prompt_tokens (`int`, defaults to 4):
        Number of learnable token embeddings per identity.

    Example:

    ```python
    >>> from ccafl_hf import CCAFLConfig, CCAFLModel
    >>> config = CCAFLConfig(
    ...     text_config={"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2},
    ...     vision_config={"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2, "patch_size": 8},
    ...     projection_dim=16,
    ...     image_size=(64, 32),
    ... )
    >>> model = CCAFLModel(config)
    ```
    """

    model_type = "ccafl"

    vision_config: dict | CLIPVisionConfig | CCAFLResNetVisionConfig | None = None
    image_size: list[int] | tuple[int, int] = (256, 128)
    neck: str = "bnneck"
    reid_feature: str = "neck"
    prompt_template: str = "A photo of a {prompt} person."
    prompt_placeholder: str = "X"
    num_prompt_tokens: int = 4

    def __post_init__(self, **kwargs):
        vision = self.vision_config
        if isinstance(vision, dict) and vision.get("model_type") == CCAFLResNetVisionConfig.model_type:
            self.vision_config = CCAFLResNetVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
        super().__post_init__(**kwargs)
        self.image_size = tuple(int(v) for v in self.image_size)
        self._validate_reid_fields()

    @property
    def is_resnet(self) -> bool:
        """True when the image tower is CLIP's modified ResNet (RN50), False for the ViT."""
        return isinstance(self.vision_config, CCAFLResNetVisionConfig)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Grid (rows, columns) of the image tower at the ReID input size: ViT patches, or the
        ResNet's layer4 map."""
        height, width = self.image_size
        stride = self.vision_config.output_stride if self.is_resnet else self.vision_config.patch_size
        return height // stride, width // stride

    @property
    def prompt_text(self) -> str:
        """The template with the placeholder words filled in, e.g. ``"A photo of a X X X X person."``."""
        return self.prompt_template.format(prompt=" ".join([self.prompt_placeholder] * self.num_prompt_tokens))

    def _validate_reid_fields(self) -> None:
        """Validates the ReID fields with plain `ValueError`s naming the field."""
        if len(self.image_size) != 2 or any(int(v) <= 0 for v in self.image_size):
            raise ValueError(f"image_size must be (height, width) with positive values, got {self.image_size!r}")
        height, width = (int(v) for v in self.image_size)
        if self.is_resnet:
            stride = self.vision_config.output_stride
            if height % stride or width % stride:
                raise ValueError(
                    f"image_size (height={height}, width={width}) gives no integer layer4 grid: the ResNet tower with "
                    f"last_stride={self.vision_config.last_stride} down-samples by {stride}; use multiples of "
                    f"{stride}, e.g. ({height // stride * stride or stride}, {width // stride * stride or stride})"
                )
            if self.projection_dim != self.vision_config.output_dim:
                raise ValueError(
                    f"projection_dim ({self.projection_dim}) must equal vision_config.output_dim "
                    f"({self.vision_config.output_dim}): the ResNet's attention pool is its image projection"
                )
        else:
            patch = self.vision_config.patch_size
            if not isinstance(patch, int) or patch < 1:
                raise ValueError(f"vision_config.patch_size must be an integer >= 1, got {patch!r}")
            if height % patch or width % patch:
                raise ValueError(
                    f"image_size (height={height}, width={width}) must be divisible by the vision patch size "
                    f"{patch}; e.g. use ({height // patch * patch or patch}, {width // patch * patch or patch})"
                )
        if self.neck not in NECKS:
            raise ValueError(f"neck must be one of {NECKS}, got {self.neck!r}")
        if self.reid_feature not in REID_FEATURES:
            raise ValueError(f"reid_feature must be one of {REID_FEATURES}, got {self.reid_feature!r}")
        if self.reid_feature == "neck" and self.neck == "none":
            raise ValueError('reid_feature="neck" needs a neck; set neck="bnneck" or reid_feature="pooled"')
        if self.num_prompt_tokens < 1:
            raise ValueError(f"num_prompt_tokens must be >= 1, got {self.num_prompt_tokens}")
        if self.prompt_template.count("{prompt}") != 1:
            raise ValueError(
                f"prompt_template must contain '{{prompt}}' exactly once, got {self.prompt_template!r}"
            )
        if not self.prompt_placeholder or " " in self.prompt_placeholder:
            raise ValueError(f"prompt_placeholder must be one word, got {self.prompt_placeholder!r}")


__all__ = ["CCAFLConfig", "CCAFLResNetVisionConfig"]
