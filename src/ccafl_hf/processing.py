"""Preprocessing that travels with a checkpoint: ReID image processor and tokenizer.

The tiny tokenizer built in code lives with the tiny models (`ccafl_hf.tiny.tokenizer`).

`build_reid_processor` returns a `CLIPProcessor` whose image processor resizes to the model's
(height, width) without centre crop, so `AutoProcessor.from_pretrained(folder)` and
`AutoImageProcessor.from_pretrained(folder)` give the right preprocessing for a saved model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPProcessor,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import PILImageResampling

from .configuration_ccafl import CCAFLConfig

#: CLIP's own normalisation (docs/method.md §6: the natural choice for CLIP weights).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of a CLIP checkpoint or of a saved CCAFL folder (clear error when missing)."""
    from .utils.hub_utils import hub_local_files_only

    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=hub_local_files_only(name_or_path))
    except (OSError, ValueError) as error:
        raise OSError(
            f"Could not load a tokenizer from {str(name_or_path)!r} ({type(error).__name__}). When offline, pass "
            "a local folder that holds the checkpoint's tokenizer files (tokenizer.json / vocab.json + merges.txt)."
        ) from None


def build_image_processor(
    image_size: Sequence[int], image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD
) -> CLIPImageProcessor:
    """Eval-time image processor: bicubic resize to ``image_size`` (height, width), no crop, normalise."""
    height, width = (int(v) for v in image_size)
    return CLIPImageProcessor(
        size={"height": height, "width": width},
        do_resize=True,
        resample=PILImageResampling.BICUBIC,
        do_center_crop=False,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


def build_reid_processor(
    config: CCAFLConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
) -> CLIPProcessor:
    """`CLIPProcessor` for a CCAFL model: ReID-size image processor + tokenizer (tiny one if None)."""
    if tokenizer is None:
        from .tiny.tokenizer import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
    return CLIPProcessor(
        image_processor=build_image_processor(config.image_size, image_mean, image_std),
        tokenizer=tokenizer,
    )


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "build_image_processor",
    "build_reid_processor",
    "load_tokenizer",
]
