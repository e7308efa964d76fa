"""Train and evaluation transforms (torchvision ``transforms.v2``), docs/method.md §6.

Both take a decoded RGB `PIL.Image` and return a normalised ``[3, H, W]`` float32 tensor. The image
is turned into a uint8 tensor first, so resizing, padding and cropping run on tensors (faster than
PIL for these sizes). ``mean``/``std`` come from the model's image processor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

REFERENCE_HEIGHT = 256  # docs/method.md §6: 256×128 inputs …
REFERENCE_PADDING = 10  # … padded by 10 px before the random crop


def _check(height: int, width: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {list(std)}")


def build_train_transform(
    height: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    flip_p: float = 0.5,
    padding: int | None = None,
    erasing_p: float = 0.5,
    erasing_scale: tuple[float, float] = (0.02, 0.4),
    erasing_ratio: tuple[float, float] = (0.3, 3.33),
    color_jitter: float = 0.0,
) -> v2.Compose:
    """Bicubic resize to ``height × width``, horizontal flip (``flip_p``), zero-pad ``padding`` and
    random crop back, scale to [0, 1], normalise, random erasing (``erasing_p``, area
    ``erasing_scale``, aspect ``erasing_ratio``; erased pixels become 0, the mean colour).
    ``color_jitter > 0`` adds brightness/contrast/saturation jitter of that strength and hue jitter
    of a quarter of it (an extension, off in docs/method.md's recipe).

    ``padding=None`` keeps the reference's geometry at any input size: 10 px at height 256 (docs/method.md
    §6), scaled with ``height`` (2 px at 64×32). A fixed 10 px would shift a 64×32 person by up to a
    third of its width, which measurably slows learning of the tiny demo model.

    Returns:
        a callable PIL image → ``[3, height, width]`` float32 tensor (random; uses torch's RNG, which
        DataLoader seeds per worker).
    """
    _check(height, width, mean, std)
    if padding is None:
        padding = reference_padding(height)
    steps: list = [
        v2.ToImage(),
        v2.Resize((height, width), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
    ]
    if flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_p))
    if padding > 0:
        steps += [v2.Pad(padding), v2.RandomCrop((height, width))]
    if color_jitter > 0:
        strength = float(color_jitter)
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength,
                                    hue=min(0.5, strength / 4)))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if erasing_p > 0:
        steps.append(v2.RandomErasing(p=erasing_p, scale=erasing_scale, ratio=erasing_ratio, value=0))
    return v2.Compose(steps)


def reference_padding(height: int) -> int:
    """Pad of the train crop for an input ``height``: the reference's 10 px at 256, scaled (>= 1)."""
    return max(1, int(round(REFERENCE_PADDING * height / REFERENCE_HEIGHT)))


def build_eval_transform(height: int, width: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Bicubic resize to ``height × width``, scale to [0, 1], normalise.

    Returns:
        a callable PIL image → ``[3, height, width]`` float32 tensor (deterministic).
    """
    _check(height, width, mean, std)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((height, width), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
