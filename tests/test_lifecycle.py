"""The run's lifecycle end to end (issue: a run that verifies itself): identity by content, proven-neutral
allow-list, exact resume or none, no substituted results, nothing lost, one line for a full disk."""

import json
import shutil
import subprocess
from pathlib import Path

import transformers

from ccafl_hf.commands import train_main
from training_runs import SMALL_RUN, assert_same_run, killed_at, run_env, run_script


def _bytes(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def _copy_cache(cache: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the package cache (the synthetic data) this test may damage; used by the runs it starts."""
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy, ignore=shutil.ignore_patterns("hashes"))
    monkeypatch.setenv("CCAFL_HF_CACHE", str(copy))
    return copy


def _train_image(cache: Path) -> Path:
    return sorted(p for p in cache.rglob("*") if p.suffix in (".jpg", ".png") and "bounding_box_train" in p.parts)[0]


# --------------------------------------------------------------------------- 1. identity by content
def test_same_size_change_of_a_training_image_is_refused_by_name(trained, tmp_path, monkeypatch, capsys):
    """Another image of the same size in the data: the finished run is not served as "nothing trained"."""
    reference, cache = trained
    image = _train_image(_copy_cache(cache, tmp_path, monkeypatch))
    data = bytearray(image.read_bytes())
    data[-40] ^= 0xFF  # inside the compressed pixels: the header still decodes
    image.write_bytes(bytes(data))
    before = _bytes(reference)
    assert train_main(["--output_dir", str(reference), *SMALL_RUN]) == 2
    line = _one_error_line(capsys)
    assert "--data_files" in line and "--overwrite_output_dir" in line
    assert _bytes(reference) == before


# ------------------------------------------------------------------------ 2. the neutral allow-list
#: A changed value for every allow-listed argument (`RESULT_NEUTRAL_ARGUMENTS`): a run with all of them
#: changed must end bit-identical to the reference run.
NEUTRAL_CHANGES = {
    "output_dir": None,  # another folder
    "overwrite_output_dir": "true", "resume_from_checkpoint": "true", "run_name": "renamed",
    "logging_strategy": "steps", "logging_steps": "3", "logging_first_step": "true", "logging_nan_inf_filter": "false",
    "log_level": "info", "log_level_replica": "error", "log_on_each_node": "false", "report_to": "tensorboard",
    "disable_tqdm": "false", "save_strategy": "steps", "save_steps": "3", "save_total_limit": "1",
    "save_on_each_node": "true", "save_only_model": "true", "push_to_hub": "true", "hub_model_id": "someone/neutral",
    "hub_strategy": "end", "hub_token": "hf_not_a_token", "hub_private_repo": "true", "hub_always_push": "true",
    "hub_revision": "main",
}


def test_every_allow_listed_setting_is_proven_neutral(trained, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    from ccafl_hf.pipeline import RESULT_NEUTRAL_ARGUMENTS

    assert set(NEUTRAL_CHANGES) == RESULT_NEUTRAL_ARGUMENTS  # a new allow-listed setting needs its proof here
    reference, cache = trained
    monkeypatch.setenv("CCAFL_HF_CACHE", str(cache))
    pushed = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: pushed.append(kw["repo_id"]))
    out = tmp_path / "neutral"
    flags = [item for name, value in NEUTRAL_CHANGES.items() if value is not None for item in (f"--{name}", value)]
    verbosity = transformers.logging.get_verbosity()
    try:
        assert train_main(["--output_dir", str(out), *SMALL_RUN, *flags]) == 0
    finally:
        transformers.logging.set_verbosity(verbosity)
    assert pushed == ["someone/neutral"]
    assert_same_run(out, reference)


def test_dataloader_workers_are_fingerprinted(trained, capsys):
    """Workers change the augmentation's random streams: a changed count is refused by name, not mixed in."""
    reference, _ = trained
    before = _bytes(reference)
    assert train_main(["--output_dir", str(reference), *SMALL_RUN, "--dataloader_num_workers", "2"]) == 2
    assert "--dataloader_num_workers 0 -> 2" in _one_error_line(capsys)
    assert _bytes(reference) == before


# -------------------------------------------------- 3./5. checkpoints: complete, verified, at an epoch end
def test_mid_epoch_kill_with_step_checkpoints_resumes_exactly(trained, tmp_path):
    """--save_strategy steps: killed after a checkpoint saved inside an epoch, the rerun passes it over (one
    line) for the last epoch-end checkpoint and ends bit-identical; a checkpoint cut off by the kill and a
    truncated weights file are passed over too."""
    reference, cache = trained
    out = tmp_path / "steps"
    steps = ["--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "3"]
    killed_at("step-6", out, cache, *steps)  # checkpoint-6: half-way through loop epoch 2
    loop = out / "checkpoints" / "icdl_ical"
    assert sorted(p.name for p in loop.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    cut = loop / "checkpoint-2" / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[:100])  # not the resume point anyway: stays unread
    result = subprocess.run(run_script(out, cache, *steps), env=run_env(cache), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "discarding checkpoint-6 (saved inside epoch 2, where a resume is not exact)" in result.stderr
    assert "resuming ICDL at epoch 1 (step 4) from checkpoints/icdl_ical/checkpoint-4" in result.stderr
    assert_same_run(out, reference)


# --------------------------------------------------------------------- 4. no substituted results
def test_finished_run_with_a_deleted_model_is_redone(trained, tmp_path, capsys, caplog):
    reference, cache = trained
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "model.safetensors").unlink()
    assert train_main(["--output_dir", str(out), *SMALL_RUN]) == 0
    printed = capsys.readouterr()
    assert "nothing trained" not in printed.out and "CCAFL results" in printed.out
    assert any("does not verify (model.safetensors is missing)" in r.message for r in caplog.records)
    assert_same_run(out, reference)


def test_unreadable_stage_results_are_recomputed_never_substituted(trained, tmp_path, monkeypatch, capsys, caplog):
    """ICDL's results cut off in a finished run whose final files are gone: ICDL is recomputed from a verified
    checkpoint before its end (or from the start), never reported with stage 1's numbers."""
    reference, cache = trained
    monkeypatch.setenv("CCAFL_HF_CACHE", str(cache))
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "eval_results.json").unlink()
    marker = out / "checkpoints" / "icdl" / "final" / "manifest.json"
    marker.write_text(marker.read_text()[:30])
    assert train_main(["--output_dir", str(out), *SMALL_RUN]) == 0
    assert any("the results of ICDL" in r.message and "recomputing them" in r.message for r in caplog.records)
    stages = json.loads((out / "eval_results.json").read_text())["stages"]
    assert stages["icdl"] == json.loads((reference / "eval_results.json").read_text())["stages"]["icdl"]
    assert stages["icdl"] != stages["prompt"]
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------- 6. nothing lost
def test_overwrite_of_a_folder_that_holds_no_run_is_refused(tmp_path, capsys):
    out = tmp_path / "my_work"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("README.md", "model.safetensors", "notes.txt"):
        (out / name).write_text(f"my {name}")
    before = _bytes(out)
    assert train_main(["--output_dir", str(out), *SMALL_RUN, "--overwrite_output_dir", "true"]) == 2
    assert "holds no ccafl-hf run" in _one_error_line(capsys)
    assert _bytes(out) == before and sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoints", "README.md", "model.safetensors", "notes.txt"])


def test_empty_output_dir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_main(["--output_dir", "", *SMALL_RUN]) == 2
    assert "--output_dir is empty" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_meeting_a_corrupt_image_keeps_the_old_run_byte_identical(trained, tmp_path, monkeypatch, capsys):
    reference, cache = trained
    image = _train_image(_copy_cache(cache, tmp_path, monkeypatch))
    image.write_bytes(b"\x00" * 64)
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = _bytes(out)
    assert train_main(["--output_dir", str(out), *SMALL_RUN, "--overwrite_output_dir", "true"]) == 2
    assert _bytes(out) == before
    line = _one_error_line(capsys)
    assert str(image) in line and "not a decodable image" in line


# ------------------------------------------------------------------------------ 7. full disk, one line
def _finished_run_without_model(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the shared finished run whose final model was deleted: the next run writes it again."""
    reference, cache = trained
    monkeypatch.setenv("CCAFL_HF_CACHE", str(cache))
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "model.safetensors").unlink()
    return out


def test_full_disk_while_writing_the_model_is_one_line(trained, tmp_path, monkeypatch, capsys):
    """safetensors' own error on a full disk: one line naming the folder and the bytes, no temporary files."""
    from safetensors import SafetensorError

    out = _finished_run_without_model(trained, tmp_path, monkeypatch)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    assert train_main(["--output_dir", str(out), *SMALL_RUN]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot write {out}: no space left on the device (about")
    assert "bytes) needed" in line and "free" in line
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


def test_too_little_free_space_is_refused_before_writing(trained, tmp_path, monkeypatch, capsys):
    import collections

    out = _finished_run_without_model(trained, tmp_path, monkeypatch)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("ccafl_hf.pipeline.manifest.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert train_main(["--output_dir", str(out), *SMALL_RUN]) == 2
    line = _one_error_line(capsys)
    assert f"cannot write the final model to {out}" in line and "(1000 bytes) free" in line
    assert not (out / "model.safetensors").exists() and "bytes) needed" in line


# ------------------------------------------------------------------ data without a query/gallery split
def test_data_without_query_gallery_warns_once_and_seals_every_stage(tmp_path, monkeypatch, caplog, capsys):
    """Cameras without global ids (no query/gallery split): one warning for the run, not one per evaluation
    point (before training, each stage end); every stage is sealed without metrics and the rerun trains nothing."""
    import logging

    from ccafl_hf.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    monkeypatch.setenv("CCAFL_HF_CACHE", str(tmp_path / "cache"))
    scene = generate_synthetic_scene(tmp_path / "scene", SyntheticSceneConfig(num_people=8, seed=1))
    for ids in scene.rglob("global_ids.txt"):
        ids.unlink()
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--model_name_or_path", "tiny", "--dataset", "mot", "--data_dir", str(scene),
            "--dataset_options", json.dumps({"crops_per_track": 4}), "--num_identities_per_batch", "4",
            "--num_instances", "2", "--prompt_epochs", "1", "--icdl_epochs", "1", "--ical_epochs", "1",
            "--iters_per_epoch", "2", "--ical_image_text_start_epoch", "1", "--adversarial_start_epoch", "1",
            "--adversarial_end_epoch", "1", "--eval_every_epochs", "1", "--disable_tqdm", "true", "--num_threads", "1"]
    for printed in ("CCAFL results", "nothing trained"):  # the run, then its rerun
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert train_main(argv) == 0
        assert printed in capsys.readouterr().out
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "query/gallery" in
                r.getMessage()]
        assert len(said) == 1 and "cannot be evaluated" in said[0], said
    results = json.loads((out / "eval_results.json").read_text())
    assert results["stages"] == {"untrained": {}, "prompt": {}, "icdl": {}, "ical": {}}
    assert (out / "checkpoints" / "ical" / "final" / "training_state.safetensors").is_file()
