"""Fixture builders for the data tests: tiny real images laid out like each release."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _write_image(path: Path, seed: int = 0, size: tuple[int, int] = (4, 8)) -> None:
    """A small real image (width × height ``size``) whose format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix == ".png" else "JPEG")


@pytest.fixture
def write_image() -> Callable[..., None]:
    return _write_image


@pytest.fixture
def make_tree() -> Callable[[Path, dict[str, Iterable[str]]], Path]:
    """``make_tree(root, {folder: [file names]})`` writes a tiny image per name (empty folders allowed)."""

    def make(root: Path, layout: dict[str, Iterable[str]]) -> Path:
        for folder, names in layout.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(names):
                _write_image(root / folder / name, seed=i)
        return root

    return make


MARKET_LAYOUT = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg", "0002_c1s1_000551_01.jpg", "0002_c2s1_000301_02.jpg",
        "0007_c1s2_001234_01.jpg", "0007_c3s1_000100_01.jpg", "0007_c3s1_000200_02.jpg",
        "0011_c2s1_004000_01.jpg", "0011_c3s3_000001_01.jpg",
    ],
    "query": ["0100_c1s1_000001_00.jpg", "0200_c2s1_000001_00.jpg"],
    "bounding_box_test": [
        "0100_c1s1_000009_01.jpg", "0100_c2s1_000009_01.jpg", "0200_c3s1_000010_01.jpg",
        "-1_c1s1_000002_01.jpg", "0000_c2s1_000003_01.jpg",
    ],
}


@pytest.fixture
def market_root(tmp_path, make_tree) -> Path:
    """``tmp/Market-1501-v15.09.15`` with 8 train images (pids 2, 7, 11 over 3 cameras), 2 queries,
    a gallery with junk and a distractor, and a ``Thumbs.db``."""
    root = make_tree(tmp_path / "Market-1501-v15.09.15", MARKET_LAYOUT)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    return root


MSMT_TRAIN = ["0000/0000_000_01_0303morning_0015_0.jpg", "0000/0000_001_02_0303noon_0020_1.jpg",
              "0001/0001_000_01_0303morning_0030_0.jpg", "0001/0001_004_03_0303afternoon_0101_0.jpg"]
MSMT_VAL = ["0002/0002_000_02_0303morning_0040_0.jpg"]
MSMT_QUERY = ["0000/0000_000_04_0113morning_0002_0.jpg", "0001/0001_000_05_0113morning_0002_0.jpg"]
MSMT_GALLERY = ["0000/0000_003_05_0113noon_0010_0.jpg", "0001/0001_002_04_0113noon_0011_0.jpg"]


@pytest.fixture
def make_msmt(tmp_path, make_tree) -> Callable[[str], Path]:
    """``make_msmt("MSMT17_V1")`` or ``make_msmt("MSMT17_V2")``: a list-file release under tmp."""

    def make(version: str) -> Path:
        root = tmp_path / version
        train_dir, test_dir = ("train", "test") if version.endswith("V1") else ("mask_train_v2", "mask_test_v2")
        make_tree(root / train_dir, {"": MSMT_TRAIN + MSMT_VAL})
        make_tree(root / test_dir, {"": MSMT_QUERY + MSMT_GALLERY})
        lists = {"list_train.txt": MSMT_TRAIN, "list_val.txt": MSMT_VAL, "list_query.txt": MSMT_QUERY,
                 "list_gallery.txt": MSMT_GALLERY}
        for list_name, entries in lists.items():
            (root / list_name).write_text("".join(f"{e} {int(e[:4])}\n" for e in entries))
        return root

    return make


@pytest.fixture
def write_manifest() -> Callable[[Path, list[dict]], Path]:
    """``write_manifest(path, rows)`` writes CSV or JSONL by suffix (CSV columns from the first row)."""

    def write(path: Path, rows: list[dict]) -> Path:
        if path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            columns = list(rows[0])
            lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
            path.write_text("\n".join(lines) + "\n")
        return path

    return write
