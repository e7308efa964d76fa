"""The embedded synthetic dataset as a reader: generated on first use (`ccafl_hf.data.synthetic`),
then read back as the Market-1501 release it is."""

from __future__ import annotations

import os

from ..synthetic import SyntheticReIDConfig, generate_synthetic_reid
from .base import ReIDSource, register_reader
from .market1501 import read_market_style


@register_reader("synthetic", "embedded")
def read_synthetic(data_dir: str | os.PathLike | None = None, **options) -> ReIDSource:
    """The synthetic dataset, generated on first use in ``data_dir`` (default: the cache) and read
    back by the Market-1501 reader. ``options`` are `SyntheticReIDConfig` fields."""
    config = SyntheticReIDConfig.from_options(**options)
    root = generate_synthetic_reid(data_dir, config)
    return read_market_style(root.resolve(), "synthetic")
