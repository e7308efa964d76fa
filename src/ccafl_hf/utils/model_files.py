"""Checks of a saved model folder before it is loaded: one clear line naming the bad file, never a traceback.

A folder passed as ``--model`` (`scripts/evaluate.py`, `scripts/retrieval.py`) or ``--model_name_or_path``
(`scripts/train.py`) must hold a ``config.json`` that is a JSON object and weights in safetensors
(``model.safetensors`` or shards listed by ``model.safetensors.index.json``) whose headers cover the
whole file. Pickle weights (``pytorch_model.bin``, ``*.pt``) are refused: loading them runs code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import CCAFLError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

T = TypeVar("T")


class ModelFolderError(CCAFLError):
    """A saved model folder that cannot be loaded; the message names the file and what is wrong."""


def is_path_like(name: str | os.PathLike) -> bool:
    """``name`` can only mean a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``), never a Hub id (``owner/name``)."""
    name = os.fspath(name)
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_folder(folder: str | os.PathLike, flag: str = "--model") -> None:
    """Validate a local model folder (see the module docstring); no-op for a Hub id.

    Raises:
        ModelFolderError: a path-like name (`is_path_like`) that does not exist, unreadable/malformed
            ``config.json``, no safetensors weights (pickle only), a truncated or corrupt safetensors file.
    """
    from safetensors import safe_open

    if is_path_like(folder) and not Path(folder).expanduser().exists():
        raise ModelFolderError(f"{flag} {os.fspath(folder)}: no such model folder")
    folder = Path(folder)
    if not folder.is_dir():
        return
    config = folder / "config.json"
    if config.is_file():
        try:
            content = json.loads(config.read_text())
        except (OSError, ValueError) as error:
            raise ModelFolderError(f"{flag} {folder}: {config} is not valid JSON ({error})") from None
        if not isinstance(content, dict):
            raise ModelFolderError(f"{flag} {folder}: {config} must hold a JSON object")
    shards = _safetensors_files(folder, flag)
    if not shards:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelFolderError(
                f"{flag} {folder}: holds only pickle weights ({', '.join(pickles)}); only safetensors are loaded "
                f"(pickle files can run code): save the model with save_pretrained (safetensors) first"
            )
        return  # a CLIP/CCAFL folder without weights is reported by the loader
    for shard in shards:
        if not shard.is_file():
            raise ModelFolderError(f"{flag} {folder}: {shard} is listed in {SAFE_INDEX} but missing")
        try:
            with safe_open(str(shard), "pt") as handle:
                handle.keys()
        except Exception as error:  # SafetensorError derives from Exception only
            reason = " ".join(str(error).split())
            raise ModelFolderError(f"{flag} {folder}: {shard} is corrupt or cut off ({reason})") from None


def _safetensors_files(folder: Path, flag: str) -> list[Path]:
    if (folder / SAFE_WEIGHTS).exists():
        return [folder / SAFE_WEIGHTS]
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelFolderError(f"{flag} {folder}: {index} is malformed ({error})") from None
    return []


def load_checked(folder: str | os.PathLike, load: Callable[[], T], flag: str = "--model") -> T:
    """Run ``load()`` (a ``from_pretrained`` of ``folder``) after `check_model_folder`; an error the checks
    could not foresee (a config value of the wrong type or size, weights that do not fit the config) becomes
    one `ModelFolderError` line naming ``config.json``."""
    check_model_folder(folder, flag)
    try:
        return load()
    except ModelFolderError:
        raise
    except Exception as error:  # config validation errors come from several libraries (no common base)
        if not Path(folder).is_dir() or isinstance(error, OSError | ImportError):
            raise
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise ModelFolderError(
            f"{flag} {folder}: cannot build the model from {Path(folder) / 'config.json'} and its weights "
            f"({type(error).__name__}: {reason})"
        ) from None


__all__ = ["ModelFolderError", "check_model_folder", "load_checked"]
