"""Trainer checkpoints that prove they are complete, and the one rule for where a stage resumes.

`CheckpointSealer` (a `TrainerCallback` the pipeline adds to each stage's trainer) checks the free space
before each save and writes the checkpoint's manifest once the Trainer has saved it. `resume_point`
picks the newest checkpoint that verifies, holds every file a resume needs, was saved at an epoch end
(a resume inside an epoch is not exact) and lies before what must be recomputed; the ones it passes
over are deleted (the run saves those steps again) and named in one log line.
"""

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

_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def required_files(num_processes: int, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The files a resume reads besides the weights: trainer state, optimiser, scheduler, every process's
    RNG state (a ``--save_only_model`` checkpoint has none of them: it is never resumed from)."""
    rng = ["rng_state.pth"] if num_processes == 1 else [f"rng_state_{i}.pth" for i in range(num_processes)]
    return (TRAINER_STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, *rng, *extra)


class CheckpointSealer(TrainerCallback):
    """Before a save: enough free space for it (else one line). After it: the checkpoint's manifest,
    written last, carrying the run's fingerprint and the stage result the training started from."""

    def __init__(self, fingerprint: str, previous: str | None, default_size: int):
        self.fingerprint, self.previous, self.default_size = fingerprint, previous, default_size

    def _check_space(self, args, control) -> None:
        if control.should_save and args.should_save:
            folder = Path(args.output_dir)
            sizes = [sum(f.stat().st_size for f in c.iterdir() if f.is_file()) for c in checkpoints(folder)[:1]]
            ensure_space(folder, sizes[0] if sizes else self.default_size, "a checkpoint")

    def on_step_end(self, args, state, control, **kwargs):
        self._check_space(args, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._check_space(args, control)

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
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))] \
        if folder.is_dir() else []
    return [p for _, p in sorted(found, reverse=True)]


def _why_not(path: Path, fingerprint: str, previous, required: tuple[str, ...],
             before_epoch: float | None) -> tuple[str, dict | None]:
    manifest, why = verify_manifest(path, require=required)
    if manifest is None:
        return why, None
    if manifest.get("fingerprint") != fingerprint or previous is not ... and manifest.get("previous") != previous:
        return "saved by a run of other settings or from other results of the stage before", manifest
    epoch = float(manifest.get("epoch") or 0)
    if not epoch.is_integer():
        return f"saved inside epoch {int(epoch) + 1}, where a resume is not exact", manifest
    if before_epoch is not None and epoch >= before_epoch:
        return "past the evaluation whose results must be recomputed", manifest
    return "", manifest


def check_resumable(path: str | Path, fingerprint: str, required: tuple[str, ...]) -> None:
    """Refuse (one line) a ``--resume_from_checkpoint PATH`` that cannot be resumed exactly, before any work."""
    why, _ = _why_not(Path(path), fingerprint, ..., required, None)
    if why:
        raise RunError(f"--resume_from_checkpoint {path} cannot be resumed exactly: {why}; pass "
                       "--resume_from_checkpoint true for the last checkpoint that can")


def resume_point(folder: str | Path, fingerprint: str, previous: str | None, required: tuple[str, ...],
                 before_epoch: float | None = None, explicit: str | None = None) -> tuple[str | None, dict | None]:
    """``(checkpoint path, its manifest)`` where a stage resumes (``(None, None)``: from its start).

    ``before_epoch``: only checkpoints saved before that epoch (of the stage's trainer) qualify.
    ``explicit``: a ``--resume_from_checkpoint PATH``, refused in one line when it does not qualify;
    newer checkpoints are discarded. Checkpoints passed over are deleted (main process), in one log line.
    """
    folder = Path(folder)
    found = checkpoints(folder)
    if explicit is not None:
        why, manifest = _why_not(Path(explicit), fingerprint, previous, required, before_epoch)
        if why:
            raise RunError(f"--resume_from_checkpoint {explicit} cannot be resumed exactly: {why}; pass "
                           "--resume_from_checkpoint true for the last checkpoint that can")
        step = int(Path(explicit).name.rsplit("-", 1)[1])
        found = [p for p in found if int(p.name.rsplit("-", 1)[1]) > step] + [Path(explicit)]
    skipped, chosen = [], (None, None)
    for path in found:
        why, manifest = _why_not(path, fingerprint, previous, required, before_epoch)
        if not why and (explicit is None or path.resolve() == Path(explicit).resolve()):
            chosen = (str(path), manifest)
            break
        skipped.append((path, why or "newer than --resume_from_checkpoint"))
    if skipped:
        start = f"from {chosen[0] and Path(chosen[0]).name}" if chosen[0] else "from the stage's start"
        logger.warning("%s: resuming %s; discarding %s", folder, start,
                       "; ".join(f"{p.name} ({why})" for p, why in skipped))
        if PartialState().is_main_process:
            for path, _ in skipped:
                shutil.rmtree(path, ignore_errors=True)
    PartialState().wait_for_everyone()
    return chosen
