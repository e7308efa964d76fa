"""Trainer checkpoints of a run: complete or cut off, explicit or the last one, and where a run resumes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME

from ..trainers import (
    CCAFLTrainingArguments,
)
from .constants import _CHECKPOINT, LOOP_CHECKPOINTS
from .setup import RunError

logger = logging.getLogger(__name__)


def _resume_message(stage: str, checkpoint: str, out: Path) -> str:
    state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
    return (f"resuming {stage.upper()} at epoch {state.get('epoch', 0):g} (step {state.get('global_step', 0)}) "
            f"from {_relative(checkpoint, out)}")


def _relative(path: str | Path, out: Path) -> Path:
    """``path`` relative to the output folder when inside it."""
    where = Path(path).resolve()
    return where.relative_to(out.resolve()) if where.is_relative_to(out.resolve()) else where


def _checkpoint_is_complete(folder: Path) -> bool:
    """The Trainer writes ``trainer_state.json`` last: a checkpoint without a readable one was cut off."""
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(folder: str | Path, discard_incomplete: bool = False) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that was completely written, or None.

    A run killed while saving leaves a partial folder; it is skipped (and deleted when
    ``discard_incomplete``, so the resumed run can write that step again).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (m := _CHECKPOINT.fullmatch(path.name))]
    for _, path in sorted(found, reverse=True):
        if _checkpoint_is_complete(path):
            return str(path)
        logger.warning("skipping %s: written only in part (the run was stopped while saving it)", path)
        if discard_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def _explicit_checkpoint(args: CCAFLTrainingArguments) -> tuple[str, str] | None:
    """``(stage, path)`` of an explicit ``--resume_from_checkpoint PATH`` inside this run's folder."""
    value = args.resume_from_checkpoint
    if not value or str(value).lower() == "true":
        return None
    path = Path(value).resolve()
    if not path.is_dir():
        raise RunError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    checkpoints = Path(args.output_dir).resolve() / "checkpoints"
    if path.parent.parent != checkpoints or path.parent.name not in [*args.stages, LOOP_CHECKPOINTS]:
        raise RunError(
            f"--resume_from_checkpoint {value} is not a checkpoint of this run; expected "
            f"{checkpoints}/<stage>/checkpoint-N (or pass --resume_from_checkpoint true for the last one)"
        )
    if not _checkpoint_is_complete(path):
        raise RunError(f"--resume_from_checkpoint {value} was written only in part (no readable "
                       f"{TRAINER_STATE_NAME}); pass --resume_from_checkpoint true for the last complete one")
    return path.parent.name, str(path)


