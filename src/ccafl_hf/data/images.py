"""Image decoding with errors that name the file, and an optional full check of a split."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ReIDDatasetError

logger = logging.getLogger(__name__)

ON_CORRUPT = ("error", "skip")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def check_on_corrupt(on_corrupt: str) -> str:
    """Validate the ``on_corrupt`` flag (``"error"`` or ``"skip"``)."""
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    return on_corrupt


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully into an RGB `PIL.Image` (truncated files fail here, not later).

    Raises:
        ReIDDatasetError: the file is missing, truncated or not an image; the message names it.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ReIDDatasetError(f"{os.fspath(path)}: image file does not exist") from None
    except _DECODE_ERRORS as error:
        raise ReIDDatasetError(f"{os.fspath(path)}: corrupt or unreadable image ({error})") from None


def find_corrupt_images(paths: Sequence[str], num_threads: int | None = None) -> np.ndarray:
    """``[M]`` bool, true where the image cannot be decoded. Decodes every file (threads; PIL
    releases the GIL while decoding), so it costs about one pass over the data."""

    def bad(path: str) -> bool:
        try:
            load_image(path)
        except ReIDDatasetError:
            return True
        return False

    workers = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.fromiter(pool.map(bad, paths, chunksize=64), dtype=bool, count=len(paths))
