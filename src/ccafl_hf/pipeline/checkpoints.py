"""Trainer checkpoints that prove they are complete, and the one rule for where a stage resumes."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .manifest import ensure_space, verify_manifest, write_manifest
from .setup import RunError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def required_files(num_processes: int, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The files a resume reads besides the weights (a ``--save_only_model`` checkpoint has none of them)."""
    rng = ["rng_state.pth"] if num_processes == 1 else [f"rng_state_{i}.pth" for i in range(num_processes)]
    return (TRAINER_STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, *rng, *extra)


class CheckpointSealer(TrainerCallback):
    """Checks the free space before each save; writes the checkpoint's manifest (fingerprint, previous) after it."""

    def __init__(self, fingerprint: str, previous: str | None, default_size: int):
        self.fingerprint, self.previous, self.default_size = fingerprint, previous, default_size

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and args.should_save:  # as large as the last checkpoint, else the estimate
            last = checkpoints(Path(args.output_dir))[:1]
            size = sum(f.stat().st_size for f in last[0].iterdir() if f.is_file()) if last else self.default_size
            ensure_space(args.output_dir, size, "a checkpoint")

    on_epoch_end = on_step_end

    def on_save(self, args, state, control, **kwargs):
        process = PartialState()
        process.wait_for_everyone()  # every process wrote its RNG state
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            write_manifest(folder, {"fingerprint": self.fingerprint, "previous": self.previous,
                                    "step": state.global_step, "epoch": state.epoch})
        process.wait_for_everyone()


def checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders of ``folder``, newest (highest N) first."""
    found = [(int(m[1]), p) for p in Path(folder).glob("*") if (m := CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def check_resumable(path: str | Path, fingerprint: str, required: tuple[str, ...], previous=...,
                    before_epoch: float | None = None) -> dict:
    """The manifest of a ``--resume_from_checkpoint PATH`` that resumes exactly, else a one-line `RunError`."""
    why, manifest = _why_not(Path(path), fingerprint, previous, required, before_epoch)
    if why:
        raise RunError(f"--resume_from_checkpoint {path} cannot be resumed exactly: {why}; pass "
                       "--resume_from_checkpoint true for the last checkpoint that can")
    return manifest


def resume_point(folder: str | Path, fingerprint: str, previous: str | None, required: tuple[str, ...],
                 before_epoch: float | None = None, explicit: str | None = None) -> tuple[str | None, dict | None]:
    """``(path, manifest)`` of the checkpoint a stage resumes from (``(None, None)``: its start): ``explicit``, or
    the newest that verifies, holds every ``required`` file, carries ``fingerprint`` and ``previous``, was saved
    at an epoch end and before ``before_epoch``. Those passed over are deleted, named in one log line."""
    folder, found, skipped, chosen = Path(folder), checkpoints(Path(folder)), [], (None, None)
    if explicit is not None:
        chosen = (explicit, check_resumable(explicit, fingerprint, required, previous, before_epoch))
        step = int(Path(explicit).name.rsplit("-", 1)[1])
        skipped = [(p, "newer than --resume_from_checkpoint") for p in found if int(p.name.rsplit("-", 1)[1]) > step]
    else:
        for path in found:
            why, manifest = _why_not(path, fingerprint, previous, required, before_epoch)
            if not why:
                chosen = (str(path), manifest)
                break
            skipped.append((path, why))
    if skipped:
        start = f"from {Path(chosen[0]).name}" if chosen[0] else "from the stage's start"
        logger.warning("%s: resuming %s; discarding %s", folder, start,
                       "; ".join(f"{p.name} ({why})" for p, why in skipped))
        if PartialState().is_main_process:
            for path, _ in skipped:
                shutil.rmtree(path, ignore_errors=True)
    PartialState().wait_for_everyone()
    return chosen


def _why_not(path: Path, fingerprint: str, previous, required: tuple[str, ...],
             before_epoch: float | None) -> tuple[str, dict | None]:
    manifest, why = verify_manifest(path, require=required)
    if manifest is None:
        return why, None
    epoch = float(manifest.get("epoch") or 0)
    if manifest.get("fingerprint") != fingerprint or previous is not ... and manifest.get("previous") != previous:
        why = "saved by a run of other settings or from other results of the stage before"
    elif not epoch.is_integer():
        why = f"saved inside epoch {int(epoch) + 1}, where a resume is not exact"
    elif before_epoch is not None and epoch >= before_epoch:
        why = "past the evaluation whose results must be recomputed"
    return why, manifest
