"""Image decoding with errors that name the file, and an optional full check of a split.

An image comes as a file path (the ``image_path`` column of every reader) or as a 🤗 datasets image
value — ``{"bytes": ..., "path": ...}``, what an ``Image(decode=False)`` column holds (the ``image``
column of the ``hf`` reader) — or as a `PIL.Image.Image`.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
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


#: A file path, a 🤗 datasets image value ``{"bytes": bytes | None, "path": str | None}`` or a PIL image.
ImageSource = str | os.PathLike | Mapping | Image.Image


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Decode ``source`` fully into an RGB `PIL.Image` (truncated files fail here, not later).

    Args:
        source: a file path, a datasets image value (its ``bytes`` when present, else its ``path``)
            or a PIL image.
        name: what error messages call the image (default: its path).
    Raises:
        ReIDDatasetError: the file is missing, truncated or not an image; the message names it.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, Mapping):
        data, path = source.get("bytes"), source.get("path")
        name = name or path or "<image bytes>"
        if data is None and not path:
            raise ReIDDatasetError(f"{name}: image value without bytes or path")
        opened = io.BytesIO(data) if data is not None else path
    elif isinstance(source, (str, os.PathLike)):
        opened, name = source, name or os.fspath(source)
    else:
        raise ReIDDatasetError(f"{name or '<image>'}: cannot decode a {type(source).__name__}; expected a path, "
                               "a datasets image value or a PIL image")
    try:
        with Image.open(opened) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ReIDDatasetError(f"{name}: image file does not exist") from None
    except _DECODE_ERRORS as error:
        raise ReIDDatasetError(f"{name}: corrupt or unreadable image ({error})") from None


def find_corrupt_images(sources: Sequence[ImageSource], num_threads: int | None = None) -> np.ndarray:
    """``[M]`` bool, true where the image cannot be decoded. Decodes every image (threads; PIL
    releases the GIL while decoding), so it costs about one pass over the data."""

    def bad(source: ImageSource) -> bool:
        try:
            load_image(source)
        except ReIDDatasetError:
            return True
        return False

    workers = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.fromiter(pool.map(bad, sources, chunksize=64), dtype=bool, count=len(sources))
