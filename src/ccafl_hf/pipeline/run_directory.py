"""The one owner of a training run's output folder: what it holds, whether it may be reused, who writes it.

A run folder holds the run's settings (``ccafl_run.json``), the per-stage checkpoints and results
(``checkpoints/``) and, once finished, the model artifacts. `RunDirectory`:

* fingerprints every resolved setting that can change the results (`run_settings`): the model (and,
  for a local folder, its files and sizes), the data's identity (every image's relative path, size
  and labels), and every training argument except the run-only ones in `RUN_ONLY_ARGUMENTS` (a field
  added to the arguments later is fingerprinted by default);
* decides before any work (`RunDirectory.plan`): a fresh run, a resume of the same settings, or a
  refusal naming the settings that differ. A stage's stored results are reused only when they carry
  the current fingerprint;
* holds an exclusive lock on the folder for the whole run (`RunDirectory.lock`), named by the holder's
  PID; the kernel drops it when the process dies, so a SIGKILLed run never leaves a lock that blocks;
* writes every state file to a temporary name in the same folder and renames it (`write_atomically`);
  readers (`read_json`) treat a missing, truncated or malformed file as absent, with a warning.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ..errors import CCAFLError

logger = logging.getLogger(__name__)

RUN_FILE = "ccafl_run.json"
LOCK_FILE = ".ccafl_run.lock"
TEMP_PREFIX = ".tmp-"
KILL_AT_ENV = "CCAFL_HF_KILL_AT"

#: Training arguments that never change what a run computes: where and how it logs, saves and reports,
#: how many workers it uses, Hub upload. Every other field of the arguments is fingerprinted.
RUN_ONLY_ARGUMENTS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "run_name", "logging_dir", "logging_strategy",
    "logging_steps", "logging_first_step", "logging_nan_inf_filter", "log_level", "log_level_replica",
    "log_on_each_node", "report_to", "disable_tqdm", "save_strategy", "save_steps", "save_total_limit",
    "save_on_each_node", "save_only_model", "save_safetensors", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision",
    "push_to_hub_model_id", "push_to_hub_organization", "push_to_hub_token", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "local_rank", "ddp_backend", "ddp_timeout", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
    "ddp_broadcast_buffers", "include_num_input_tokens_seen", "include_tokens_per_second",
    "skip_memory_metrics", "restore_callback_states_from_checkpoint", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id", "project", "enable_jit_checkpoint",
})
#: Model/data arguments that do not change results: the data folder is replaced by the data's identity
#: (so a moved copy still matches), the preset name by the values it resolved to.
RUN_ONLY_INPUTS = frozenset({"data_dir", "preset"})


class RunDirectoryError(CCAFLError):
    """The output folder cannot be used for this run (reported as one line by the script)."""


# ------------------------------------------------------------------------------------ atomic files
def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temp)`` on a temporary name in ``path``'s folder, then rename it to ``path``.

    A reader sees the old file or the whole new one, never a part. An error while writing (a full disk)
    removes the temporary file and raises `OSError` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException as error:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        if isinstance(error, OSError) or _is_write_failure(error):
            raise _os_error(error, path) from None
        raise
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """`write_atomically` a JSON document."""
    text = json.dumps(payload, indent=2)
    return write_atomically(path, lambda temp: temp.write_text(text))


def read_json(path: str | os.PathLike, expect: Callable[[Any], bool] | None = None) -> Any | None:
    """The JSON content of ``path``, or None when it is missing, truncated, malformed or fails ``expect``
    (a warning then names the file: it is treated as absent, never as a crash)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        logger.warning("ignoring %s: unreadable or cut off (%s); treated as absent", path, error)
        return None
    if expect is not None and not expect(content):
        logger.warning("ignoring %s: not the expected content; treated as absent", path)
        return None
    return content


def _is_write_failure(error: BaseException) -> bool:
    # torch.save reports a full disk as a RuntimeError from its zip writer, without errno or path
    return isinstance(error, RuntimeError) and ("file write failed" in str(error) or "PytorchStreamWriter" in str(error))


def _os_error(error: BaseException, path: Path) -> OSError:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space" in str(error):
        return OSError(errno.ENOSPC, f"cannot write {path}: no space left on the device")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())
    return OSError(getattr(error, "errno", None) or errno.EIO, f"cannot write {path}: {reason}")


def describe_write_error(error: BaseException, output_dir: str | os.PathLike) -> str | None:
    """One line for an error raised while writing into ``output_dir`` (full disk, no permission), naming
    the path; None when ``error`` is no write failure."""
    if isinstance(error, OSError):
        if str(error).startswith("cannot write "):
            return str(error)
        where = error.filename or output_dir
        if error.errno == errno.ENOSPC:
            return f"cannot write {where}: no space left on the device"
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write {where}: {error.strerror}"
        return None
    if _is_write_failure(error):
        return f"cannot write into {output_dir}: the disk is full or the folder is not writable (torch.save: file write failed)"
    return None


# ------------------------------------------------------------------------------------------ settings
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
    return str(getattr(value, "value", value))  # enums (IntervalStrategy, …) and anything else: their text


def _files_identity(paths: list[str]) -> list[list]:
    """``[relative path, size]`` of each file (relative to their common folder, so a moved copy matches)."""
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [[os.path.relpath(p, root), os.path.getsize(p) if os.path.exists(p) else -1] for p in paths]


def dataset_identity(dataset) -> str:
    """Hash of a `DatasetDict`'s content: per split, every image's relative path and size and every label
    column. Two folders with the same files and labels match; a changed, added or removed image does not."""
    digest = hashlib.sha256()
    for name in sorted(dataset):
        split = dataset[name]
        columns = {c: split[c][:] for c in split.column_names if c != "image_path"}
        files = _files_identity(split["image_path"][:]) if "image_path" in split.column_names else []
        digest.update(json.dumps([name, files, _jsonable(columns)], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def model_identity(name_or_path: str) -> list | str:
    """A local model folder: its files and sizes; anything else (a Hub id, ``tiny``): its name."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return name_or_path
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [[p.relative_to(folder).as_posix(), p.stat().st_size] for p in files]


def run_settings(model_args, data_args, args, data_identity: str) -> dict[str, Any]:
    """Every resolved setting that can change a run's results, flat (``{flag name: value}``).

    Includes all fields of the model, data and training arguments except `RUN_ONLY_INPUTS` and
    `RUN_ONLY_ARGUMENTS` (and private fields), plus ``data_files`` (see `dataset_identity`) and, for a
    local model folder, ``model_files``.
    """
    settings: dict[str, Any] = {}
    for source, excluded in ((model_args, RUN_ONLY_INPUTS), (data_args, RUN_ONLY_INPUTS), (args, RUN_ONLY_ARGUMENTS)):
        for item in dataclasses.fields(source):
            if item.name.startswith("_") or item.name in excluded:
                continue
            value = getattr(source, item.name)
            if isinstance(value, str) and value.lstrip().startswith("{"):  # JSON options: their content counts
                with suppress(ValueError):
                    value = json.loads(value)
            settings[item.name] = _jsonable(value)
    settings["data_files"] = data_identity
    model = model_identity(getattr(model_args, "model_name_or_path", ""))
    if isinstance(model, list):
        settings["model_files"] = hashlib.sha256(json.dumps(model).encode()).hexdigest()[:16]
    return settings


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """Stable hash of `run_settings`."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def describe_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``--name old -> new`` for each setting that differs (the first ``limit``, then a count)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    shown = [f"--{k} {json.dumps(old.get(k, '<unset>'))} -> {json.dumps(new.get(k, '<unset>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"and {len(keys) - limit} more")
    return ", ".join(shown)


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process when ``$CCAFL_HF_KILL_AT`` equals ``name`` (a stage boundary), so
    tests can stop a run at an exact point between stages. Does nothing otherwise."""
    if os.environ.get(KILL_AT_ENV) == name:
        logger.warning("%s=%s: killing this process (test hook)", KILL_AT_ENV, name)
        os.kill(os.getpid(), signal.SIGKILL)


# -------------------------------------------------------------------------------------- the folder
@dataclasses.dataclass
class RunPlan:
    """What a run does with its output folder: ``fresh``, ``resume`` (same settings; finished stages are
    reused, the rest continue from their last complete checkpoint), ``finished`` (same settings, nothing
    to train) or ``replace`` (``--overwrite_output_dir``: start over; the previous run is deleted only
    when this one starts training)."""

    action: str
    reason: str = ""


class RunDirectory:
    """The output folder of one training run (see the module docstring).

    Args:
        path: the output folder.
        settings: `run_settings` of this run (or later, with `set_settings`, once the data is read).
        is_main_process: only the main process locks, deletes and writes.
    """

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any] | None = None, is_main_process: bool = True):
        self.path = Path(path)
        self.settings: dict[str, Any] = {}
        self.fingerprint = ""
        if settings is not None:
            self.set_settings(settings)
        self.is_main_process = is_main_process
        self.plan_: RunPlan | None = None
        self._lock_fd: int | None = None
        self._created: bool = False
        self._started: bool = False

    def set_settings(self, settings: dict[str, Any]) -> None:
        """This run's `run_settings` (and their fingerprint)."""
        self.settings = settings
        self.fingerprint = settings_fingerprint(settings)

    # ------------------------------------------------------------------------------ lock
    @contextmanager
    def lock(self) -> Iterator[RunDirectory]:
        """Hold the folder's exclusive lock (main process) for the ``with`` block.

        Raises `RunDirectoryError` at once, naming the holder's PID, when another run holds it. When this
        run fails before it started training (`start`), the folder is left as it was found (a folder this
        run created is removed again).
        """
        if not self.is_main_process:
            yield self
            return
        self._acquire()
        try:
            yield self
        finally:
            self._release()

    def _acquire(self) -> None:
        import fcntl

        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirectoryError(f"--output_dir {self.path}: cannot create it ({error.strerror})") from None
        lock_path = self.path / LOCK_FILE
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                self._undo_creation()
                raise RunDirectoryError(f"--output_dir {self.path}: not writable ({error.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirectoryError(
                    f"--output_dir {self.path} is in use by another training run (PID {holder}); wait for it to "
                    "end or choose another --output_dir"
                ) from None
            try:  # the holder may have removed the file between our open and lock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous:
            logger.warning("%s: the run with PID %s ended without releasing its lock (killed?); taking it over",
                           self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is None:
            return
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None
        if not self._started:
            self._undo_creation()

    def _undo_creation(self) -> None:
        if self._created:
            with suppress(OSError):
                self.path.rmdir()  # only when still empty

    # ------------------------------------------------------------------------------ state
    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def marker_path(self, stage: str) -> Path:
        """Where the results of ``stage`` are stored (``untrained``: the evaluation before training)."""
        if stage == "untrained":
            return self.path / "checkpoints" / "untrained_eval.json"
        return self.path / "checkpoints" / stage / "final" / "eval_results.json"

    def _previous_run(self) -> dict | None:
        return read_json(self.run_file, lambda c: isinstance(c, dict) and isinstance(c.get("settings"), dict)
                         and isinstance(c.get("fingerprint"), str))

    def _holds_training_state(self) -> bool:
        checkpoints = self.path / "checkpoints"
        return checkpoints.is_dir() and any(checkpoints.iterdir())

    def _marker_fingerprints(self) -> set[str]:
        found = set()
        for path in (self.path / "checkpoints").glob("**/*.json"):
            content = read_json(path)
            if isinstance(content, dict) and isinstance(content.get("fingerprint"), str):
                found.add(content["fingerprint"])
        return found

    def plan(self, overwrite: bool = False) -> RunPlan:
        """Decide, before any work, what this run does with the folder (see `RunPlan`).

        Raises `RunDirectoryError` (one line naming the differing settings) when the folder holds another
        run's checkpoints or results and ``overwrite`` is False. ``--resume_from_checkpoint`` never
        overrides this: only a run of the same settings is continued.
        """
        previous = self._previous_run()
        state = self._holds_training_state()
        finished = previous is not None and previous.get("finished") is True
        if previous is None and self.run_file.is_file():
            logger.warning("%s is unreadable: the settings of the run in %s are taken from its stage results",
                           self.run_file, self.path)
        if not state and not finished:
            self.plan_ = RunPlan("fresh")  # nothing trained here yet (e.g. a run that failed before training)
        elif overwrite:
            self.plan_ = RunPlan("replace")  # start over, even with the same settings
        elif previous is not None and previous["fingerprint"] == self.fingerprint:
            self.plan_ = RunPlan("finished" if finished and self.result("final") is not None else "resume")
        elif previous is None and self.fingerprint in self._marker_fingerprints():
            self.plan_ = RunPlan("resume")
        else:
            what = (describe_differences(previous["settings"], self.settings) if previous is not None
                    else f"{RUN_FILE} is missing or unreadable, so its settings are unknown")
            raise RunDirectoryError(
                f"--output_dir {self.path} holds another run's checkpoints or results with different settings "
                f"({what}); pass --overwrite_output_dir to replace it or choose another --output_dir"
            )
        return self.plan_

    def start(self) -> None:
        """Called when the run is about to train: delete the previous run when replacing it, record the
        settings. Before this point nothing in the folder was changed."""
        plan = self.plan_ or self.plan()
        self._started = True
        if not self.is_main_process:
            return
        if plan.action == "replace":
            logger.info("--overwrite_output_dir: deleting the previous run's checkpoints and results in %s", self.path)
            shutil.rmtree(self.path / "checkpoints", ignore_errors=True)
            for name in ("eval_results.json", "README.md", "model.safetensors"):
                (self.path / name).unlink(missing_ok=True)
        if plan.action != "finished":
            write_json(self.run_file, {"fingerprint": self.fingerprint, "finished": False, "settings": self.settings})

    def finish(self) -> None:
        """Mark the run finished (after the artifacts were written)."""
        if self.is_main_process:
            write_json(self.run_file, {"fingerprint": self.fingerprint, "finished": True, "settings": self.settings})

    def result(self, stage: str) -> dict | None:
        """The stored results of ``stage`` when they were produced with this run's settings, else None.
        ``final``: the top-level ``eval_results.json`` of a finished run."""
        if stage == "final":
            return read_json(self.path / "eval_results.json", lambda c: isinstance(c, dict) and "stages" in c)
        content = read_json(self.marker_path(stage), lambda c: isinstance(c, dict) and isinstance(c.get("metrics"), dict))
        if content is None or content.get("fingerprint") != self.fingerprint:
            return None
        return content["metrics"]

    def save_result(self, stage: str, metrics: dict) -> None:
        """Store ``stage``'s results with this run's fingerprint (atomically; main process)."""
        if self.is_main_process:
            write_json(self.marker_path(stage), {"fingerprint": self.fingerprint, "metrics": metrics})


__all__ = [
    "KILL_AT_ENV",
    "RUN_FILE",
    "RUN_ONLY_ARGUMENTS",
    "RunDirectory",
    "RunDirectoryError",
    "RunPlan",
    "dataset_identity",
    "describe_differences",
    "describe_write_error",
    "kill_point",
    "read_json",
    "run_settings",
    "settings_fingerprint",
    "write_atomically",
    "write_json",
]
