"""Rendering: camera styles and one image of an identity seen by a camera."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .config import SyntheticReIDConfig
from .looks import IdentityLook, hsv_colour, keyed_rng

BACKGROUNDS = ("floor", "stripes", "bricks", "blotches", "diagonal", "gradient")


@dataclass
class CameraStyle:
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


MARGIN = 8


def _background(r: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    h, w = height + 2 * MARGIN, width + 2 * MARGIN
    c1 = hsv_colour(r.random(), r.uniform(0.15, 0.7), r.uniform(0.3, 0.9))
    c2 = hsv_colour(r.random(), r.uniform(0.15, 0.7), r.uniform(0.2, 0.9))
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


def camera_styles(config: SyntheticReIDConfig) -> list[CameraStyle]:
    """The ``num_cameras`` styles of ``config`` (backgrounds at its image size), a function of its seed."""
    height, width = config.image_size
    n = config.num_cameras
    r0 = keyed_rng(config.seed, 2, 0)
    kinds = r0.permutation(np.resize(np.asarray(BACKGROUNDS), max(n, len(BACKGROUNDS))))
    blurs = r0.permutation(np.resize(np.asarray([0.0, 0.6, 1.0, 1.4]), n))
    resolutions = r0.permutation(np.resize(np.asarray([1.0, 0.6, 0.45, 0.35]), n))
    qualities = r0.permutation(np.resize(np.asarray([95, 85, 75, 65]), n))
    hue_offset = r0.random()
    styles = []
    for c in range(n):
        r = keyed_rng(config.seed, 2, c + 1)
        angle = 2 * np.pi * (hue_offset + c / n + r.uniform(-0.08, 0.08))
        strength = r.uniform(0.32, 0.45)
        gains = 1 + strength * np.cos(angle - 2 * np.pi * np.arange(3) / 3)
        styles.append(
            CameraStyle(
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


def draw_person(draw: ImageDraw.ImageDraw, look: IdentityLook, camera: CameraStyle, r: np.random.Generator,
                height: int, width: int) -> None:
    """Draw ``look`` walking, centred in a ``height x width`` box at the origin of ``draw``'s image."""
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


def apply_camera(image: Image.Image, camera: CameraStyle, r: np.random.Generator) -> Image.Image:
    """``image`` as ``camera`` sees it: resolution, blur, colour cast, contrast, gamma and sensor noise."""
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


def render_image(look: IdentityLook, camera: CameraStyle, r: np.random.Generator, image_size: tuple[int, int]) -> Image.Image:
    """One RGB image ``image_size`` (H, W) of ``look`` seen by ``camera`` with the jitter drawn from ``r``."""
    height, width = image_size
    oy, ox = r.integers(0, 2 * MARGIN + 1, size=2)
    background = camera.background[oy:oy + height, ox:ox + width] * r.uniform(0.93, 1.07)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw_person(ImageDraw.Draw(image), look, camera, r, height, width)
    return apply_camera(image, camera, r)
