"""Configuration of CCAFL models: a CLIP configuration plus the person re-identification fields.

This file is also shipped next to saved weights as custom code, so it must import nothing
from `ccafl_hf` (only transformers / huggingface_hub).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig

REID_FEATURES = ("neck", "pooled", "projection")
NECKS = ("bnneck", "none")


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
        after the neck, METHOD.md §2), `"pooled"` (before the neck) or `"projection"` (the CLIP
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

    image_size: list[int] | tuple[int, int] = (256, 128)
    neck: str = "bnneck"
    reid_feature: str = "neck"
    prompt_template: str = "A photo of a {prompt} person."
    prompt_placeholder: str = "X"
    num_prompt_tokens: int = 4

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.image_size = tuple(int(v) for v in self.image_size)
        self._validate_reid_fields()

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the ReID input size."""
        height, width = self.image_size
        patch = self.vision_config.patch_size
        return height // patch, width // patch

    @property
    def prompt_text(self) -> str:
        """The template with the placeholder words filled in, e.g. ``"A photo of a X X X X person."``."""
        return self.prompt_template.format(prompt=" ".join([self.prompt_placeholder] * self.num_prompt_tokens))

    def _validate_reid_fields(self) -> None:
        """Validates the ReID fields with plain `ValueError`s naming the field."""
        if len(self.image_size) != 2 or any(int(v) <= 0 for v in self.image_size):
            raise ValueError(f"image_size must be (height, width) with positive values, got {self.image_size!r}")
        patch = self.vision_config.patch_size
        if not isinstance(patch, int):
            raise ValueError(f"vision_config.patch_size must be an int, got {patch!r}")
        height, width = (int(v) for v in self.image_size)
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


__all__ = ["CCAFLConfig"]
