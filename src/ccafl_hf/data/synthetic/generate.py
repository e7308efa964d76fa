"""Generation: the dataset written as a Market-1501 release, cached by config."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ...cache import write_folder_atomically
from ..datasets.market1501 import MARKET_FOLDERS
from ..errors import ReIDDatasetError
from .config import SyntheticReIDConfig, default_synthetic_root
from .looks import identity_look, keyed_rng
from .render import camera_styles, render_image

logger = logging.getLogger(__name__)

CONFIG_FILE = "synthetic_config.json"


def _plan(config: SyntheticReIDConfig) -> list[tuple[str, int, int, int]]:
    """``(folder, pid, camera, image index)`` of every image, in a fixed order."""
    r = keyed_rng(config.seed, 0)
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
    cameras = camera_styles(config)
    for folder in MARKET_FOLDERS.values():
        (target / folder).mkdir(parents=True)
    frames = [0] * config.num_cameras
    distractor_base = config.num_train_identities + config.num_test_identities + 1
    for folder, pid, cam, k in _plan(config):
        look = identity_look(config.seed, pid if pid > 0 else distractor_base + k)
        r = keyed_rng(config.seed, 3, pid, cam, k)
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
