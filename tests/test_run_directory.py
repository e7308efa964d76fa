"""RunDirectory and manifests: the fingerprint by content, the plan (fresh / resume / finished / refuse /
replace), the folder lock, manifests that verify, checkpoints that can be resumed exactly."""

import dataclasses
import errno
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ccafl_hf.pipeline import DataArguments, ModelArguments, RunError
from ccafl_hf.pipeline.checkpoints import required_files, resume_point
from ccafl_hf.pipeline.manifest import verify_manifest, write_atomically, write_json, write_manifest
from ccafl_hf.pipeline.run_directory import (
    LOCK_FILE,
    PID_FILE,
    RESULT_NEUTRAL_ARGUMENTS,
    RUN_FILE,
    RUN_ONLY_ARGUMENTS,
    RunDirectory,
    RunDirectoryError,
    data_identity,
    model_identity,
    run_settings,
)
from ccafl_hf.trainers.arguments import CCAFLTrainingArguments


def _settings(tmp_path, **changes) -> dict:
    args = CCAFLTrainingArguments(output_dir=str(tmp_path / "out"), **changes)
    return run_settings(ModelArguments(model_name_or_path="tiny"), DataArguments(), args, "data-id")


# ------------------------------------------------------------------------------------------ settings
def test_every_setting_but_the_allow_list_is_fingerprinted(tmp_path):
    """Every field of the arguments counts except the proven-neutral allow-list (and the process's rank); a
    field added later counts too."""
    settings = _settings(tmp_path)
    names = {f.name for f in dataclasses.fields(CCAFLTrainingArguments) if not f.name.startswith("_")}
    assert names - RUN_ONLY_ARGUMENTS <= set(settings)
    assert not (set(settings) & RUN_ONLY_ARGUMENTS)
    assert {"local_rank"} == RUN_ONLY_ARGUMENTS - RESULT_NEUTRAL_ARGUMENTS
    for flag in ("association_rate", "memory_lambda", "use_adversarial_loss", "prompt_init_std", "triplet_margin",
                 "lr_decay_epochs", "random_erasing_prob", "eval_rerank", "warmup_factor", "seed", "optimizer",
                 "sgd_momentum", "freeze_patch_embedding", "mixed_precision", "max_grad_norm",
                 "dataloader_num_workers", "per_device_eval_batch_size", "num_processes", "model_files"):
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
     {"max_grad_norm": 1.0}, {"dataloader_num_workers": 3}, {"eval_strategy": "steps"}],
)
def test_a_result_setting_changes_the_fingerprint(tmp_path, change):
    assert _settings(tmp_path) != _settings(tmp_path, **change)


@pytest.mark.parametrize(
    "change", [{"logging_steps": 7}, {"save_total_limit": 5}, {"disable_tqdm": True}, {"save_only_model": True},
               {"report_to": "tensorboard"}, {"overwrite_output_dir": True}],
)
def test_an_allow_listed_setting_does_not(tmp_path, change):
    assert _settings(tmp_path) == _settings(tmp_path, **change)


def test_print_settings_shows_what_the_fingerprint_leaves_out(tmp_path):
    """`resolved_settings` (--print_settings, resolved_settings.json) holds every setting, allow-listed ones too."""
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


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (8, 16), bytes((seed * 7 + i) % 251 for i in range(8 * 16 * 3))).save(buffer, "PNG")
    return buffer.getvalue()


def _same_size_change(path: Path) -> None:
    """Other bytes of the same size, the image header intact (one byte of the compressed pixels flipped)."""
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))


def _image_folder(root: Path, count: int = 3):
    from datasets import Dataset, DatasetDict

    paths = []
    for i in range(count):
        path = root / "train" / f"{i:04d}_c1.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(i))
        paths.append(str(path))
    return DatasetDict(train=Dataset.from_dict({"image_path": paths, "pid": list(range(count))}))


def test_data_identity_is_content_not_paths_or_sizes(tmp_path):
    """Finding 1: an image replaced by other bytes of the same size changes the data's identity."""
    original = data_identity(_image_folder(tmp_path / "a"))
    assert data_identity(_image_folder(tmp_path / "moved")) == original  # same files elsewhere
    changed = _image_folder(tmp_path / "changed")
    image = Path(changed["train"]["image_path"][1])
    size = image.stat().st_size
    _same_size_change(image)
    assert image.stat().st_size == size
    assert data_identity(changed) != original
    fewer = _image_folder(tmp_path / "fewer", count=2)
    assert data_identity(fewer) != original
    relabelled = _image_folder(tmp_path / "relabelled")
    assert data_identity(relabelled.map(lambda row: {"pid": row["pid"] + 1})) != original


def test_data_identity_refuses_an_undecodable_image(tmp_path):
    dataset = _image_folder(tmp_path / "bad")
    bad = Path(dataset["train"]["image_path"][2])
    bad.write_bytes(b"not an image at all")
    with pytest.raises(RunError, match=f"{bad}: not a decodable image"):
        data_identity(dataset)


def test_model_identity_is_the_weights_content(tmp_path):
    """Finding 1: the start model's weight file replaced by other bytes of the same size changes its identity."""
    from ccafl_hf import create_tiny_model

    model, _ = create_tiny_model(seed=0)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    before = model_identity(str(folder), model)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == size and model_identity(str(folder), model) != before
    other, _ = create_tiny_model(seed=1)  # not a folder: the loaded weights themselves
    assert model_identity("tiny", model) == model_identity("tiny", create_tiny_model(seed=0)[0])
    assert model_identity("tiny", other) != model_identity("tiny", model)


# ------------------------------------------------------------------------------------------ the plan
def _finished_run(out: Path, settings: dict) -> RunDirectory:
    run = RunDirectory(out, settings)
    with run.lock():
        assert run.plan() == "fresh"
        run.start()
        run.save_result("untrained", {"mAP": 0.1}, previous=None)
        (out / "checkpoints" / "prompt" / "checkpoint-3").mkdir(parents=True)
        write_json(out / "eval_results.json", {"mAP": 0.1, "stages": {}})
        (out / "model.safetensors").write_bytes(b"weights")
        run.finish(["eval_results.json", "model.safetensors"])
    return run


def test_plan_fresh_resume_finished_refuse_replace(tmp_path):
    out = tmp_path / "out"
    settings = _settings(tmp_path)
    _finished_run(out, settings)
    assert RunDirectory(out, settings).plan() == "finished"
    assert RunDirectory(out, settings).plan(overwrite=True) == "replace"  # start over on request
    (out / "model.safetensors").write_bytes(b"weighty")  # changed after the run finished: redone
    assert RunDirectory(out, settings).plan() == "resume"
    (out / "model.safetensors").unlink()  # deleted: redone, never "nothing to train"
    assert RunDirectory(out, settings).plan() == "resume"

    changed = _settings(tmp_path, memory_lambda=0.0, association_rate=1.5)
    with pytest.raises(RunDirectoryError) as refused:
        RunDirectory(out, changed).plan()
    message = str(refused.value)
    assert "--memory_lambda 0.6 -> 0.0" in message and "--association_rate 1.7 -> 1.5" in message
    assert "--overwrite_output_dir" in message
    assert RunDirectory(out, changed).plan(overwrite=True) == "replace"

    # a stage's results are reused only under the settings and the inputs they were produced with
    assert RunDirectory(out, settings).result("untrained", None)["metrics"] == {"mAP": 0.1}
    assert RunDirectory(out, changed).result("untrained", None) is None
    assert RunDirectory(out, settings).result("untrained", "another-input") is None


def test_a_run_that_never_trained_does_not_block_its_fix(tmp_path):
    out = tmp_path / "out"
    run = RunDirectory(out, _settings(tmp_path, seed=9))
    with run.lock():
        run.plan()
        run.start()  # failed right after: no checkpoints, no results
    assert RunDirectory(out, _settings(tmp_path)).plan() == "replace"


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    """Finding 6: --overwrite_output_dir only replaces a folder holding this package's run manifest."""
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("README.md", "model.safetensors", "notes.txt"):
        (out / name).write_text(name)
    for overwrite in (False, True):
        with pytest.raises(RunDirectoryError, match="holds no ccafl-hf run .*nothing was changed"):
            RunDirectory(out, _settings(tmp_path)).plan(overwrite=overwrite)
    with pytest.raises(RunDirectoryError, match="--output_dir is empty"):
        RunDirectory("", _settings(tmp_path))


def test_a_run_of_an_earlier_version_is_replaced_only_on_request(tmp_path):
    out = tmp_path / "old"
    (out / "checkpoints" / "prompt" / "checkpoint-3").mkdir(parents=True)
    write_json(out / RUN_FILE, {"fingerprint": "0", "finished": True, "settings": {"seed": 42}})
    with pytest.raises(RunDirectoryError, match="earlier ccafl-hf version.*--overwrite_output_dir"):
        RunDirectory(out, _settings(tmp_path)).plan()
    assert RunDirectory(out, _settings(tmp_path)).plan(overwrite=True) == "replace"


def test_replace_moves_aside_then_deletes_and_restores_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _finished_run(out, _settings(tmp_path))
    def files() -> dict:
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()
                and p.name not in (LOCK_FILE, PID_FILE)}

    before = files()
    run = RunDirectory(out, _settings(tmp_path, seed=3))

    def failing(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with run.lock():
        assert run.plan(overwrite=True) == "replace"
        with monkeypatch.context() as patch:
            patch.setattr("ccafl_hf.pipeline.run_directory.write_manifest", failing)
            with pytest.raises(OSError):
                run.start()
        assert files() == before  # restored, byte for byte
        run.start()
        assert not (out / "checkpoints").exists() and not (out / "eval_results.json").exists()
    assert json.loads((out / RUN_FILE).read_text())["settings"]["seed"] == 3
    assert not list(out.glob(".ccafl-replaced-*"))


def test_truncated_run_file_falls_back_to_stage_fingerprints(tmp_path, caplog):
    out = tmp_path / "out"
    settings = _settings(tmp_path)
    _finished_run(out, settings)
    (out / RUN_FILE).write_bytes(b"")  # 0 bytes
    with caplog.at_level(logging.WARNING):
        assert RunDirectory(out, settings).plan() == "resume"
    assert any(RUN_FILE in r.message for r in caplog.records)
    with pytest.raises(RunDirectoryError, match="unreadable"):
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
        import sys, time
        from ccafl_hf.pipeline.run_directory import RunDirectory
        with RunDirectory(sys.argv[1], {}).lock():
            print("locked", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
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
    match = f"--output_dir {blocker / 'out'}: cannot create or lock it"
    with pytest.raises(RunDirectoryError, match=match), RunDirectory(blocker / "out", {}).lock():
        pass


# ------------------------------------------------------------------------------------------ manifests
def test_manifest_verifies_content_not_presence(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"1234")
    write_manifest(folder, {"metrics": {}})
    assert verify_manifest(folder)[0] is not None
    (folder / "a.bin").write_bytes(b"1235")  # same size, other bytes
    assert "does not match" in verify_manifest(folder)[1]
    (folder / "a.bin").unlink()
    assert "missing" in verify_manifest(folder)[1]
    (folder / "manifest.json").write_text('{"format": "ccafl-hf-run/2", "fil')  # cut off
    assert verify_manifest(folder)[0] is None


def test_failed_atomic_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "eval_results.json"
    write_json(path, {"mAP": 0.5})

    def full_disk(temp: Path) -> None:
        temp.write_text('{"mAP": 0.')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(path, full_disk)
    assert json.loads(path.read_text()) == {"mAP": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["eval_results.json"]  # no temporary left behind


# ---------------------------------------------------------------------------------------- checkpoints
def _checkpoint(folder: Path, step: int, epoch: float, fingerprint: str = "fp", drop: str | None = None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in (*required_files(1), "model.safetensors"):
        if name != drop:
            (path / name).write_bytes(f"{name}-{step}".encode())
    write_manifest(path, {"fingerprint": fingerprint, "previous": None, "step": step, "epoch": epoch})
    return path


@pytest.mark.parametrize("drop", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_checkpoint_without_a_file_the_resume_needs_is_never_resumed(tmp_path, drop, caplog):
    """Finding 3 (and --save_only_model): a checkpoint missing optimizer/scheduler/RNG state is passed over."""
    _checkpoint(tmp_path, 4, 1.0)
    _checkpoint(tmp_path, 8, 2.0, drop=drop)
    with caplog.at_level(logging.WARNING):
        path, _ = resume_point(tmp_path, "fp", None, required_files(1))
    assert path == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-8").exists()
    lines = [r.message for r in caplog.records if "checkpoint-8" in r.message]
    assert len(lines) == 1 and f"{drop} is missing" in lines[0]


def test_truncated_weights_fall_back_to_the_older_checkpoint(tmp_path, caplog):
    """Finding 3: a cut-off model.safetensors in the newest checkpoint -> the older complete one, one line."""
    _checkpoint(tmp_path, 4, 1.0)
    newest = _checkpoint(tmp_path, 8, 2.0)
    (newest / "model.safetensors").write_bytes(b"mod")
    cut = _checkpoint(tmp_path, 12, 3.0)
    (cut / "manifest.json").unlink()  # killed while saving
    with caplog.at_level(logging.WARNING):
        path, _ = resume_point(tmp_path, "fp", None, required_files(1))
    assert path == str(tmp_path / "checkpoint-4")
    line = next(r.message for r in caplog.records if "checkpoint-8" in r.message)
    assert "model.safetensors does not match" in line and "checkpoint-12" in line


def test_mid_epoch_checkpoint_is_not_resumed_and_an_explicit_one_is_refused(tmp_path):
    """Finding 5: only checkpoints saved at an epoch end are resume points."""
    _checkpoint(tmp_path, 4, 1.0)
    mid = _checkpoint(tmp_path, 6, 1.5)
    with pytest.raises(RunError, match="inside epoch 2"):
        resume_point(tmp_path, "fp", None, required_files(1), explicit=str(mid))
    path, _ = resume_point(tmp_path, "fp", None, required_files(1))
    assert path == str(tmp_path / "checkpoint-4")
    assert resume_point(tmp_path, "other", None, required_files(1)) == (None, None)
