"""The main job: scripts/train.py end to end, artifacts, model card, resume after SIGKILL, Hub push,
bad inputs."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel

from ccafl_hf import CCAFLModel
from ccafl_hf.commands import load_preset, parse_train_args, train_main
from synthetic_options import SMALL_SYNTHETIC
from training_runs import SMALL_RUN, assert_same_run, killed_at, run_env, run_script

ROOT = Path(__file__).resolve().parent.parent


def test_eval_results_have_every_stage(trained):
    out, _ = trained
    results = json.loads((out / "eval_results.json").read_text())
    keys = {"mAP", "rank1", "rank5", "rank10", "mINP"}
    assert keys <= set(results)
    assert list(results["stages"]) == ["untrained", "prompt", "icdl", "ical"]
    for metrics in results["stages"].values():
        assert keys <= set(metrics) and all(0.0 <= metrics[k] <= 1.0 for k in keys)
    assert results["mAP"] == results["stages"]["ical"]["mAP"]


def test_artifacts_load_and_card_has_metadata(trained):
    out, _ = trained
    for name in ("config.json", "model.safetensors", "modeling_ccafl.py", "configuration_ccafl.py",
                 "processor_config.json", "tokenizer.json", "text_features.safetensors",
                 "prompt_adapter/adapter_config.json", "prompt_adapter/adapter_model.safetensors", "README.md"):
        assert (out / name).is_file(), name
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, CCAFLModel)
    text = load_file(str(out / "text_features.safetensors"))
    assert text["text_features"].shape[0] == text["identity_camids"].shape[0] > 0
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers"
    assert "person-reid" in metadata["tags"]
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    results = json.loads((out / "eval_results.json").read_text())
    mAP = next(m["value"] for m in metrics if m["name"] == "mAP")
    assert mAP == pytest.approx(100 * results["mAP"], abs=0.01)
    assert "Ethical considerations" in card and "prompt_epochs" in card
    assert "`Pillow`" in card  # what loading with remote code needs besides transformers and torch
    assert sorted(p.name for p in out.glob("*.py")) == [
        "configuration_ccafl.py", "modeling_ccafl.py", "modeling_ccafl_resnet.py"]  # remote code: modelling only


def test_push_to_hub_sends_a_loadable_folder(trained, tmp_path, monkeypatch):
    """The Hub is unreachable: capture what `upload_folder` would commit, then load it in a fresh process."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    from ccafl_hf.pipeline import push_output_dir

    out, _ = trained
    sent = tmp_path / "sent"
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commit"] = [op.path_in_repo for op in operations]
        for op in operations:
            target = sent / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = op.path_or_fileobj
            target.write_bytes(Path(source).read_bytes() if isinstance(source, str | Path) else source)
        return None

    def validate_yaml(self, content, **kwargs):  # upload_folder has the Hub check the card's metadata first
        calls["validated"] = content

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)  # upload_folder's one-commit path
    model_args, data_args, args = parse_train_args(["--output_dir", str(out), "--push_to_hub", "true",
                                                    "--hub_model_id", "someone/ccafl-demo"])
    assert push_output_dir(args) == "someone/ccafl-demo"
    assert calls["repo"] == "someone/ccafl-demo"
    assert "model-index" in yaml.safe_load((sent / "README.md").read_text().split("---")[1])
    assert calls["validated"] == (out / "README.md").read_text()
    assert not any(path.startswith("checkpoints/") for path in calls["commit"]) and "ccafl_run.json" not in calls["commit"]
    assert {"README.md", "model.safetensors", "modeling_ccafl.py", "prompt_adapter/adapter_config.json"} <= set(
        calls["commit"])
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ccafl_hf"] = None  # this process cannot import the package (even when pip-installed)
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(sent)!r}, trust_remote_code=True).eval()
        print(type(model).__name__, model.get_reid_features(torch.zeros(1, 3, *model.config.image_size)).shape)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("CCAFLModel")


def test_sigkill_at_the_icdl_ical_boundary_then_resume_matches_uninterrupted_run(trained, tmp_path):
    """Killed right after the checkpoint that ends ICDL (the stage-2/3 loop goes on into ICAL), the rerun
    resumes the loop at the boundary (memories, classifier and its own Adam, the one optimiser,
    scheduler, RNG) and ends bit-identical."""
    reference, cache = trained
    out = tmp_path / "killed"
    killed_at("step-8", out, cache)  # --icdl_epochs 2 x --iters_per_epoch 4
    loop = out / "checkpoints" / "icdl_ical"
    sealed = [int(p.name.split("-")[1]) for p in loop.glob("checkpoint-*") if (p / "manifest.json").is_file()]
    assert max(sealed) == 8, sealed  # killed between the boundary and the next checkpoint
    assert (out / "checkpoints" / "icdl" / "final" / "manifest.json").is_file()  # ICDL evaluated in the loop
    result = subprocess.run(run_script(out, cache, "--resume_from_checkpoint", "true"), env=run_env(cache),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming ICAL at epoch 2 (step 8) from checkpoints/icdl_ical/checkpoint-8" in result.stderr
    assert_same_run(out, reference)


def test_sigkill_at_every_stage_boundary_then_resume_matches(trained, tmp_path):
    """Killed right after each stage's results are sealed (stage 1, ICDL, ICAL) and while the final files
    are written, and resumed each time, the run ends bit-identical to the uninterrupted one. A cut-off
    results manifest on the way (a full disk) is recomputed from verified state, never replaced by another
    stage's numbers; the temporary files of the killed artifact writing are removed."""
    reference, cache = trained
    out = tmp_path / "boundaries"
    for point in ("after-prompt", "after-icdl", "after-ical", "artifacts"):
        killed_at(point, out, cache)
        if point == "after-icdl":
            (out / "checkpoints" / "untrained" / "final" / "manifest.json").write_bytes(b"")
            marker = out / "checkpoints" / "icdl" / "final" / "manifest.json"
            marker.write_text(marker.read_text()[:20])
    assert [p for p in out.glob(".tmp-*")]  # the killed artifact writing left its temporary folder
    result = subprocess.run(run_script(out, cache), env=run_env(cache), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ICAL already finished with these settings" in result.stderr
    assert_same_run(out, reference)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "cuhk03"], "cuhk03"),
        (["--preset", "paper-cuhk"], "unknown preset 'paper-cuhk'"),
        (["--dataset", "market1501"], "data_dir"),
        (["--stages", "icdl,ical"], "prefix"),
        (["--stages", "icdl", "ical"], "prefix"),
        (["--dataset_options", '{"num_cameras": 1}'], "camera"),
        (["--num_threads", "0"], "--num_threads"),
    ],
)
def test_bad_input_one_clear_line(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = train_main(["--output_dir", str(out), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("flag", ["--num_threads", "--torch_num_threads"])
def test_num_threads_is_a_process_option_for_the_run_only(flag, tmp_path, monkeypatch, capsys):
    """The thread count applies while the run trains, is restored after, and is no setting of the run."""
    import ccafl_hf.pipeline

    seen = []
    monkeypatch.setattr(ccafl_hf.pipeline, "run_training", lambda *a: seen.append(torch.get_num_threads()) or
                        {"stages": {}, "mAP": 0.0})
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    assert train_main(["--output_dir", str(tmp_path / "out"), flag, str(target)]) == 0
    assert seen == [target] and torch.get_num_threads() == before
    capsys.readouterr()
    assert train_main(["--output_dir", str(tmp_path / "out"), flag, str(target), "--print_settings"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert not any("threads" in key for group in settings.values() if isinstance(group, dict) for key in group)


@pytest.mark.parametrize(
    "argv",
    [["--stages", "prompt", "icdl", "--lr_decay_epochs", "3", "4"], ["--stages", "prompt,icdl", "--lr_decay_epochs", "3,4"],
     ["--stages=prompt,icdl", "--lr_decay_epochs=3,4"]],
)
def test_list_flags_take_lists_and_the_comma_form(argv, tmp_path):
    _, _, args = parse_train_args(["--output_dir", str(tmp_path), *argv])
    assert args.stages == ["prompt", "icdl"] and args.lr_decay_epochs == [3, 4]


def test_output_dir_of_another_run_is_refused(trained, tmp_path, capsys):
    reference, _ = trained
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    code = train_main(["--output_dir", str(reference), *SMALL_RUN, "--seed", "7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "another run" in err[0] and "--overwrite_output_dir" in err[0]
    assert before == {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}


def test_presets_and_flags(tmp_path):
    demo = load_preset("demo")
    model_args, data_args, args = parse_train_args(["--output_dir", str(tmp_path)])
    assert data_args.dataset == "synthetic" and data_args.preset == "demo"
    assert model_args.model_name_or_path == demo["model_name_or_path"] == "tiny-pretrained"
    assert args.icdl_epochs == demo["icdl_epochs"]
    # explicit flags override the preset; dataset and preset are independent
    model_args, data_args, args = parse_train_args(
        ["--output_dir", str(tmp_path), "--preset", "paper-msmt17", "--dataset", "market1501", "--icdl_epochs", "2"])
    assert model_args.model_name_or_path == "timm/resnet50_clip.openai"
    assert data_args.dataset == "market1501" and args.icdl_epochs == 2
    assert args.association_rate == 1.3 and args.memory_lambda == 0.0 and args.num_identities_per_batch == 32
    assert load_preset("paper-dukemtmc")["adversarial_margin"] == 0.3


def test_two_process_accelerate_launch(trained, tmp_path):
    """`accelerate launch --num_processes 2` (gloo on CPU) completes with the same kind of results."""
    _, cache = trained
    out = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(ROOT / "scripts" / "train.py"), "--output_dir", str(out), *SMALL_RUN]
    env = {**run_env(cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert list(results["stages"]) == ["untrained", "prompt", "icdl", "ical"]
    assert isinstance(AutoModel.from_pretrained(out), CCAFLModel)


def test_evaluate_script_reproduces_training_metrics(trained, tmp_path, monkeypatch):
    """`scripts/evaluate.py` on the trained output gives the metrics `eval_results.json` recorded."""
    from ccafl_hf.commands import evaluate_main

    out, cache = trained
    monkeypatch.setenv("CCAFL_HF_CACHE", str(cache))
    report = tmp_path / "results.json"
    argv = ["--model", str(out), "--dataset", "synthetic", "--dataset_options", json.dumps(SMALL_SYNTHETIC),
            "--output", str(report), "--no_progress"]
    assert evaluate_main(argv) == 0
    measured = json.loads(report.read_text())
    recorded = json.loads((out / "eval_results.json").read_text())
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
        assert measured[key] == pytest.approx(recorded[key], abs=1e-6), key


def test_paper_preset_offline_fails_with_one_clear_line(tmp_path, capsys, monkeypatch):
    """The real path (ViT-B/16 from the Hub) is implemented and, offline, says how to provide the weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = train_main(["--preset", "vit-b16-market1501", "--output_dir", str(tmp_path / "out"),
                       "--dataset", "synthetic", "--dataset_options", json.dumps(SMALL_SYNTHETIC)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "openai/clip-vit-base-patch16" in err[0] and "--model_name_or_path" in err[0]


def test_build_model_seed_overrides_and_errors():
    """The demo's model options: the seed drives the tiny init, config overrides apply, bad ones are refused."""
    from ccafl_hf.pipeline import ModelArguments, RunError, build_model

    args = ModelArguments(config_overrides='{"vision_config": {"patch_size": 4}}')
    first, _ = build_model(args, seed=0)
    again, _ = build_model(args, seed=0)
    other, _ = build_model(args, seed=1)
    assert first.config.vision_config.patch_size == 4 and first.config.patch_grid == (16, 8)
    weight = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])
    with pytest.raises(RunError, match="config_overrides"):
        build_model(ModelArguments(config_overrides="{oops"))
    with pytest.raises(RunError, match="config_overrides"):
        build_model(ModelArguments(config_overrides='{"vision_config": {"patch_size": 7}}'))


def test_card_base_model_only_for_hub_ids(tmp_path):
    """The card's ``base_model`` links a Hub model; built-in tiny models and local folders are left out."""
    from ccafl_hf.pipeline.model_card import hub_base_model

    assert hub_base_model("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert hub_base_model("tiny") is None and hub_base_model("tiny-pretrained") is None
    assert hub_base_model(str(tmp_path)) is None


def test_explicit_partial_checkpoint_is_refused(trained, tmp_path, capsys, monkeypatch):
    """A --resume_from_checkpoint PATH cut off while saving (no manifest) is refused before any work."""
    reference, cache = trained
    monkeypatch.setenv("CCAFL_HF_CACHE", str(cache))
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    partial = sorted((out / "checkpoints" / "icdl_ical").glob("checkpoint-*"))[0]
    (partial / "manifest.json").unlink()
    before = _snapshot(out)
    code = train_main(["--output_dir", str(out), *SMALL_RUN, "--resume_from_checkpoint", str(partial)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot be resumed exactly: no readable manifest.json" in err[0], err
    assert _snapshot(out) == before


def test_preset_naming_an_unknown_argument_is_one_clear_line(tmp_path, capsys, monkeypatch):
    """A preset/flag conflict: a preset key that is no argument of train.py is refused by name."""
    monkeypatch.setattr("ccafl_hf.commands.train.load_preset", lambda name: {**load_preset("demo"), "icdl_epoch": 3})
    code = train_main(["--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "preset 'demo' sets unknown argument(s): icdl_epoch" in err[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the run folder (issue: stale,
# concurrent, overwrite, failed runs) and bad values
def _snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "change",
    [["--association_rate", "1.5"], ["--memory_lambda", "0.0"], ["--use_adversarial_loss", "false"],
     ["--prompt_init_std", "0.05"], ["--icdl_epochs", "4", "--resume_from_checkpoint", "true"]],
    ids=["association_rate", "memory_lambda", "adversarial", "prompt", "resume-flag"],
)
def test_changed_setting_is_refused_never_stale(trained, change, capsys):
    """A finished run rerun with a result-affecting change is refused by name (even with
    --resume_from_checkpoint): no stale results, no rewritten card or settings."""
    reference, _ = trained
    before = _snapshot(reference)
    code = train_main(["--output_dir", str(reference), *SMALL_RUN, *change])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert f"--{change[0].lstrip('-')}" in err[0] and "--overwrite_output_dir" in err[0]
    assert _snapshot(reference) == before


def test_finished_run_rerun_trains_nothing_and_says_so(trained, capsys):
    reference, _ = trained
    before = _snapshot(reference)
    assert train_main(["--output_dir", str(reference), *SMALL_RUN]) == 0
    printed = capsys.readouterr().out
    assert "nothing trained: this run already finished" in printed and "CCAFL results" not in printed
    assert _snapshot(reference) == before


#: Another run holding an output folder, as `RunDirectory.lock` does (filelock + PID file), without the package.
LOCK_HOLDER = textwrap.dedent("""
    import os, sys, time
    from filelock import FileLock
    os.makedirs(sys.argv[1], exist_ok=True)
    lock = FileLock(os.path.join(sys.argv[1], ".ccafl_run.lock"), timeout=0, thread_local=False)
    lock.acquire()
    with open(os.path.join(sys.argv[1], ".ccafl_run.pid"), "w") as pid:
        pid.write(f"{os.getpid()}\\n")
    print("locked", flush=True)
    time.sleep(120)
""")


def test_second_concurrent_run_is_refused(trained, tmp_path, capsys):
    """While a run holds the folder, another run into it fails at once naming the holder's PID."""
    _, cache = trained
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.time()
        code = train_main(["--output_dir", str(out), *SMALL_RUN])
        elapsed = time.time() - started
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"in use by another training run (PID {holder.pid})" in err[0], err
    assert elapsed < 10  # before loading data or model
    assert sorted(p.name for p in out.iterdir()) == [".ccafl_run.lock", ".ccafl_run.pid"]  # the holder's only


def test_overwrite_with_bad_data_keeps_the_previous_run(trained, tmp_path, capsys):
    reference, _ = trained
    before = _snapshot(reference)
    code = train_main(["--output_dir", str(reference), *SMALL_RUN, "--overwrite_output_dir", "true",
                       "--dataset", "market1501", "--dataset_options", "{}", "--data_dir", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing" in err[0], err
    assert _snapshot(reference) == before


def test_a_run_failing_before_training_leaves_the_folder_as_found(tmp_path, capsys):
    """A wrong --data_dir: nothing is created (so the corrected rerun is not refused), and an existing
    folder keeps exactly what it had."""
    for out in (tmp_path / "new", tmp_path / "existing"):
        if out.name == "existing":
            out.mkdir()
            (out / "notes.txt").write_text("mine")
        code = train_main(["--output_dir", str(out), *SMALL_RUN, "--dataset", "market1501", "--dataset_options", "{}",
                           "--data_dir", str(tmp_path / "wrong")])
        assert code == 2 and "wrong" in capsys.readouterr().err
        assert (not out.exists()) if out.name == "new" else [p.name for p in out.iterdir()] == ["notes.txt"]


#: Bad values in `--help` order: each is one `error:` line naming the flag, exit 2, before any work.
BAD_VALUES = [
    (["--model_name_or_path", "{pickle}"], "pytorch_model.bin"),
    (["--model_name_or_path", "./no-such-folder"], "--model_name_or_path ./no-such-folder: no such model folder"),
    (["--image_size", "64"], "--image_size"),
    (["--config_overrides", "[1]"], "--config_overrides must be a JSON object"),
    (["--config_overrides", '{"nosuch": 1}'], "unknown config field nosuch"),
    (["--config_overrides", '{"vision_config": {"patch_size": 0}}'], "patch_size must be an integer >= 1"),
    (["--dataset", "cuhk03"], "cuhk03"),
    (["--dataset_options", "[1]"], "--dataset_options must be a JSON object"),
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--learning_rate", "abc"], "--learning_rate"),
    (["--weight_decay", "-1"], "--weight_decay"),
    (["--seed", "-3"], "--seed"),
    (["--num_identities_per_batch", "1"], "--num_identities_per_batch"),
    (["--num_identities_per_batch", "500"], "--num_identities_per_batch 500 is more than the"),
    (["--num_instances", "0"], "--num_instances"),
    (["--num_instances", "1"], "--num_instances must be an integer >= 2"),
    (["--icdl_epochs", "-1"], "--icdl_epochs"),
    (["--ical_epochs", "-1"], "--ical_epochs"),
    (["--ical_epochs", "0"], "--ical_epochs"),
    (["--warmup_epochs", "100"], "--warmup_epochs 100 is longer than the stage-2/3 loop"),
    (["--lr_decay_epochs", "a,b"], "--lr_decay_epochs"),
    (["--lr_decay_epochs", "1000"], "--lr_decay_epochs 1000 is past the last loop epoch"),
    (["--optimizer", "lbfgs"], "--optimizer"),
    (["--sgd_momentum", "1.5"], "--sgd_momentum"),
    (["--memory_temperature", "0"], "--memory_temperature"),
    (["--memory_temperature", "1e-30"], "--memory_temperature must be a number in [0.001, 10]"),
    (["--memory_instances", "100000000"], "--memory_instances 100000000: the camera memories need"),
    (["--association_rate", "-1"], "--association_rate"),
    (["--association_rate", "0"], "--association_rate"),
    (["--adversarial_start_epoch", "1000", "--adversarial_end_epoch", "1001"],
     "--adversarial_start_epoch 1000 is past the last loop epoch"),
    (["--adversarial_end_epoch", "1"], "--adversarial_end_epoch"),
    (["--adversarial_margin", "1e30"], "--adversarial_margin must be an angle in radians in (0, pi)"),
    (["--adversarial_margin", "0"], "--adversarial_margin"),
    (["--classifier_scale", "1e30"], "--classifier_scale"),
    (["--prompt_epochs", "-1"], "--prompt_epochs"),
    (["--prompt_epochs", "0"], "--prompt_epochs"),
    (["--prompt_init_std", "1e30"], "--prompt_init_std must be a number in (0, 1]"),
]


def test_bad_values_table_is_in_help_order():
    from transformers import HfArgumentParser

    from ccafl_hf.pipeline import DataArguments, ModelArguments
    from ccafl_hf.trainers.arguments import CCAFLTrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, CCAFLTrainingArguments))
    order = [a.option_strings[0] for a in parser._actions if a.option_strings]
    positions = [order.index(argv[0]) for argv, _ in BAD_VALUES]
    assert positions == sorted(positions), [argv[0] for argv, _ in BAD_VALUES]


@pytest.mark.parametrize(("argv", "message"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_value_is_one_line_exit_2_nothing_written(argv, message, tmp_path, capsys):
    if argv[1] == "{pickle}":  # a model folder holding only pickle weights
        folder = tmp_path / "pickled"
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "ccafl"}')
        torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
        argv = [argv[0], str(folder)]
    out = tmp_path / "out"
    code = train_main(["--output_dir", str(out), *SMALL_RUN, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(("flag", "value", "instead"), [
    ("--num_train_epochs", "1", "--prompt_epochs"),
    ("--max_steps", "10", "--iters_per_epoch"),
    ("--per_device_train_batch_size", "64", "--num_identities_per_batch"),
    ("--lr_scheduler_type", "cosine", "--lr_decay_epochs"),
    ("--warmup_steps", "5", "--warmup_epochs"),
    ("--warmup_ratio", "0.1", "--warmup_epochs"),
    ("--optim", "sgd", "--optimizer"),
    ("--eval_strategy", "steps", "--eval_every_epochs"),  # stage 1 has no evaluation data: HF's traceback
])
def test_trainer_flags_the_stages_set_are_refused(flag, value, instead, tmp_path, capsys):
    """A TrainingArguments flag each stage sets itself would be ignored (or, --max_steps, applied to stage 1
    only): one line naming the flag to use instead, also in the --flag=value form and with --print_settings."""
    out = tmp_path / "out"
    for argv in ([flag, value], [f"{flag}={value}"], [flag, value, "--print_settings"]):
        code = train_main(["--output_dir", str(out), *SMALL_RUN, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: {flag} is not used by CCAFL training") and instead in err[0]
    assert not out.exists()


def test_data_dir_without_dataset_is_refused_before_anything_is_written(tmp_path, capsys):
    """--data_dir with the demo's synthetic dataset still selected: one line asking for --dataset, and the
    data folder is not created or filled with the synthetic set; --dataset synthetic says it is meant."""
    data, out = tmp_path / "Market-1501", tmp_path / "out"
    code = train_main(["--output_dir", str(out), *SMALL_RUN, "--data_dir", str(data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pass --dataset" in err[0] and str(data) in err[0], err
    assert not data.exists() and not out.exists()
    code = train_main(["--output_dir", str(out), *SMALL_RUN, "--dataset=synthetic", "--data_dir", str(data),
                       "--print_settings"])
    assert code == 0, capsys.readouterr().err


def test_help_of_every_command_shows_defaults(capsys):
    from ccafl_hf.commands import evaluate_main, retrieval_main

    commands = [(train_main, []), (evaluate_main, []), (retrieval_main, [])]
    commands += [(retrieval_main, [sub]) for sub in ("embed", "index", "search", "export-onnx")]
    for main, argv in commands:
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert "--" in text and ("default" in text or not argv and main is retrieval_main), (main, argv)
        if main is train_main:
            shown = " ".join(text.split())  # the preset's value is the default shown
            assert f"pairs considered. (default: {load_preset('demo')['association_rate']})" in shown


def test_full_disk_is_one_line_naming_the_folder(trained, tmp_path, capsys, monkeypatch):
    """torch.save on a full disk raises a RuntimeError without the path: the script names the folder."""
    _, cache = trained
    monkeypatch.setenv("CCAFL_HF_CACHE", str(cache))

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "full"
    code = train_main(["--output_dir", str(out), *SMALL_RUN])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not progress bars
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: cannot write {out}"), err
    assert "no space left on the device (about" in err[0] and "bytes) needed" in err[0]
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


def test_help_and_print_settings_show_only_what_a_run_uses(tmp_path, capsys):
    """The Trainer flags the stages set themselves are hidden from --help and absent from --print_settings (still
    refused if given); choice fields list their choices and a bad choice fails in the parser."""
    from ccafl_hf.trainers import REPLACED_TRAINER_FLAGS

    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    assert "--optimizer {adam,sgd}" in text and "{no,fp16,bf16,auto}" in text
    for flag in REPLACED_TRAINER_FLAGS:
        assert f"--{flag} " not in text and f"--{flag}\n" not in text, flag
    assert train_main(["--output_dir", str(tmp_path / "out"), "--preset", "paper-market1501", "--print_settings"]) == 0
    settings = json.loads(capsys.readouterr().out)["training"]
    assert not set(REPLACED_TRAINER_FLAGS) & set(settings)
    assert settings["optimizer"] == "adam" and settings["ical_epochs"] == load_preset("paper-market1501")["ical_epochs"]


def _failing_run(tmp_path, capsys, extra=()) -> str:
    out = tmp_path / "out"
    code = train_main(["--output_dir", str(out), *SMALL_RUN, *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_non_finite_loss_stops_the_run_naming_stage_and_step(tmp_path, capsys, monkeypatch):
    """A NaN loss is never dropped or trained on: one error line naming the loss, the step and the stage."""
    import ccafl_hf.trainers.objectives as objectives

    real = objectives.batch_hard_triplet_loss
    monkeypatch.setattr(objectives, "batch_hard_triplet_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    line = _failing_run(tmp_path, capsys)
    assert line.startswith("error: non-finite triplet=nan") and "at step 1 (ICDL, loop epoch 0)" in line, line


def test_non_finite_prompt_loss_stops_stage_1(tmp_path, capsys, monkeypatch):
    import ccafl_hf.trainers.prompt_learning as prompt_learning

    real = prompt_learning.prompt_contrastive_loss
    monkeypatch.setattr(prompt_learning, "prompt_contrastive_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    line = _failing_run(tmp_path, capsys)
    assert line.startswith("error: non-finite loss at step 1 (PROMPT"), line


def test_non_finite_features_stop_the_epoch_preparation(tmp_path, capsys, monkeypatch):
    import ccafl_hf.trainers.base as base

    real = base.extract_features

    def diverged(*args, **kwargs):
        extracted = real(*args, **kwargs)
        extracted.reid_features[0, 0] = float("nan")
        return extracted

    monkeypatch.setattr(base, "extract_features", diverged)
    line = _failing_run(tmp_path, capsys)
    assert "features of the train split hold NaN" in line and "ICDL loop epoch 0" in line, line


def test_non_finite_prompts_never_switch_off_the_image_text_losses(tiny_model):
    from ccafl_hf.errors import NonFiniteError
    from ccafl_hf.trainers import CCAFLForTraining

    model, _ = tiny_model
    text = torch.full((4, model.projection_dim), float("nan"))
    with pytest.raises(NonFiniteError, match="text features"):
        CCAFLForTraining(model, torch.tensor([0, 0, 1, 1]), text)
