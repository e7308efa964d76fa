"""The tiny tokenizer: a small CLIP BPE tokenizer built in code (no download) for the tiny models."""

from __future__ import annotations

import string
from collections.abc import Iterable

from transformers import CLIPTokenizer

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


__all__ = ["TINY_VOCAB_WORDS", "build_tiny_tokenizer"]
