"""Collation of `datasets` rows into named tensor batches.

A split returned by `load_reid_dataset` is already a map-style dataset for
`torch.utils.data.DataLoader` (rows are dicts; ``__getitems__`` fetches a batch in one call), so no
wrapper class is needed: pass the split and a `ReIDCollator` as ``collate_fn``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from PIL import Image

from .errors import ReIDDatasetError
from .images import check_on_corrupt, load_image

logger = logging.getLogger(__name__)

#: row column -> batch key. Only these labels are collated; anything else is left out.
LABEL_KEYS = {"camid": "camids", "pid": "pids", "intra_id": "intra_ids", "cam_pid": "cam_pids", "index": "indices"}


class ReIDCollator:
    """Decode, transform and stack a list of rows into a batch dict.

    Each row's image is its ``image`` value when the row has one (a `load_image` source: the ``hf``
    reader keeps the images in Arrow as ``{"bytes", "path"}``), else the file ``image_path``, which
    also names the image in errors.

    Args:
        transform: PIL image → ``[3, H, W]`` tensor (`build_train_transform` / `build_eval_transform`).
        on_corrupt: ``"error"`` raises `ReIDDatasetError` naming an unreadable image; ``"skip"``
            drops it from the batch with a warning (a batch with no readable image still raises).
    Returns (on call):
        ``pixel_values [B, 3, H, W]`` float32 and, for the columns present in the rows, int64 ``[B]``
        tensors ``camids``, ``intra_ids`` and ``cam_pids`` (train), ``pids`` (query/gallery), ``indices``
        (rows that carry an ``index``). The train split's ``diagnostic_pid`` is never collated.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], on_corrupt: str = "error") -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.transform = transform
        self.on_corrupt = check_on_corrupt(on_corrupt)

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("ReIDCollator got an empty batch")
        images, kept = [], []
        for row in rows:
            source = row.get("image")
            if source is None:
                if "image_path" not in row:
                    raise ReIDDatasetError(
                        f"row without 'image_path' or 'image' (columns {sorted(row)}); pass a load_reid_dataset split"
                    )
                source = row["image_path"]
            try:
                image = load_image(source, name=row.get("image_path"))
            except ReIDDatasetError as error:
                if self.on_corrupt == "error":
                    raise
                logger.warning("skipping an unreadable image: %s", error)
                continue
            images.append(self.transform(image))
            kept.append(row)
        if not kept:
            raise ReIDDatasetError(f"no readable image in a batch of {len(rows)}, e.g. {rows[0].get('image_path')}")
        batch = {"pixel_values": torch.stack(images)}
        for column, key in LABEL_KEYS.items():
            if column in kept[0]:
                batch[key] = torch.tensor([row[column] for row in kept], dtype=torch.long)
        return batch
