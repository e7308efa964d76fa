"""The embedded synthetic multi-camera ReID dataset.

Small pedestrians (head and hair, a patterned top, trousers / shorts / skirt, shoes, maybe a bag;
per-identity proportions) are drawn with PIL and seen by several cameras. Every camera has a strong,
consistent style — background texture and colours, colour cast, brightness/contrast, gamma, blur,
resolution, sensor noise, JPEG quality, framing — so that raw pixels retrieve the same camera far
better than the same person, while the clothes keep identities learnable. Every image also gets
its own jitter (position, scale, walking pose, facing, lighting, colour noise).

The output is a Market-1501 release (``bounding_box_train/``, ``query/``, ``bounding_box_test/``,
``0002_c1s1_000451_03.jpg`` names) read back by the Market-1501 reader. Train and test identities
are disjoint; each identity appears in a random subset of at least ``min_cameras_per_identity``
cameras; the query holds one image per test identity and camera, the gallery the rest plus pid
``0000`` distractors. Everything is a function of the config (same seed → identical files).
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..cache import cache_dir, fingerprint, write_folder_atomically
from .datasets.base import ReIDSource, register_reader
from .datasets.market1501 import MARKET_FOLDERS, read_market_style
from .errors import ReIDDatasetError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the rendering changes, so cached copies are regenerated
CONFIG_FILE = "synthetic_config.json"
_BACKGROUNDS = ("floor", "stripes", "bricks", "blotches", "diagonal", "gradient")
_TOPS = ("solid", "stripes_h", "stripes_v", "checks", "logo", "jacket")
_BOTTOMS = ("trousers", "trousers", "shorts", "skirt")
_HAIR = ("short", "long", "hat", "bald")
_BAGS = ("none", "none", "backpack", "shoulder", "handbag")
_SKIN = ((255, 220, 190), (234, 192, 150), (198, 145, 105), (150, 100, 70), (95, 65, 45))
_HAIR_COLOURS = ((20, 15, 10), (70, 45, 25), (140, 95, 50), (210, 180, 120), (130, 130, 130))
_TROUSERS = ((40, 60, 110), (25, 25, 30), (70, 70, 75), (180, 160, 110), (100, 70, 45), (225, 225, 220), (20, 30, 70))


@dataclass(frozen=True)
class SyntheticReIDConfig:
    """Size and seed of the synthetic dataset (the defaults suit a few-minute CPU demo).

    Attributes:
        num_train_identities / num_test_identities: disjoint identity sets.
        num_cameras: cameras (>= 2).
        images_per_identity_per_camera: images of an identity in each camera it appears in (>= 2, so
            every query has a gallery image of the same identity from another camera).
        min_cameras_per_identity: each identity is seen by a random subset of at least this many cameras.
        num_distractors: gallery images of pid 0 (people outside both identity sets).
        image_size: ``(height, width)`` of the written images.
        image_format: ``"jpg"`` or ``"png"``.
        seed: everything is a function of the config, this included.
    """

    num_train_identities: int = 60
    num_test_identities: int = 40
    num_cameras: int = 4
    images_per_identity_per_camera: int = 4
    min_cameras_per_identity: int = 2
    num_distractors: int = 20
    image_size: tuple[int, int] = (128, 64)
    image_format: str = "jpg"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        problems = []
        if self.num_train_identities < 1 or self.num_test_identities < 1:
            problems.append("num_train_identities and num_test_identities must be >= 1")
        if self.num_train_identities + self.num_test_identities > 9999:
            problems.append("at most 9999 identities (4-digit pids)")
        if not 2 <= self.num_cameras <= 99:
            problems.append(f"num_cameras must be in [2, 99], got {self.num_cameras}")
        if not 2 <= self.min_cameras_per_identity <= self.num_cameras:
            problems.append(f"min_cameras_per_identity must be in [2, num_cameras], got {self.min_cameras_per_identity}")
        if self.images_per_identity_per_camera < 2:
            problems.append("images_per_identity_per_camera must be >= 2 (one query, the rest gallery)")
        if self.num_distractors < 0:
            problems.append("num_distractors must be >= 0")
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            problems.append(f"image_size must be (height, width) with both >= 16, got {self.image_size}")
        if self.image_format not in ("jpg", "png"):
            problems.append(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if problems:
            raise ReIDDatasetError("synthetic dataset: " + "; ".join(problems))

    @classmethod
    def from_options(cls, **options) -> SyntheticReIDConfig:
        """Build from keyword options, rejecting unknown ones by name."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ReIDDatasetError(f"synthetic dataset: unknown option(s) {unknown}; it accepts {names}")
        return cls(**options)

    def to_dict(self) -> dict:
        """JSON-ready options plus the generator version."""
        return {**asdict(self), "image_size": list(self.image_size), "generator_version": GENERATOR_VERSION}

    def fingerprint(self) -> str:
        """Short hash naming the cache folder of this config."""
        return fingerprint(self.to_dict())


def default_synthetic_root(config: SyntheticReIDConfig) -> Path:
    """``$CCAFL_HF_CACHE/synthetic/<fingerprint>`` (default cache ``~/.cache/ccafl_hf``)."""
    return cache_dir("synthetic", config.fingerprint())


# ----------------------------------------------------------------------------------------- looks
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


@dataclass
class _Look:
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


def _identity_look(seed: int, pid: int) -> _Look:
    r = _rng(seed, 1, pid)
    grey = r.random() < 0.12
    top = _hsv(r.random(), 0.05 if grey else r.uniform(0.55, 1.0), r.uniform(0.3, 0.95))
    second = _hsv(r.random(), r.uniform(0.3, 1.0), r.uniform(0.15, 1.0))
    bottom = (np.asarray(_TROUSERS[r.integers(len(_TROUSERS))], float) if r.random() < 0.65
              else _hsv(r.random(), r.uniform(0.4, 0.9), r.uniform(0.25, 0.85)))
    return _Look(
        skin=np.asarray(_SKIN[r.integers(len(_SKIN))], float),
        hair=np.asarray(_HAIR_COLOURS[r.integers(len(_HAIR_COLOURS))], float),
        hair_style=_HAIR[r.integers(len(_HAIR))],
        top=top,
        top_second=second,
        top_pattern=_TOPS[r.integers(len(_TOPS))],
        short_sleeves=bool(r.random() < 0.35),
        bottom=bottom,
        bottom_style=_BOTTOMS[r.integers(len(_BOTTOMS))],
        shoes=_hsv(r.random(), r.uniform(0, 0.6), r.uniform(0.05, 0.9)),
        bag=_BAGS[r.integers(len(_BAGS))],
        bag_colour=_hsv(r.random(), r.uniform(0.2, 0.9), r.uniform(0.15, 0.8)),
        bag_side=int(r.choice((-1, 1))),
        height=float(r.uniform(0.9, 1.05)),
        build=float(r.uniform(0.85, 1.2)),
        torso=float(r.uniform(0.9, 1.1)),
    )


# -------------------------------------------------------------------------------------- captions
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


def describe_look(look: _Look) -> str:
    """An attribute caption of an identity's true look (the kind of text CLIP learns from), e.g.
    ``"a person with short black hair, a red top with vertical stripes in white, long sleeves, blue
    trousers, grey shoes and a backpack."``"""
    hair_colour = _HAIR_NAMES[next(i for i, c in enumerate(_HAIR_COLOURS) if np.allclose(c, look.hair))]
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
    return describe_look(_identity_look(seed, pid))


#: Every word `describe_look` can write (tokenizers of models pre-trained on the captions keep them whole).
CAPTION_WORDS = tuple(sorted(
    {"a", "person", "with", "hair", "no", "hat", "top", "in", "sleeves", "shoes", "and", "long", "short", "dark",
     "trousers", "shorts", "skirt", "an", "open", "front", "logo", "stripes", "checks", "horizontal", "vertical",
     "backpack", "shoulder", "bag", "handbag", "black", "brown", "blond", "grey", "white", "beige", "red",
     "orange", "yellow", "green", "cyan", "blue", "purple", "pink"}
))


@dataclass
class _CameraStyle:
    """What makes a camera recognisable whoever it sees."""

    background: np.ndarray  # [H + 2m, W + 2m, 3] float, cropped per image
    gains: np.ndarray  # [3] colour cast
    contrast: float
    brightness: float
    gamma: float
    blur: float
    resolution: float
    noise: float
    quality: int
    scale: float
    y_shift: float


_MARGIN = 8


def _background(r: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    h, w = height + 2 * _MARGIN, width + 2 * _MARGIN
    c1 = _hsv(r.random(), r.uniform(0.15, 0.7), r.uniform(0.3, 0.9))
    c2 = _hsv(r.random(), r.uniform(0.15, 0.7), r.uniform(0.2, 0.9))
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    if kind == "floor":
        horizon = h * r.uniform(0.45, 0.7)
        t = (yy > horizon)[..., None].astype(float)
    elif kind == "stripes":
        period = r.uniform(6, 16)
        t = ((xx // period) % 2)[..., None]
    elif kind == "bricks":
        rows = r.uniform(5, 10)
        cols = r.uniform(10, 20)
        offset = ((yy // rows) % 2) * cols / 2
        t = (((yy % rows) < 1.2) | (((xx + offset) % cols) < 1.2))[..., None].astype(float)
    elif kind == "diagonal":
        period = r.uniform(8, 20)
        t = (((xx + yy) // period) % 2)[..., None]
    elif kind == "gradient":
        t = (yy / h)[..., None] ** r.uniform(0.5, 2.0)
    else:  # blotches
        small = r.random((max(2, h // 12), max(2, w // 12)))
        big = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), float) / 255
        t = big[..., None]
    texture = (1 - t) * c1 + t * c2
    grain = r.normal(0, 6, size=(h // 4 + 1, w // 4 + 1, 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
    return texture + grain


def _camera_styles(config: SyntheticReIDConfig) -> list[_CameraStyle]:
    height, width = config.image_size
    n = config.num_cameras
    r0 = _rng(config.seed, 2, 0)
    kinds = r0.permutation(np.resize(np.asarray(_BACKGROUNDS), max(n, len(_BACKGROUNDS))))
    blurs = r0.permutation(np.resize(np.asarray([0.0, 0.6, 1.0, 1.4]), n))
    resolutions = r0.permutation(np.resize(np.asarray([1.0, 0.6, 0.45, 0.35]), n))
    qualities = r0.permutation(np.resize(np.asarray([95, 85, 75, 65]), n))
    hue_offset = r0.random()
    styles = []
    for c in range(n):
        r = _rng(config.seed, 2, c + 1)
        angle = 2 * np.pi * (hue_offset + c / n + r.uniform(-0.08, 0.08))
        strength = r.uniform(0.32, 0.45)
        gains = 1 + strength * np.cos(angle - 2 * np.pi * np.arange(3) / 3)
        styles.append(
            _CameraStyle(
                background=_background(r, str(kinds[c]), height, width),
                gains=gains,
                contrast=float(r.uniform(0.55, 1.3)),
                brightness=float(r.uniform(-30, 30)),
                gamma=float(r.uniform(0.8, 1.25)),
                blur=float(blurs[c]),
                resolution=float(resolutions[c]),
                noise=float(r.uniform(1.0, 6.0)),
                quality=int(qualities[c]),
                scale=float(r.uniform(0.84, 1.0)),
                y_shift=float(r.uniform(-0.03, 0.015)),
            )
        )
    return styles


# --------------------------------------------------------------------------------------- drawing
def _c(colour: np.ndarray, r: np.random.Generator, light: float) -> tuple[int, int, int]:
    """Colour with per-image noise and lighting, as an RGB tuple."""
    value = np.clip(colour * light + r.normal(0, 6, 3), 0, 255)
    return tuple(int(v) for v in value)


def _draw_person(draw: ImageDraw.ImageDraw, look: _Look, camera: _CameraStyle, r: np.random.Generator,
                 height: int, width: int) -> None:
    light = r.uniform(0.9, 1.1)
    person = height * 0.8 * look.height * camera.scale * r.uniform(0.95, 1.05)
    feet = height * (0.96 + camera.y_shift) + r.uniform(-0.02, 0.02) * height
    cx = width / 2 + r.uniform(-0.08, 0.08) * width
    facing = int(r.choice((-1, 1)))
    phase = r.uniform(0, 2 * np.pi)

    head_r = person * 0.075
    head_cy = feet - person + head_r
    shoulder = head_cy + head_r * 1.15
    hip = shoulder + person * 0.34 * look.torso
    torso_w = width * 0.34 * look.build
    leg_w = torso_w * 0.42
    shoe_h = max(2.0, person * 0.035)
    arm_w = torso_w * 0.24
    hand = shoulder + person * 0.36
    stride = np.sin(phase) * width * 0.07
    swing = -np.sin(phase) * width * 0.04
    left, right = cx - torso_w / 2, cx + torso_w / 2
    bag_side = look.bag_side * facing

    skin, top, second = _c(look.skin, r, light), _c(look.top, r, light), _c(look.top_second, r, light)
    bottom, shoes = _c(look.bottom, r, light), _c(look.shoes, r, light)
    bag = _c(look.bag_colour, r, light)
    hair = _c(look.hair, r, light)

    if look.bag == "backpack":  # behind the torso, sticking out on one side
        bx = cx + bag_side * torso_w * 0.35
        draw.rectangle([bx - torso_w * 0.4, shoulder + 2, bx + torso_w * 0.4, hip - 2], fill=bag)
    if look.hair_style == "long":
        draw.rectangle([cx - head_r * 1.1, head_cy, cx + head_r * 1.1, shoulder + person * 0.08], fill=hair)

    # legs and shoes
    for sign in (-1, 1):
        x0 = cx + sign * leg_w * 0.55 + sign * stride / 2
        foot_x = x0 + sign * stride / 2
        leg = [(x0 - leg_w / 2, hip), (x0 + leg_w / 2, hip), (foot_x + leg_w / 2, feet - shoe_h),
               (foot_x - leg_w / 2, feet - shoe_h)]
        draw.polygon(leg, fill=skin if look.bottom_style in ("shorts", "skirt") else bottom)
        if look.bottom_style == "shorts":
            knee = hip + (feet - hip) * 0.45
            mid = x0 + (foot_x - x0) * 0.45
            draw.polygon([(x0 - leg_w / 2, hip), (x0 + leg_w / 2, hip), (mid + leg_w / 2 + 1, knee),
                          (mid - leg_w / 2 - 1, knee)], fill=bottom)
        draw.rectangle([foot_x - leg_w / 2 - 1, feet - shoe_h, foot_x + leg_w / 2 + facing, feet], fill=shoes)
    if look.bottom_style == "skirt":
        hem = hip + (feet - hip) * 0.55
        draw.polygon([(left + 1, hip), (right - 1, hip), (right + torso_w * 0.15, hem), (left - torso_w * 0.15, hem)],
                     fill=bottom)

    # arms (behind the torso edges), then the torso with its pattern
    sleeve = skin if look.short_sleeves else top
    for sign in (-1, 1):
        x = cx + sign * (torso_w / 2 + arm_w * 0.3)
        end_x = x + sign * swing
        draw.polygon([(x - arm_w / 2, shoulder + 1), (x + arm_w / 2, shoulder + 1), (end_x + arm_w / 2, hand),
                      (end_x - arm_w / 2, hand)], fill=sleeve)
        if look.short_sleeves:
            draw.rectangle([x - arm_w / 2, shoulder + 1, x + arm_w / 2, shoulder + (hand - shoulder) * 0.35], fill=top)
        draw.ellipse([end_x - arm_w / 2, hand - arm_w / 2, end_x + arm_w / 2, hand + arm_w / 2], fill=skin)
    draw.rectangle([left, shoulder, right, hip], fill=top)
    _draw_pattern(draw, look.top_pattern, second, left, shoulder, right, hip)
    if look.bag == "backpack":
        strap_x = cx - bag_side * torso_w * 0.2
        draw.line([(strap_x, shoulder), (strap_x, hip - (hip - shoulder) * 0.3)], fill=bag, width=2)
    elif look.bag == "shoulder":
        bx = cx + bag_side * (torso_w / 2 + arm_w * 0.5)
        draw.line([(cx - bag_side * torso_w / 2, shoulder), (bx, hip)], fill=bag, width=2)
        draw.rectangle([bx - torso_w * 0.3, hip - person * 0.03, bx + torso_w * 0.3, hip + person * 0.09], fill=bag)
    elif look.bag == "handbag":
        hx = cx + bag_side * (torso_w / 2 + arm_w * 0.3) + bag_side * swing
        draw.rectangle([hx - torso_w * 0.22, hand, hx + torso_w * 0.22, hand + person * 0.1], fill=bag)

    # neck, head, hair
    draw.rectangle([cx - head_r * 0.35, head_cy + head_r * 0.6, cx + head_r * 0.35, shoulder + 1], fill=skin)
    draw.ellipse([cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r], fill=skin)
    if look.hair_style in ("short", "long"):
        draw.chord([cx - head_r * 1.05, head_cy - head_r * 1.1, cx + head_r * 1.05, head_cy + head_r * 0.9], 180, 360,
                   fill=hair)
    elif look.hair_style == "hat":
        draw.rectangle([cx - head_r * 1.0, head_cy - head_r * 1.25, cx + head_r * 1.0, head_cy - head_r * 0.3],
                       fill=second)
        draw.rectangle([cx - head_r * 1.4 * (facing < 0) - head_r, head_cy - head_r * 0.45,
                        cx + head_r * 1.4 * (facing > 0) + head_r, head_cy - head_r * 0.2], fill=second)


def _draw_pattern(draw: ImageDraw.ImageDraw, pattern: str, colour, left: float, top: float, right: float,
                  bottom: float) -> None:
    width, height = right - left, bottom - top
    if pattern == "stripes_h":
        step = max(3.0, height / 6)
        for y in np.arange(top + step / 2, bottom, step):
            draw.rectangle([left, y, right, y + step / 2.5], fill=colour)
    elif pattern == "stripes_v":
        step = max(3.0, width / 4)
        for x in np.arange(left + step / 2, right, step):
            draw.rectangle([x, top, x + step / 2.5, bottom], fill=colour)
    elif pattern == "checks":
        step = max(3.0, width / 4)
        for i, y in enumerate(np.arange(top, bottom, step)):
            for j, x in enumerate(np.arange(left, right, step)):
                if (i + j) % 2:
                    draw.rectangle([x, y, min(x + step, right), min(y + step, bottom)], fill=colour)
    elif pattern == "logo":
        draw.ellipse([left + width * 0.3, top + height * 0.25, right - width * 0.3, top + height * 0.6], fill=colour)
    elif pattern == "jacket":
        draw.rectangle([left + width * 0.38, top, right - width * 0.38, bottom], fill=colour)


def _apply_camera(image: Image.Image, camera: _CameraStyle, r: np.random.Generator) -> Image.Image:
    width, height = image.size
    if camera.resolution < 1.0:
        small = (max(8, round(width * camera.resolution)), max(8, round(height * camera.resolution)))
        image = image.resize(small, Image.BILINEAR).resize((width, height), Image.BILINEAR)
    if camera.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur))
    x = np.asarray(image, dtype=np.float32)
    x = x * camera.gains.astype(np.float32)
    x = (x - 128.0) * camera.contrast + 128.0 + camera.brightness + r.normal(0, 4)
    x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** camera.gamma
    x += r.normal(0, camera.noise, size=x.shape).astype(np.float32)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def render_image(look: _Look, camera: _CameraStyle, r: np.random.Generator, image_size: tuple[int, int]) -> Image.Image:
    """One RGB image ``image_size`` (H, W) of ``look`` seen by ``camera`` with the jitter drawn from ``r``."""
    height, width = image_size
    oy, ox = r.integers(0, 2 * _MARGIN + 1, size=2)
    background = camera.background[oy:oy + height, ox:ox + width] * r.uniform(0.93, 1.07)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    _draw_person(ImageDraw.Draw(image), look, camera, r, height, width)
    return _apply_camera(image, camera, r)


# ------------------------------------------------------------------------------------- generation
def _plan(config: SyntheticReIDConfig) -> list[tuple[str, int, int, int]]:
    """``(folder, pid, camera, image index)`` of every image, in a fixed order."""
    r = _rng(config.seed, 0)
    n_train, n_test, n_cams = config.num_train_identities, config.num_test_identities, config.num_cameras
    items = []
    for pid in range(1, n_train + n_test + 1):
        count = int(r.integers(config.min_cameras_per_identity, n_cams + 1))
        cameras = np.sort(r.choice(n_cams, size=count, replace=False))
        for cam in cameras.tolist():
            for k in range(config.images_per_identity_per_camera):
                if pid <= n_train:
                    folder = MARKET_FOLDERS["train"]
                else:
                    folder = MARKET_FOLDERS["query"] if k == 0 else MARKET_FOLDERS["gallery"]
                items.append((folder, pid, cam, k))
    for k in range(config.num_distractors):
        items.append((MARKET_FOLDERS["gallery"], 0, int(r.integers(n_cams)), k))
    return items


def _write_dataset(target: Path, config: SyntheticReIDConfig) -> None:
    height, width = config.image_size
    cameras = _camera_styles(config)
    for folder in MARKET_FOLDERS.values():
        (target / folder).mkdir(parents=True)
    frames = [0] * config.num_cameras
    distractor_base = config.num_train_identities + config.num_test_identities + 1
    for folder, pid, cam, k in _plan(config):
        look = _identity_look(config.seed, pid if pid > 0 else distractor_base + k)
        r = _rng(config.seed, 3, pid, cam, k)
        image = render_image(look, cameras[cam], r, (height, width))
        frames[cam] += 1 + int(r.integers(0, 40))
        name = f"{pid:04d}_c{cam + 1}s1_{frames[cam]:06d}_{k:02d}.{config.image_format}"
        if config.image_format == "jpg":
            image.save(target / folder / name, quality=cameras[cam].quality)
        else:
            image.save(target / folder / name, compress_level=1)
    (target / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))


def generate_synthetic_reid(
    root: str | os.PathLike | None = None,
    config: SyntheticReIDConfig | None = None,
    *,
    overwrite: bool = False,
    **options,
) -> Path:
    """Write the synthetic dataset to ``root`` (default `default_synthetic_root`) unless it is there.

    The images are written to a temporary sibling folder that is renamed into place, so concurrent
    callers (several processes) never see a half-written dataset.

    Args:
        root: destination folder (the Market-1501 release folder itself).
        config: a `SyntheticReIDConfig`, or ``**options`` to build one (``num_train_identities``,
            ``num_test_identities``, ``num_cameras``, ``images_per_identity_per_camera``, ``image_size``,
            ``seed``, ...).
        overwrite: replace a dataset made with other options instead of raising.
    Returns:
        the release folder.
    """
    if config is not None and options:
        raise ReIDDatasetError("pass either config or keyword options, not both")
    config = config if config is not None else SyntheticReIDConfig.from_options(**options)
    root = Path(root).expanduser() if root is not None else default_synthetic_root(config)
    wanted = config.to_dict()
    if root.exists():
        existing = _read_config(root)
        if existing == wanted:
            return root
        if existing is not None or any(root.iterdir()):
            if not overwrite:
                what = "a synthetic dataset made with other options" if existing else "other files"
                raise ReIDDatasetError(
                    f"{root} holds {what}; choose another data_dir, delete it, or pass overwrite=True"
                )
            if existing is None:
                raise ReIDDatasetError(f"{root} is not a synthetic dataset folder; refusing to overwrite it")
            shutil.rmtree(root)
    logger.info("generating the synthetic ReID dataset in %s", root)
    write_folder_atomically(root, lambda target: _write_dataset(target, config),
                            ready=lambda folder: _read_config(folder) == wanted)
    return root


def _read_config(root: Path) -> dict | None:
    try:
        return json.loads((root / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


@register_reader("synthetic", "embedded")
def read_synthetic(data_dir: str | os.PathLike | None = None, **options) -> ReIDSource:
    """The synthetic dataset, generated on first use in ``data_dir`` (default: the cache) and read
    back by the Market-1501 reader. ``options`` are `SyntheticReIDConfig` fields."""
    config = SyntheticReIDConfig.from_options(**options)
    root = generate_synthetic_reid(data_dir, config)
    return read_market_style(root.resolve(), "synthetic")
