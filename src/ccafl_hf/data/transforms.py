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
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the reference's normalisation (and its erasing fill)
IMAGENET_STD = (0.229, 0.224, 0.225)
ERASING_STYLES = ("torchvision", "reference")
IMAGE_NORMALIZATIONS = ("processor", "imagenet")


class ReferenceRandomErasing(torch.nn.Module):
    """The reference's random erasing (Zhong et al.'s original): with probability ``p``, up to 100 tries of
    an area fraction ``U(scale)`` and an aspect ratio ``U(r, 1/r)`` — uniform, not log-uniform as torchvision —
    at a random place where the box fits strictly inside; the box is filled with the constants ``fill``
    **in normalised units** (the reference writes ImageNet's mean, 0.485/0.456/0.406, after normalising, so
    the box is not the mean colour). Uses torch's RNG. ``[3, H, W]`` float tensor in, same tensor out."""

    def __init__(self, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.4), ratio: float = 0.3,
                 fill: Sequence[float] = IMAGENET_MEAN, attempts: int = 100):
        super().__init__()
        self.p, self.scale, self.ratio, self.fill, self.attempts = p, scale, ratio, tuple(fill), attempts

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()).item() >= self.p:
            return image
        height, width = image.shape[-2:]
        for _ in range(self.attempts):
            area = torch.empty(()).uniform_(*self.scale).item() * height * width
            aspect = torch.empty(()).uniform_(self.ratio, 1 / self.ratio).item()
            h, w = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
            if w < width and h < height:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                image = image.clone()
                image[..., top:top + h, left:left + w] = torch.tensor(
                    self.fill, dtype=image.dtype, device=image.device).view(-1, 1, 1)
                return image
        return image


def image_normalization(name: str, mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    """``(mean, std)`` of ``--image_normalization``: ``processor`` keeps the model processor's ``mean``/``std``
    (CLIP's statistics for CLIP weights); ``imagenet`` is the reference's ImageNet statistics."""
    if name not in IMAGE_NORMALIZATIONS:
        raise ValueError(f"image normalization must be one of {', '.join(IMAGE_NORMALIZATIONS)}, got {name!r}")
    if name == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return list(mean), list(std)


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
    erasing_style: str = "torchvision",
    color_jitter: float = 0.0,
) -> v2.Compose:
    """Bicubic resize to ``height × width``, horizontal flip (``flip_p``), zero-pad ``padding`` and
    random crop back, scale to [0, 1], normalise, random erasing (``erasing_p``, area
    ``erasing_scale``, aspect ``erasing_ratio`` sampled log-uniformly; erased pixels become 0, the mean colour;
    ``erasing_style="reference"``: `ReferenceRandomErasing`, aspect uniform in ``[r, 1/r]`` with
    ``r = erasing_ratio[0]``, filled with ImageNet's mean values in normalised units).
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
    if erasing_style not in ERASING_STYLES:
        raise ValueError(f"erasing_style must be one of {', '.join(ERASING_STYLES)}, got {erasing_style!r}")
    if erasing_p > 0 and erasing_style == "reference":
        steps.append(ReferenceRandomErasing(p=erasing_p, scale=erasing_scale, ratio=erasing_ratio[0]))
    elif erasing_p > 0:
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
