"""The output folder of a training run: its identity (fingerprint), its lock, the plan, its stage results.

* The **fingerprint** (`run_settings`) covers the content of the data (`data_identity`: the sorted
  ``(relative path, content hash, labels)`` of every image), the content of the start model
  (`model_identity`), the number of processes and **every** argument except the result-neutral
  allow-list `RESULT_NEUTRAL_ARGUMENTS` (each entry proven neutral by a test: same result, bit for bit).
* `RunDirectory.plan` decides before any work: ``fresh``, ``resume`` (same fingerprint), ``finished``
  (the run's manifest verifies), ``replace`` (``--overwrite_output_dir`` on a folder holding this
  package's run) — or refuses in one line: other settings (named), or a folder of files that are no run.
* A stage's results exist only as a verified manifest (`ccafl_hf.pipeline.manifest`) carrying this
  fingerprint and the hash of the stage result it was computed from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from .manifest import (
    FORMAT,
    TEMP_PREFIX,
    cached_digests,
    describe_write_error,
    file_digest,
    json_digest,
    read_json,
    verify_manifest,
    write_manifest,
)
from .setup import RunError

logger = logging.getLogger(__name__)

RUN_FILE = "ccafl_run.json"  # the run's manifest: settings, fingerprint and, once finished, its files
LOCK_FILE = ".ccafl_run.lock"
PID_FILE = ".ccafl_run.pid"
REPLACED_PREFIX = ".ccafl-replaced-"

#: Arguments proven not to change what a run computes (tests/test_lifecycle.py reruns with every one of
#: them changed and compares bit for bit): paths, logging, saving, reporting and Hub upload. Every other
#: field of the arguments is fingerprinted, including any added later.
RESULT_NEUTRAL_ARGUMENTS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "run_name", "logging_strategy", "logging_steps",
    "logging_first_step", "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node",
    "report_to", "disable_tqdm", "save_strategy", "save_steps", "save_total_limit", "save_on_each_node",
    "save_only_model", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
    "hub_always_push", "hub_revision",
})
#: Not a setting but the process's place in the run (differs between the processes of one run); the
#: number of processes is fingerprinted instead.
PROCESS_ARGUMENTS = frozenset({"local_rank"})
#: Model/data arguments replaced by what they resolve to: the data folder by the data's content (a moved
#: copy still matches), the preset name by its values.
RESULT_NEUTRAL_INPUTS = frozenset({"data_dir", "preset"})
RUN_ONLY_ARGUMENTS = RESULT_NEUTRAL_ARGUMENTS | PROCESS_ARGUMENTS  # the name of 0.x


class RunDirectoryError(RunError):
    """The output folder cannot be used for this run (reported as one line by the script)."""


# ---------------------------------------------------------------------------------------- identity
def _check_image_header(path: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.size  # noqa: B018  (the header is parsed on open; the size proves it)
    except (OSError, SyntaxError, ValueError) as error:
        raise RunError(f"{path}: not a decodable image ({' '.join(str(error).split())}); fix or remove it") from None


def data_identity(dataset) -> str:
    """Hash of a `DatasetDict`'s content: per split, the sorted ``(relative path, content hash, labels)`` of
    every image. Every image file is header-checked when it is hashed (hashes are cached by path, size,
    mtime and inode). Same files and labels elsewhere match; one changed byte does not."""
    splits = {name: dataset[name] for name in sorted(dataset)}
    paths = [p for s in splits.values() if "image_path" in s.column_names for p in s["image_path"][:]]
    digests = dict(zip(paths, cached_digests(paths, check=_check_image_header), strict=True))
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    rows_of = {}
    for name, split in splits.items():
        columns = {c: split[c][:] for c in split.column_names if c != "image_path"}
        for c, values in columns.items():
            if values and (isinstance(values[0], dict) and "bytes" in values[0] or hasattr(values[0], "tobytes")):
                columns[c] = [_image_digest(v) for v in values]  # 🤗 datasets image values, decoded or not
        files = ([[os.path.relpath(os.path.abspath(p), root), digests[p]] for p in split["image_path"][:]]
                 if "image_path" in split.column_names else [[]] * split.num_rows)
        labels = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
        rows = [[*f, _jsonable(label)] for f, label in zip(files, labels or [{}] * len(files), strict=True)]
        rows_of[name] = sorted(json.dumps(row, sort_keys=True) for row in rows)
    return json_digest(rows_of)[:24]


def _image_digest(value) -> str:
    if isinstance(value, dict):
        return file_digest(value["path"]) if value.get("bytes") is None else hashlib.blake2b(value["bytes"]).hexdigest()
    return hashlib.blake2b(value.tobytes()).hexdigest()  # a decoded PIL image: its pixels


def model_identity(name_or_path: str, model) -> str:
    """Hash of the start model's content: every file of a local folder (weights, config, tokenizer), else
    (the built-in tiny models, a Hub checkpoint) the loaded weights themselves."""
    folder = Path(name_or_path)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        digests = cached_digests([str(p) for p in files])
        return json_digest([[p.relative_to(folder).as_posix(), d] for p, d in zip(files, digests, strict=True)])[:24]
    digest = hashlib.blake2b(digest_size=32)
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(getattr(value, "value", value))  # enums (IntervalStrategy, …) and anything else: their text


def run_settings(model_args, data_args, args, data_files: str, model_files: str = "",
                 num_processes: int = 1) -> dict[str, Any]:
    """Every setting that can change a run's results, flat (``{flag name: value}``): all fields of the
    three argument dataclasses except `RESULT_NEUTRAL_INPUTS`, `RESULT_NEUTRAL_ARGUMENTS` and
    `PROCESS_ARGUMENTS`, plus ``data_files`` (`data_identity`), ``model_files`` (`model_identity`) and
    ``num_processes``."""
    settings: dict[str, Any] = {}
    for source, excluded in ((model_args, RESULT_NEUTRAL_INPUTS), (data_args, RESULT_NEUTRAL_INPUTS),
                             (args, RESULT_NEUTRAL_ARGUMENTS | PROCESS_ARGUMENTS)):
        for item in dataclasses.fields(source):
            if item.name.startswith("_") or item.name in excluded:
                continue
            value = getattr(source, item.name)
            if isinstance(value, str) and value.lstrip().startswith("{"):  # JSON options: their content counts
                with suppress(ValueError):
                    value = json.loads(value)
            settings[item.name] = _jsonable(value)
    settings.update(data_files=data_files, model_files=model_files, num_processes=num_processes)
    return settings


def describe_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``--name old -> new`` for each setting that differs (the first ``limit``, then a count)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    shown = [f"--{k} {json.dumps(old.get(k, '<unset>'))} -> {json.dumps(new.get(k, '<unset>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"and {len(keys) - limit} more")
    return ", ".join(shown)


# -------------------------------------------------------------------------------------- the folder
@dataclasses.dataclass
class RunPlan:
    """``fresh`` (nothing here yet), ``resume`` (same settings: verified stages are reused, the rest redone
    from the last verified checkpoint), ``finished`` (the run's manifest verifies: nothing to train) or
    ``replace`` (``--overwrite_output_dir`` on a folder holding a run of this package)."""

    action: str


class RunDirectory:
    """The output folder of one training run (see the module docstring). Only the main process locks,
    moves, deletes and writes; every process reads and verifies."""

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any] | None = None, is_main_process: bool = True):
        if not str(path).strip():
            raise RunDirectoryError("--output_dir is empty: name the run's folder (e.g. --output_dir outputs/my-run)")
        self.path = Path(path)
        self.is_main_process = is_main_process
        self.settings, self.fingerprint = {}, ""
        if settings is not None:
            self.set_settings(settings)
        self.plan_: RunPlan | None = None
        self._started = False

    def set_settings(self, settings: dict[str, Any]) -> None:
        """This run's `run_settings` and their fingerprint."""
        self.settings, self.fingerprint = settings, json_digest(settings)[:16]

    # ------------------------------------------------------------------------------------- lock
    @contextmanager
    def lock(self) -> Iterator[RunDirectory]:
        """Hold the folder's lock (`filelock`, main process) for the ``with`` block: a second run is refused
        at once naming the holder's PID; a killed holder's lock is taken over. A run that fails before
        `start` leaves the folder as it found it."""
        if not self.is_main_process:
            yield self
            return
        created, had_lock = not self.path.exists(), (self.path / LOCK_FILE).exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path / LOCK_FILE, timeout=0, thread_local=False)
            lock.acquire()
        except Timeout:
            holder = (self.path / PID_FILE).read_text().strip() if (self.path / PID_FILE).is_file() else "unknown"
            raise RunDirectoryError(f"--output_dir {self.path} is in use by another training run (PID {holder}); wait "
                                    "for it to end or choose another --output_dir") from None
        except OSError as error:
            raise RunDirectoryError(f"--output_dir {self.path}: cannot create or lock it ({error.strerror})") from None
        pid_file = self.path / PID_FILE
        stale = pid_file.read_text().strip() if pid_file.is_file() else ""
        if stale:
            logger.warning("%s: the run with PID %s ended without releasing its lock (killed?); taking it over",
                           self.path, stale)
        pid_file.write_text(f"{os.getpid()}\n")
        try:
            yield self
        finally:
            pid_file.unlink(missing_ok=True)
            lock.release()
            if not self._started and not had_lock:
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                if created:
                    with suppress(OSError):
                        self.path.rmdir()  # only when still empty

    # ------------------------------------------------------------------------------------- plan
    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def _run_manifest(self) -> dict | None:
        content = read_json(self.run_file)
        ok = (isinstance(content, dict) and content.get("format") == FORMAT and isinstance(content.get("settings"), dict)
              and isinstance(content.get("fingerprint"), str))
        return content if ok else None

    def _entries(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.name not in (LOCK_FILE, PID_FILE)) if self.path.is_dir() else []

    def _sweep(self) -> None:
        """Leftovers of a killed run: temporary files (deleted) and a previous run moved aside by an overwrite
        (restored when the replacing run never started, else deleted)."""
        for leftover in sorted(self.path.rglob(f"{TEMP_PREFIX}*"), reverse=True):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        for aside in self.path.glob(f"{REPLACED_PREFIX}*"):
            if self._run_manifest() is None:
                logger.warning("restoring the previous run that an interrupted --overwrite_output_dir moved aside")
                for entry in aside.iterdir():
                    os.replace(entry, self.path / entry.name)
            shutil.rmtree(aside, ignore_errors=True)

    def plan(self, overwrite: bool = False) -> RunPlan:
        """Decide, before any work, what this run does with the folder (see `RunPlan`); raise
        `RunDirectoryError` (one line) for a folder of another run (naming the differing settings, unless
        ``overwrite``) or for a non-empty folder that holds no run of this package (always)."""
        if self.is_main_process and self.path.is_dir():
            self._sweep()
        previous, entries = self._run_manifest(), self._entries()
        if not entries:
            action = "fresh"
        elif previous is None:
            legacy = read_json(self.run_file)
            if isinstance(legacy, dict) and {"fingerprint", "settings"} <= set(legacy):  # an earlier version's run
                if not overwrite:
                    raise RunDirectoryError(
                        f"--output_dir {self.path} holds a run of an earlier ccafl-hf version, whose files carry no "
                        "content hashes; pass --overwrite_output_dir to replace it or choose another --output_dir")
                action = "replace"
            elif self.fingerprint in self._stage_fingerprints():
                logger.warning("%s is unreadable; its stage results carry this run's settings: resuming", self.run_file)
                action = "resume"
            else:
                what = (f"its {RUN_FILE} is unreadable" if self.run_file.exists()
                        else f"it holds no ccafl-hf run ({', '.join(p.name for p in entries[:3])}"
                             f"{', …' if len(entries) > 3 else ''})")
                raise RunDirectoryError(
                    f"--output_dir {self.path} is not empty and {what}: nothing was changed; choose another "
                    "--output_dir (--overwrite_output_dir only ever replaces a run of this package)")
        elif not self._holds_work(previous) or overwrite:
            action = "replace"  # a run that never trained is no reason to refuse its fix
        elif previous["fingerprint"] != self.fingerprint:
            raise RunDirectoryError(
                f"--output_dir {self.path} holds another run's checkpoints or results with different settings "
                f"({describe_differences(previous['settings'], self.settings)}); pass --overwrite_output_dir to "
                "replace it or choose another --output_dir")
        elif previous.get("finished"):
            verified, why = verify_manifest(self.path, manifest=RUN_FILE)
            action = "finished" if verified else "resume"
            if not verified:
                logger.warning("the finished run in %s does not verify (%s): redoing what is missing", self.path, why)
        else:
            action = "resume"
        self.plan_ = RunPlan(action)
        return self.plan_

    def _holds_work(self, previous: dict) -> bool:
        checkpoints = self.path / "checkpoints"
        return bool(previous.get("finished")) or (checkpoints.is_dir() and any(checkpoints.iterdir()))

    def _stage_fingerprints(self) -> set[str]:
        found = (read_json(p) for p in (self.path / "checkpoints").glob("*/final/manifest.json"))
        return {m.get("fingerprint") for m in found if isinstance(m, dict)}

    def start(self) -> None:
        """The run is about to train: a replaced run is moved aside, the new run's manifest written, then the
        old run deleted (restored if anything before fails); the run's manifest says "not finished"."""
        plan = self.plan_ or self.plan()
        self._started = True
        if not self.is_main_process:
            return
        entries = self._entries() if plan.action == "replace" else []
        aside = self.path / f"{REPLACED_PREFIX}{os.getpid()}"
        moved: list[Path] = []
        try:
            if entries:
                aside.mkdir()
                for entry in entries:
                    os.replace(entry, aside / entry.name)
                    moved.append(entry)
            self._write_run_manifest(finished=False, files=[])
        except BaseException:
            for entry in moved:
                os.replace(aside / entry.name, entry)
            shutil.rmtree(aside, ignore_errors=True)
            raise
        if entries:
            logger.info("--overwrite_output_dir: deleting the previous run in %s", self.path)
            shutil.rmtree(aside)

    def finish(self, files: list[Path]) -> None:
        """Mark the run finished: its manifest lists (and hashes) the final ``files``; written last."""
        if self.is_main_process:
            self._write_run_manifest(finished=True, files=files)

    def _write_run_manifest(self, finished: bool, files: list[Path]) -> None:
        payload = {"fingerprint": self.fingerprint, "finished": finished, "settings": self.settings}
        write_manifest(self.path, payload, files=[self.path / f for f in files], name=RUN_FILE)

    # ------------------------------------------------------------------------------ stage results
    def stage_dir(self, stage: str) -> Path:
        """``checkpoints/<stage>/final``: a stage's results (``untrained``: the evaluation before training)."""
        return self.path / "checkpoints" / stage / "final"

    def result(self, stage: str, previous: str | None) -> dict | None:
        """The verified manifest of ``stage`` (``metrics``, files) when it carries this run's fingerprint and
        was computed from the stage result whose digest is ``previous``; else None, with one log line."""
        folder = self.stage_dir(stage)
        if not folder.exists():
            return None
        manifest, why = verify_manifest(folder)
        if manifest is not None and (manifest.get("fingerprint") != self.fingerprint
                                     or manifest.get("previous") != previous):
            manifest, why = None, "computed with other settings or from other results of the stage before"
        if manifest is None:
            logger.warning("the results of %s in %s do not verify (%s): recomputing them", stage.upper(), folder, why)
        return manifest

    def save_result(self, stage: str, metrics: dict, previous: str | None) -> None:
        """Seal ``stage``'s folder (files written there first) with its metrics: the manifest is written last."""
        if self.is_main_process:
            write_manifest(self.stage_dir(stage), {"fingerprint": self.fingerprint, "stage": stage,
                                                   "metrics": metrics, "previous": previous})


def digest(manifest: dict | None) -> str | None:
    """What the next stage records as ``previous``: the hash of a stage's manifest."""
    return None if manifest is None else json_digest(manifest)


__all__ = ["RESULT_NEUTRAL_ARGUMENTS", "RUN_FILE", "RUN_ONLY_ARGUMENTS", "RunDirectory", "RunDirectoryError",
           "RunPlan", "data_identity", "describe_differences", "describe_write_error", "digest", "model_identity", "run_settings"]
