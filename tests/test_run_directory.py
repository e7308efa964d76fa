"""RunDirectory: the settings fingerprint, the plan (fresh / resume / refuse / replace), the folder lock,
atomic state files and tolerant readers."""

import dataclasses
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ccafl_hf.pipeline import DataArguments, ModelArguments
from ccafl_hf.pipeline.run_directory import (
    LOCK_FILE,
    RUN_FILE,
    RUN_ONLY_ARGUMENTS,
    RunDirectory,
    RunDirectoryError,
    dataset_identity,
    read_json,
    run_settings,
    write_atomically,
    write_json,
)
from ccafl_hf.trainers.arguments import CCAFLTrainingArguments


def _settings(tmp_path, **changes) -> dict:
    args = CCAFLTrainingArguments(output_dir=str(tmp_path / "out"), **changes)
    return run_settings(ModelArguments(model_name_or_path="tiny"), DataArguments(), args, "data-id")


# ------------------------------------------------------------------------------------------ settings
def test_every_result_setting_is_fingerprinted_by_default(tmp_path):
    """Every field of the arguments counts except the listed run-only ones; a field added later counts too."""
    settings = _settings(tmp_path)
    names = {f.name for f in dataclasses.fields(CCAFLTrainingArguments) if not f.name.startswith("_")}
    assert names - RUN_ONLY_ARGUMENTS <= set(settings)
    assert not (set(settings) & RUN_ONLY_ARGUMENTS)
    for flag in ("association_rate", "memory_lambda", "use_adversarial_loss", "prompt_init_std", "triplet_margin",
                 "lr_decay_epochs", "random_erasing_prob", "eval_rerank", "warmup_factor", "seed", "optimizer",
                 "sgd_momentum", "freeze_patch_embedding", "mixed_precision", "max_grad_norm"):
        assert flag in settings, flag

    @dataclasses.dataclass
    class Extended(CCAFLTrainingArguments):
        new_loss_weight: float = 1.0

    args = Extended(output_dir=str(tmp_path / "out"))
    assert "new_loss_weight" in run_settings(ModelArguments(), DataArguments(), args, "data-id")


@pytest.mark.parametrize(
    "change",
    [{"association_rate": 1.5}, {"memory_lambda": 0.0}, {"use_adversarial_loss": False}, {"prompt_epochs": 7},
     {"lr_decay_epochs": [30, 50]}, {"random_erasing_prob": 0.1}, {"icdl_epochs": 4}, {"bf16": True},
     {"optimizer": "sgd"}, {"sgd_momentum": 0.5}, {"freeze_patch_embedding": True}, {"mixed_precision": "bf16"},
     {"max_grad_norm": 1.0}],
)
def test_a_result_setting_changes_the_fingerprint(tmp_path, change):
    assert _settings(tmp_path) != _settings(tmp_path, **change)


@pytest.mark.parametrize(
    "change",
    [{"logging_steps": 7}, {"dataloader_num_workers": 3}, {"save_total_limit": 5},
     {"disable_tqdm": True}, {"report_to": "none"}, {"overwrite_output_dir": True}],
)
def test_a_run_only_setting_does_not(tmp_path, change):
    assert _settings(tmp_path) == _settings(tmp_path, **change)


def test_print_settings_shows_what_the_fingerprint_leaves_out(tmp_path):
    """`resolved_settings` (--print_settings, resolved_settings.json) holds every setting, run-only ones too."""
    from ccafl_hf.pipeline import resolved_settings

    args = CCAFLTrainingArguments(output_dir=str(tmp_path / "out"), logging_steps=7)
    shown = resolved_settings(ModelArguments(), DataArguments(), args)
    assert shown["training"]["logging_steps"] == 7 and shown["data"]["data_dir"] is None
    assert "logging_steps" not in _settings(tmp_path) and "data_dir" not in _settings(tmp_path)


def test_json_options_compare_by_content(tmp_path):
    args = CCAFLTrainingArguments(output_dir=str(tmp_path))
    first = run_settings(ModelArguments(), DataArguments(dataset_options='{"a": 1,"b":2}'), args, "x")
    second = run_settings(ModelArguments(), DataArguments(dataset_options='{"b": 2, "a": 1}'), args, "x")
    assert first == second


def test_dataset_identity_is_file_content_not_paths(tmp_path):
    from datasets import Dataset, DatasetDict

    def folder(name: str, sizes: list[int]) -> DatasetDict:
        paths = []
        for i, size in enumerate(sizes):
            path = tmp_path / name / "train" / f"{i:04d}_c1.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * size)
            paths.append(str(path))
        return DatasetDict(train=Dataset.from_dict({"image_path": paths, "pid": list(range(len(sizes)))}))

    original = dataset_identity(folder("a", [10, 20, 30]))
    assert dataset_identity(folder("moved", [10, 20, 30])) == original  # same files elsewhere
    assert dataset_identity(folder("resized", [10, 21, 30])) != original  # one image changed
    assert dataset_identity(folder("fewer", [10, 20])) != original  # one image removed


# ------------------------------------------------------------------------------------------ the plan
def _finished_run(out: Path, settings: dict) -> RunDirectory:
    run = RunDirectory(out, settings)
    with run.lock():
        assert run.plan().action == "fresh"
        run.start()
        run.save_result("untrained", {"mAP": 0.1})
        run.save_result("prompt", {"mAP": 0.1})
        (out / "checkpoints" / "prompt" / "checkpoint-3").mkdir(parents=True)
        write_json(out / "eval_results.json", {"mAP": 0.1, "stages": {}})
        run.finish()
    return run


def test_plan_fresh_resume_finished_refuse_replace(tmp_path):
    out = tmp_path / "out"
    settings = _settings(tmp_path)
    _finished_run(out, settings)
    assert RunDirectory(out, settings).plan().action == "finished"
    assert RunDirectory(out, settings).plan(overwrite=True).action == "replace"  # start over on request
    (out / "eval_results.json").unlink()  # killed before the artifacts: resumed
    assert RunDirectory(out, settings).plan().action == "resume"

    changed = _settings(tmp_path, memory_lambda=0.0, association_rate=1.5)
    with pytest.raises(RunDirectoryError) as refused:
        RunDirectory(out, changed).plan()
    message = str(refused.value)
    assert "--memory_lambda 0.6 -> 0.0" in message and "--association_rate 1.7 -> 1.5" in message
    assert "--overwrite_output_dir" in message
    assert RunDirectory(out, changed).plan(overwrite=True).action == "replace"

    # a stage's results are reused only under the settings they were produced with
    other = RunDirectory(out, changed)
    assert RunDirectory(out, settings).result("prompt") == {"mAP": 0.1}
    assert other.result("prompt") is None


def test_a_run_that_never_trained_does_not_block_its_fix(tmp_path):
    """A run file without checkpoints (the run failed before training) is no reason to refuse."""
    out = tmp_path / "out"
    out.mkdir()
    write_json(out / RUN_FILE, {"fingerprint": "0", "finished": False, "settings": {"data_dir": "wrong"}})
    assert RunDirectory(out, _settings(tmp_path)).plan().action == "fresh"


def test_replace_deletes_only_when_started(tmp_path):
    out = tmp_path / "out"
    _finished_run(out, _settings(tmp_path))
    run = RunDirectory(out, _settings(tmp_path, seed=3))
    with run.lock():
        assert run.plan(overwrite=True).action == "replace"
        assert (out / "checkpoints" / "prompt" / "checkpoint-3").is_dir()  # nothing deleted by the decision
        run.start()
        assert not (out / "checkpoints").exists() and not (out / "eval_results.json").exists()
    assert json.loads((out / RUN_FILE).read_text())["settings"]["seed"] == 3


def test_truncated_run_file_falls_back_to_stage_fingerprints(tmp_path, caplog):
    out = tmp_path / "out"
    settings = _settings(tmp_path)
    _finished_run(out, settings)
    (out / RUN_FILE).write_bytes(b"")  # 0 bytes
    with caplog.at_level(logging.WARNING):
        assert RunDirectory(out, settings).plan().action == "resume"
    assert any(RUN_FILE in r.message for r in caplog.records)
    with pytest.raises(RunDirectoryError, match="unknown"):
        RunDirectory(out, _settings(tmp_path, seed=5)).plan()


# ------------------------------------------------------------------------------------------- the lock
def test_second_holder_is_refused_with_the_pid(tmp_path):
    out = tmp_path / "out"
    match = f"in use by another training run \\(PID {os.getpid()}\\)"
    with RunDirectory(out, {}).lock(), pytest.raises(RunDirectoryError, match=match), RunDirectory(out, {}).lock():
        pass
    with RunDirectory(out, {}).lock():  # released on exit
        pass


def test_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    script = textwrap.dedent("""
        import fcntl, os, sys, time
        os.makedirs(sys.argv[1], exist_ok=True)
        fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\\n".encode())
        print("locked", flush=True)
        time.sleep(60)
    """)  # the protocol of RunDirectory.lock (flock + PID), without the package's imports
    holder = subprocess.Popen([sys.executable, "-c", script, str(out), LOCK_FILE], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=f"PID {holder.pid}"), RunDirectory(out, {}).lock():
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
    with caplog.at_level(logging.WARNING), RunDirectory(out, {}).lock():
        pass
    assert any(str(holder.pid) in r.message for r in caplog.records)


def test_a_run_failing_before_start_leaves_no_folder(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ValueError, match="bad data"), RunDirectory(out, {}).lock():
        raise ValueError("bad data")
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ValueError), RunDirectory(existing, {}).lock():
        raise ValueError("bad data")
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


def test_unusable_output_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    match = f"--output_dir {blocker / 'out'}: cannot create it"
    with pytest.raises(RunDirectoryError, match=match), RunDirectory(blocker / "out", {}).lock():
        pass


# -------------------------------------------------------------------------------------- state files
@pytest.mark.parametrize("content", [b"", b'{"fingerprint": "ab', b"[1, 2]", b"\xff\xfe"])
def test_unreadable_state_file_is_absent_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / "eval_results.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert read_json(path, lambda c: isinstance(c, dict)) is None
    assert any(str(path) in r.message for r in caplog.records)


def test_failed_atomic_write_keeps_the_old_file_and_names_the_path(tmp_path):
    path = tmp_path / "eval_results.json"
    write_json(path, {"mAP": 0.5})

    def full_disk(temp: Path) -> None:
        temp.write_text('{"mAP": 0.')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {path}: no space left"):
        write_atomically(path, full_disk)
    assert json.loads(path.read_text()) == {"mAP": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["eval_results.json"]  # no temporary left behind
