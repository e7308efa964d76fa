"""Market-1501 (Zheng et al., ICCV 2015) and every release in its layout.

Layout::

    Market-1501-v15.09.15/
        bounding_box_train/   0002_c1s1_000451_03.jpg   (pid _ c camera s sequence _ frame _ box)
        query/
        bounding_box_test/    -1_c1s1_...  junk (dropped);  0000_c1s1_...  distractors (kept)

The camera is the digit after ``c`` (1-based in the name, 0-based ``camid``). Non-image files
(``Thumbs.db``) are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .base import (
    ReIDDatasetError,
    ReIDSource,
    SplitRecords,
    list_image_files,
    parse_names,
    register_reader,
    resolve_root,
)

MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MARKET_PATTERN = re.compile(r"^(-1|\d+)_c(\d+)s\d+_\d+_\d+\.[A-Za-z]+$", re.MULTILINE)
MARKET_CONVENTION = "'<pid>_c<camera>s<sequence>_<frame>_<box>.jpg' (e.g. 0002_c1s1_000451_03.jpg; pid -1 = junk)"


def read_market_style(
    root: Path,
    name: str,
    pattern: re.Pattern = MARKET_PATTERN,
    convention: str = MARKET_CONVENTION,
    folders: Mapping[str, str] = MARKET_FOLDERS,
) -> ReIDSource:
    """Read a release whose three split folders hold images named ``<pid>_c<camera>...``.

    ``pattern`` captures (pid, 1-based camera) as its first two groups. The train split's person
    id becomes both the within-camera label and the diagnostic pid.
    """
    splits = {}
    for split, folder in folders.items():
        directory = root / folder
        names = list_image_files(directory, f"the {name} {split} split")
        groups = parse_names(names, pattern, directory, convention)
        pids, cameras = groups[:, 0], groups[:, 1]
        if (cameras < 1).any():
            bad = names[int(np.argmax(cameras < 1))]
            raise ReIDDatasetError(f"{directory / bad}: camera numbers in file names start at 1 ({convention})")
        base = os.fspath(directory) + os.sep
        paths = [base + n for n in names]
        splits[split] = SplitRecords(paths, pids, cameras - 1, pids.copy() if split == "train" else None)
    return ReIDSource(name, root, splits["train"], splits["query"], splits["gallery"])


@register_reader("market1501", "market", "market-1501")
def read_market1501(data_dir: str | os.PathLike | None) -> ReIDSource:
    """Market-1501: ``data_dir`` is ``Market-1501-v15.09.15/`` or its parent."""
    root = resolve_root(data_dir, "market1501", ("Market-1501-v15.09.15", "Market-1501", "market1501"),
                        tuple(MARKET_FOLDERS.values()))
    return read_market_style(root, "market1501")
