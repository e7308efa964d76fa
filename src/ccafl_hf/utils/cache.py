"""The package's cache of things built on first use (the synthetic dataset, tiny CLIPs of non-default recipes).

One home for where they live (``$CCAFL_HF_CACHE``, default ``~/.cache/ccafl_hf``), how their
folders are named (a short hash of what made them) and how they are written (into a temporary
sibling renamed into place, so concurrent processes never see one half written).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """``$CCAFL_HF_CACHE/<parts...>`` (default cache ``~/.cache/ccafl_hf``)."""
    base = os.environ.get("CCAFL_HF_CACHE") or os.path.join("~", ".cache", "ccafl_hf")
    return Path(base, *parts).expanduser()


def fingerprint(payload: dict[str, Any]) -> str:
    """Short stable hash of a JSON-ready ``payload`` (names a cache folder)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def write_folder_atomically(root: Path, write: Callable[[Path], None], ready: Callable[[Path], bool]) -> None:
    """Build a folder with ``write(path)`` in a temporary sibling of ``root`` and rename it to ``root``.

    An empty ``root`` (a placeholder) is replaced; when the rename fails because another process put a
    finished folder there first (``ready(root)``), that one is kept. The caller checks beforehand that
    ``root`` holds nothing it must not replace.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write(temp / "data")
        try:
            if root.exists():
                root.rmdir()  # an empty placeholder
            os.replace(temp / "data", root)
        except OSError:
            if not ready(root):  # not another process that finished first
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


__all__ = ["cache_dir", "fingerprint", "write_folder_atomically"]
