"""Attribute captions of synthetic identities (the kind of text CLIP learns from)."""

from __future__ import annotations

import colorsys

import numpy as np

from .looks import HAIR_COLOURS, IdentityLook, identity_look

_HAIR_NAMES = ("black", "dark brown", "brown", "blond", "grey")
_PATTERN_WORDS = {"stripes_h": "horizontal stripes", "stripes_v": "vertical stripes", "checks": "checks",
                  "logo": "a logo", "jacket": "an open front"}
_BAG_WORDS = {"backpack": "a backpack", "shoulder": "a shoulder bag", "handbag": "a handbag"}


def colour_name(rgb: np.ndarray) -> str:
    """A basic colour word for an RGB colour (0-255), as a person describing clothes would use."""
    h, s, v = colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255.0))
    if v < 0.22:
        return "black"
    if s < 0.18:
        return "white" if v > 0.82 else "grey"
    if 0.04 <= h < 0.17 and (s < 0.45 or v < 0.5):
        return "beige" if v >= 0.5 else "brown"
    bounds = ((0.04, "red"), (0.1, "orange"), (0.18, "yellow"), (0.45, "green"), (0.53, "cyan"),
              (0.72, "blue"), (0.8, "purple"), (0.95, "pink"), (1.01, "red"))
    return next(name for bound, name in bounds if h < bound)


def describe_look(look: IdentityLook) -> str:
    """An attribute caption of an identity's true look (the kind of text CLIP learns from), e.g.
    ``"a person with short black hair, a red top with vertical stripes in white, long sleeves, blue
    trousers, grey shoes and a backpack."``"""
    hair_colour = _HAIR_NAMES[next(i for i, c in enumerate(HAIR_COLOURS) if np.allclose(c, look.hair))]
    hair = {"short": f"short {hair_colour} hair", "long": f"long {hair_colour} hair",
            "hat": f"a {colour_name(look.top_second)} hat", "bald": "no hair"}[look.hair_style]
    top = f"a {colour_name(look.top)} top"
    if look.top_pattern in _PATTERN_WORDS:
        top += f" with {_PATTERN_WORDS[look.top_pattern]} in {colour_name(look.top_second)}"
    sleeves = "short sleeves" if look.short_sleeves else "long sleeves"
    bottom = f"{'a ' if look.bottom_style == 'skirt' else ''}{colour_name(look.bottom)} {look.bottom_style}"
    parts = [hair, top, sleeves, bottom, f"{colour_name(look.shoes)} shoes"]
    if look.bag in _BAG_WORDS:
        parts.append(f"{_BAG_WORDS[look.bag]} in {colour_name(look.bag_colour)}")
    return f"a person with {', '.join(parts[:-1])} and {parts[-1]}."


def identity_caption(seed: int, pid: int) -> str:
    """`describe_look` of identity ``pid`` of the synthetic dataset generated with ``seed``."""
    return describe_look(identity_look(seed, pid))


#: Every word `describe_look` can write (tokenizers of models pre-trained on the captions keep them whole).
CAPTION_WORDS = tuple(sorted(
    {"a", "person", "with", "hair", "no", "hat", "top", "in", "sleeves", "shoes", "and", "long", "short", "dark",
     "trousers", "shorts", "skirt", "an", "open", "front", "logo", "stripes", "checks", "horizontal", "vertical",
     "backpack", "shoulder", "bag", "handbag", "black", "brown", "blond", "grey", "white", "beige", "red",
     "orange", "yellow", "green", "cyan", "blue", "purple", "pink"}
))
