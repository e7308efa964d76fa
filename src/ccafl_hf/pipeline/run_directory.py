"""A run's output folder: identity by content, lock, plan, stage results (docs/training.md, "The run's lifecycle")."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from PIL import Image

from .manifest import (
    FORMAT,
    TEMP_PREFIX,
    cached_digests,
    file_digest,
    json_digest,
    read_json,
    remove,
    verify_manifest,
    write_manifest,
)
from .setup import RunError

logger = logging.getLogger(__name__)

RUN_FILE = "ccafl_run.json"  # the run's manifest: settings, fingerprint and, once finished, its files
LOCK_FILE = ".ccafl_run.lock"
PID_FILE = ".ccafl_run.pid"
REPLACED_PREFIX = ".ccafl-replaced-"

#: Arguments proven not to change what a run computes (tests/test_lifecycle.py reruns with all of them
#: changed and compares bit for bit). Every other field of the arguments is fingerprinted.
RESULT_NEUTRAL_ARGUMENTS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "run_name", "logging_strategy", "logging_steps",
    "logging_first_step", "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node",
    "report_to", "disable_tqdm", "save_strategy", "save_steps", "save_total_limit", "save_on_each_node",
    "save_only_model", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
    "hub_always_push", "hub_revision",
})
#: The process's place in the run, not a setting (the number of processes is fingerprinted instead).
PROCESS_ARGUMENTS = frozenset({"local_rank"})
#: Model/data arguments replaced by what they resolve to: the data's content, the preset's values.
RESULT_NEUTRAL_INPUTS = frozenset({"data_dir", "preset"})
RUN_ONLY_ARGUMENTS = RESULT_NEUTRAL_ARGUMENTS | PROCESS_ARGUMENTS  # the name of 0.x


class RunDirectoryError(RunError):
    """The output folder cannot be used for this run (reported as one line by the script)."""


def _check_image_header(path: str) -> None:
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018  (the header is parsed on open; the size proves it)
    except (OSError, SyntaxError, ValueError) as error:
        raise RunError(f"{path}: not a decodable image ({' '.join(str(error).split())}); fix or remove it") from None


def data_identity(dataset) -> str:
    """Hash of the sorted ``(relative path, content hash, labels)`` of every image of each split."""
    paths = [p for name in dataset if "image_path" in dataset[name].column_names for p in dataset[name]["image_path"][:]]
    digests = dict(zip(paths, cached_digests(paths, check=_check_image_header), strict=True))
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    rows_of = {}
    for name in sorted(dataset):
        columns = {c: dataset[name][c][:] for c in dataset[name].column_names}
        files = [[os.path.relpath(os.path.abspath(p), root), digests[p]] for p in columns.pop("image_path")] \
            if "image_path" in columns else [[]] * dataset[name].num_rows
        for c, values in columns.items():  # 🤗 datasets image values: their content
            if values and isinstance(values[0], dict) and "bytes" in values[0]:  # not decoded: bytes or a file
                columns[c] = [hashlib.blake2b(v["bytes"]).hexdigest() if v.get("bytes") is not None
                              else file_digest(v["path"]) for v in values]
            elif values and hasattr(values[0], "tobytes"):  # decoded PIL images: their pixels
                columns[c] = [hashlib.blake2b(v.tobytes()).hexdigest() for v in values]
        labels = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
        rows = zip(files, labels or [{}] * len(files), strict=True)
        rows_of[name] = sorted(json.dumps([*f, _jsonable(label)], sort_keys=True) for f, label in rows)
    return json_digest(rows_of)[:24]


def model_identity(name_or_path: str, model) -> str:
    """Hash of every file of a local model folder, else (tiny models, a Hub id) of the loaded weights."""
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
    if isinstance(value, str | int | float | bool) or value is None:  # non-finite floats as their text
        return str(value) if isinstance(value, float) and not math.isfinite(value) else value
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
    """``{flag name: value}`` of every field of the three argument dataclasses but the allow-lists above (JSON
    options by content), plus ``data_files``, ``model_files`` (the identities) and ``num_processes``."""
    settings: dict[str, Any] = {}
    for source, excluded in ((model_args, RESULT_NEUTRAL_INPUTS), (data_args, RESULT_NEUTRAL_INPUTS),
                             (args, RUN_ONLY_ARGUMENTS)):
        for item in dataclasses.fields(source):
            if item.name.startswith("_") or item.name in excluded:
                continue
            value = getattr(source, item.name)
            if isinstance(value, str) and value.lstrip().startswith("{"):
                with suppress(ValueError):
                    value = json.loads(value)
            settings[item.name] = _jsonable(value)
    return {**settings, "data_files": data_files, "model_files": model_files, "num_processes": num_processes}


def describe_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``--name old -> new`` for each setting that differs (the first ``limit``, then a count)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    shown = [f"--{k} {json.dumps(old.get(k, '<unset>'))} -> {json.dumps(new.get(k, '<unset>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"and {len(keys) - limit} more")
    return ", ".join(shown)


class RunDirectory:
    """The output folder of one run: only the main process locks, moves, deletes and writes."""

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any] | None = None, is_main_process: bool = True):
        if not str(path).strip():
            raise RunDirectoryError("--output_dir is empty: name the run's folder (e.g. --output_dir outputs/my-run)")
        self.path, self.run_file, self.is_main_process = Path(path), Path(path) / RUN_FILE, is_main_process
        self.set_settings(settings or {})
        self.action: str | None = None  # what `plan` decided
        self._started = False

    def set_settings(self, settings: dict[str, Any]) -> None:
        """This run's `run_settings` and their fingerprint."""
        self.settings, self.fingerprint = settings, json_digest(settings)[:16]

    @contextmanager
    def lock(self) -> Iterator[RunDirectory]:
        """Hold the folder's `filelock` (a second run is refused naming its holder; a killed one's is taken over)."""
        if not self.is_main_process:
            yield self
            return
        created, pid_file, lock_file = not self.path.exists(), self.path / PID_FILE, self.path / LOCK_FILE
        had_lock, lock = lock_file.exists(), FileLock(lock_file, timeout=0, thread_local=False)
        holder = pid_file.read_text().strip() if pid_file.is_file() else ""  # running, or killed if we get the lock
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            raise RunDirectoryError(f"--output_dir {self.path} is in use by another training run (PID "
                                    f"{holder or 'unknown'}); wait for it to end or choose another "
                                    "--output_dir") from None
        except OSError as error:
            raise RunDirectoryError(f"--output_dir {self.path}: cannot create or lock it ({error.strerror})") from None
        if holder and pid_file.is_file():  # not removed by its run since it was read: that run was killed
            logger.warning("%s: the run with PID %s ended without releasing its lock (killed?); taking it over",
                           self.path, holder)
        pid_file.write_text(f"{os.getpid()}\n")
        try:
            yield self
        finally:
            pid_file.unlink(missing_ok=True)
            lock.release()
            if not self._started and not had_lock:
                lock_file.unlink(missing_ok=True)
                if created:
                    with suppress(OSError):
                        self.path.rmdir()  # only when still empty

    def plan(self, overwrite: bool = False) -> str:
        """``fresh``, ``resume``, ``finished`` or ``replace``, or a one-line `RunDirectoryError` (docs/training.md)."""
        if self.is_main_process:
            self._sweep()
        entries, previous = self._entries(), read_json(self.run_file)
        if not (isinstance(previous, dict) and isinstance(previous.get("settings"), dict)
                and isinstance(previous.get("fingerprint"), str)):
            previous = None
        if not entries:
            self.action = "fresh"
        elif previous is not None and previous.get("format") != FORMAT and not overwrite:
            raise RunDirectoryError(
                f"--output_dir {self.path} holds a run of an earlier ccafl-hf version, whose files carry no content "
                "hashes; pass --overwrite_output_dir to replace it or choose another --output_dir")
        elif previous is None and self.fingerprint in {m.get("fingerprint") for p in self.path.glob(
                "checkpoints/*/final/manifest.json") if isinstance(m := read_json(p), dict)}:
            logger.warning("%s is unreadable; its stage results carry this run's settings: resuming", self.run_file)
            self.action = "resume"
        elif previous is None:
            what = (f"its {RUN_FILE} is unreadable" if self.run_file.exists() else "it holds no ccafl-hf run "
                    f"({', '.join(p.name for p in entries[:3])}{', …' if len(entries) > 3 else ''})")
            raise RunDirectoryError(f"--output_dir {self.path} is not empty and {what}: nothing was changed; choose another "
                                    "--output_dir (--overwrite_output_dir only ever replaces a run of this package)")
        elif overwrite or not (previous.get("finished") or any(self.path.glob("checkpoints/*"))):
            self.action = "replace"  # a run that never trained is no reason to refuse its fix
        elif previous["fingerprint"] != self.fingerprint:
            raise RunDirectoryError(
                f"--output_dir {self.path} holds another run's checkpoints or results with different settings "
                f"({describe_differences(previous['settings'], self.settings)}); pass --overwrite_output_dir to "
                "replace it or choose another --output_dir")
        else:
            verified, why = verify_manifest(self.path, manifest=RUN_FILE) if previous.get("finished") else (None, "")
            if why:
                logger.warning("the finished run in %s does not verify (%s): redoing what is missing", self.path, why)
            self.action = "finished" if verified else "resume"
        return self.action

    def _sweep(self) -> None:
        """Delete a killed run's temporary files; restore a run moved aside by an overwrite that never started."""
        for leftover in sorted(self.path.rglob(f"{TEMP_PREFIX}*"), reverse=True):
            remove(leftover)
        for aside in self.path.glob(f"{REPLACED_PREFIX}*"):
            if read_json(self.run_file) is None:
                logger.warning("restoring the previous run that an interrupted --overwrite_output_dir moved aside")
                for entry in aside.iterdir():
                    os.replace(entry, self.path / entry.name)
            shutil.rmtree(aside, ignore_errors=True)

    def _entries(self) -> list[Path]:
        return sorted(p for p in self.path.glob("*") if p.name not in (LOCK_FILE, PID_FILE))

    def start(self) -> None:
        """Move a replaced run aside, write the new run's manifest, delete the old run (put back on failure)."""
        action = self.action or self.plan()
        self._started = True
        if not self.is_main_process:
            return
        aside, moved = self.path / f"{REPLACED_PREFIX}{os.getpid()}", []
        try:
            for entry in self._entries() if action == "replace" else []:
                aside.mkdir(exist_ok=True)
                os.replace(entry, aside / entry.name)
                moved.append(entry)
            self.finish(None)  # the new run's manifest: not finished
        except BaseException:
            for entry in moved:
                os.replace(aside / entry.name, entry)
            remove(aside)
            raise
        if moved:
            logger.info("--overwrite_output_dir: deleting the previous run in %s", self.path)
            shutil.rmtree(aside)

    def finish(self, files: list[str | Path] | None) -> None:
        """Write the run's manifest: finished, hashing the final ``files`` (``None``: not finished)."""
        if self.is_main_process:
            payload = {"fingerprint": self.fingerprint, "finished": files is not None, "settings": self.settings}
            write_manifest(self.path, payload, [self.path / f for f in files or []], RUN_FILE)

    def stage_dir(self, stage: str) -> Path:
        """``checkpoints/<stage>/final``: a stage's results (``untrained``: the evaluation before training)."""
        return self.path / "checkpoints" / stage / "final"

    def result(self, stage: str, previous: str | None) -> dict | None:
        """``stage``'s verified manifest if computed by this run from the result ``previous``; else None, logged."""
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

    def save_result(self, stage: str, metrics: dict, previous: str | None,
                    write: Callable[[Path], None] | None = None) -> None:
        """Seal ``stage``'s results: its folder emptied, ``write(folder)``, then the manifest, last."""
        folder = self.stage_dir(stage)
        if self.is_main_process:
            remove(folder)
            folder.mkdir(parents=True)
            if write is not None:
                write(folder)
            write_manifest(folder, {"fingerprint": self.fingerprint, "stage": stage, "metrics": metrics,
                                    "previous": previous})

