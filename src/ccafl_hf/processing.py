"""Preprocessing that travels with a checkpoint: ReID image processor and tokenizer.

`build_reid_processor` returns a `CLIPProcessor` whose image processor resizes to the model's
(height, width) without centre crop, so `AutoProcessor.from_pretrained(folder)` and
`AutoImageProcessor.from_pretrained(folder)` give the right preprocessing for a saved model.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable, Sequence

from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPProcessor,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import PILImageResampling

from .configuration_ccafl import CCAFLConfig

#: CLIP's own normalisation (METHOD.md §6: the natural choice for CLIP weights).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Words the tiny tokenizer keeps as single tokens; anything else falls back to characters.
TINY_VOCAB_WORDS = ("a", "an", "photo", "picture", "of", "the", "person", "pedestrian", "man", "woman", "x")


def build_tiny_tokenizer(words: Iterable[str] = TINY_VOCAB_WORDS) -> CLIPTokenizer:
    """A small CLIP BPE tokenizer built in code (no download): whole-word tokens for ``words``
    (covering the default prompt template), single characters for anything else."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for char in string.ascii_lowercase + string.digits + ".,!?'-":
        add(char)
        add(char + "</w>")
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words}):
        # BPE as the tokenizer runs it with the merges so far; then chain the pieces left to right.
        # Appended merges rank last, so words added earlier still end as one token.
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            add(pair[0] + pair[1])
            pieces = [pair[0] + pair[1], *pieces[2:]]
    add("<|startoftext|>")
    add("<|endoftext|>")
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging of ``pieces`` with the merge ``ranks`` (lowest rank first, every occurrence)."""
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:]), key=lambda p: ranks.get(p, len(ranks) + 1))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of a CLIP checkpoint or of a saved CCAFL folder (clear error when missing)."""
    from .hub_utils import hub_local_files_only

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
    return CLIPProcessor(
        image_processor=build_image_processor(config.image_size, image_mean, image_std),
        tokenizer=tokenizer if tokenizer is not None else build_tiny_tokenizer(),
    )


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "build_image_processor",
    "build_reid_processor",
    "build_tiny_tokenizer",
    "load_tokenizer",
]
