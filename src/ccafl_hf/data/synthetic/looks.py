"""Identities: what makes a person recognisable across cameras (`IdentityLook`), drawn from a seed."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

TOPS = ("solid", "stripes_h", "stripes_v", "checks", "logo", "jacket")
BOTTOMS = ("trousers", "trousers", "shorts", "skirt")
HAIR_STYLES = ("short", "long", "hat", "bald")
BAGS = ("none", "none", "backpack", "shoulder", "handbag")
SKIN_TONES = ((255, 220, 190), (234, 192, 150), (198, 145, 105), (150, 100, 70), (95, 65, 45))
HAIR_COLOURS = ((20, 15, 10), (70, 45, 25), (140, 95, 50), (210, 180, 120), (130, 130, 130))
TROUSER_COLOURS = ((40, 60, 110), (25, 25, 30), (70, 70, 75), (180, 160, 110), (100, 70, 45), (225, 225, 220),
                   (20, 30, 70))


def keyed_rng(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (each identity, camera and image has its own stream)."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def hsv_colour(h: float, s: float, v: float) -> np.ndarray:
    """``[3]`` RGB (0-255 floats) of an HSV colour; the hue wraps around."""
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


@dataclass
class IdentityLook:
    """What makes an identity recognisable across cameras."""

    skin: np.ndarray
    hair: np.ndarray
    hair_style: str
    top: np.ndarray
    top_second: np.ndarray
    top_pattern: str
    short_sleeves: bool
    bottom: np.ndarray
    bottom_style: str
    shoes: np.ndarray
    bag: str
    bag_colour: np.ndarray
    bag_side: int
    height: float
    build: float
    torso: float


def identity_look(seed: int, pid: int) -> IdentityLook:
    """The look of identity ``pid`` in the population drawn with ``seed`` (a pure function of both)."""
    r = keyed_rng(seed, 1, pid)
    grey = r.random() < 0.12
    top = hsv_colour(r.random(), 0.05 if grey else r.uniform(0.55, 1.0), r.uniform(0.3, 0.95))
    second = hsv_colour(r.random(), r.uniform(0.3, 1.0), r.uniform(0.15, 1.0))
    bottom = (np.asarray(TROUSER_COLOURS[r.integers(len(TROUSER_COLOURS))], float) if r.random() < 0.65
              else hsv_colour(r.random(), r.uniform(0.4, 0.9), r.uniform(0.25, 0.85)))
    return IdentityLook(
        skin=np.asarray(SKIN_TONES[r.integers(len(SKIN_TONES))], float),
        hair=np.asarray(HAIR_COLOURS[r.integers(len(HAIR_COLOURS))], float),
        hair_style=HAIR_STYLES[r.integers(len(HAIR_STYLES))],
        top=top,
        top_second=second,
        top_pattern=TOPS[r.integers(len(TOPS))],
        short_sleeves=bool(r.random() < 0.35),
        bottom=bottom,
        bottom_style=BOTTOMS[r.integers(len(BOTTOMS))],
        shoes=hsv_colour(r.random(), r.uniform(0, 0.6), r.uniform(0.05, 0.9)),
        bag=BAGS[r.integers(len(BAGS))],
        bag_colour=hsv_colour(r.random(), r.uniform(0.2, 0.9), r.uniform(0.15, 0.8)),
        bag_side=int(r.choice((-1, 1))),
        height=float(r.uniform(0.9, 1.05)),
        build=float(r.uniform(0.85, 1.2)),
        torso=float(r.uniform(0.9, 1.1)),
    )
