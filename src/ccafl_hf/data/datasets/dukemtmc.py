"""DukeMTMC-reID (Zheng et al., ICCV 2017), in the Market-1501 folder layout.

Layout::

    DukeMTMC-reID/
        bounding_box_train/   0001_c2_f0046182.jpg   (pid _ c camera _ f frame)
        query/
        bounding_box_test/
"""

from __future__ import annotations

import os
import re

from .base import ReIDSource, register_reader, resolve_root
from .market1501 import MARKET_FOLDERS, read_market_style

DUKE_PATTERN = re.compile(r"^(-1|\d+)_c(\d+)_f\d+\.[A-Za-z]+$", re.MULTILINE)
DUKE_CONVENTION = "'<pid>_c<camera>_f<frame>.jpg' (e.g. 0001_c2_f0046182.jpg)"


@register_reader("dukemtmc", "duke", "dukemtmc-reid", "dukemtmcreid")
def read_dukemtmc(data_dir: str | os.PathLike | None) -> ReIDSource:
    """DukeMTMC-reID: ``data_dir`` is ``DukeMTMC-reID/`` or its parent."""
    root = resolve_root(data_dir, "dukemtmc", ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmc"),
                        tuple(MARKET_FOLDERS.values()))
    return read_market_style(root, "dukemtmc", DUKE_PATTERN, DUKE_CONVENTION)
