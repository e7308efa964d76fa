"""Packaged presets and `train.py --print_settings`: what a preset resolves to, shown without training,
and the same settings written by every run."""

import json
from importlib import resources

import pytest

from ccafl_hf.commands import available_presets, load_preset, train_main
from synthetic_options import SMALL_SYNTHETIC

# the paper's per-dataset values (stages 2–3), written out here independently of the preset files
PER_DATASET = {
    "market1501": dict(memory_lambda=0.6, association_rate=1.7, adversarial_margin=0.7, adversarial_start_epoch=40,
                       adversarial_end_epoch=49, ical_image_text_start_epoch=10, num_identities_per_batch=16),
    "dukemtmc": dict(memory_lambda=0.6, association_rate=1.5, adversarial_margin=0.3, adversarial_start_epoch=40,
                     adversarial_end_epoch=59, ical_image_text_start_epoch=40, num_identities_per_batch=16),
    "msmt17": dict(memory_lambda=0.0, association_rate=1.3, adversarial_margin=0.5, adversarial_start_epoch=40,
                   adversarial_end_epoch=59, ical_image_text_start_epoch=40, num_identities_per_batch=32),
}
# shared by every full-scale preset: schedule, sampling, memories, stage 1
COMMON = dict(
    learning_rate=3.5e-4, weight_decay=5e-4, warmup_epochs=10, warmup_factor=0.01, lr_decay_epochs=[40, 50],
    lr_decay_gamma=0.1, max_grad_norm=0.0, num_instances=8, iters_per_epoch=200, icdl_epochs=5, ical_epochs=75,
    memory_instances=32, memory_temperature=0.05, memory_momentum=0.1, triplet_margin=0.3, label_smoothing=0.1,
    adversarial_epsilon=0.8, adversarial_tau=0.2, classifier_scale=16.0, random_erasing_prob=0.5,
    prompt_epochs=60, prompt_batch_size=64, prompt_learning_rate=3.5e-4, prompt_weight_decay=1e-4,
    prompt_warmup_epochs=5, prompt_lr_schedule="epoch_cosine", prompt_warmup_lr=1e-5, prompt_min_lr=1e-6,
    eval_every_epochs=10, save_best_checkpoint=False,
)
RECIPES = {
    "paper": dict(model="timm/resnet50_clip.openai", optimizer="adam", bias_lr_factor=2.0,
                  freeze_patch_embedding=False),
    "vit-b16": dict(model="openai/clip-vit-base-patch16", optimizer="sgd", sgd_momentum=0.9,
                    freeze_patch_embedding=True),
}
FULL_PRESETS = [f"{recipe}-{dataset}" for recipe in RECIPES for dataset in PER_DATASET]


def _print_settings(argv, capsys) -> dict:
    code = train_main([*argv, "--print_settings"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_every_full_scale_preset_is_packaged():
    assert set(FULL_PRESETS) <= set(available_presets())


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_print_settings_shows_the_preset_values(name, tmp_path, capsys):
    recipe, dataset = name.rsplit("-", 1)
    out = tmp_path / "out"
    settings = _print_settings(["--preset", name, "--output_dir", str(out)], capsys)
    assert not out.exists()  # nothing trained, the output folder untouched
    assert settings["data"]["preset"] == name
    model, expected = settings["model"], {**COMMON, **PER_DATASET[dataset], **RECIPES[recipe]}
    assert model["model_name_or_path"] == expected.pop("model")
    assert model["image_size"] == [256, 128]
    training = settings["training"]
    for key, value in expected.items():
        assert training[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    # mixed precision where the device allows it: the preset asks for "auto" (resolved at run time)
    assert load_preset(name)["mixed_precision"] == "auto"
    # each full-scale preset names its dataset and its own output folder (never the demo's)
    assert settings["data"]["dataset"] == dataset
    assert load_preset(name)["output_dir"] == f"outputs/{name}"
    description = json.loads((resources.files("ccafl_hf") / "presets" / f"{name}.json").read_text())["_description"]
    assert ("paper's setting" in description) == (recipe == "paper")
    assert "METHOD" not in description


def test_print_settings_says_what_auto_mixed_precision_resolved_to(tmp_path, capsys):
    """On this CPU machine "auto" resolves to "no"; the JSON shows the resolved value and stderr says why."""
    code = train_main(["--preset", "paper-market1501", "--output_dir", str(tmp_path / "out"), "--print_settings"])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["training"]["mixed_precision"] == "no"
    assert "mixed_precision 'auto' resolved to 'no' on this machine" in captured.err
    code = train_main(["--output_dir", str(tmp_path / "out"), "--print_settings"])  # the demo asks for "no"
    assert code == 0 and "resolved to" not in capsys.readouterr().err


def test_print_settings_applies_flags_over_the_preset(tmp_path, capsys):
    settings = _print_settings(["--preset", "paper-msmt17", "--output_dir", str(tmp_path / "out"),
                                "--learning_rate", "1e-4", "--dataset", "market1501", "--optimizer", "sgd"], capsys)
    assert settings["training"]["learning_rate"] == pytest.approx(1e-4)
    assert settings["training"]["optimizer"] == "sgd"
    assert settings["training"]["association_rate"] == pytest.approx(1.3)  # the rest still from the preset
    assert settings["data"]["dataset"] == "market1501"


def test_print_settings_with_an_unknown_preset_is_one_error_line(tmp_path, capsys):
    code = train_main(["--preset", "paper-cuhk03", "--print_settings", "--output_dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and captured.out == ""
    assert len(err) == 1 and err[0].startswith("error:") and "unknown preset 'paper-cuhk03'" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_run_writes_its_resolved_settings_as_json(tmp_path, capsys, monkeypatch):
    """The run's output folder holds the settings `--print_settings` shows for the same command."""
    monkeypatch.setenv("CCAFL_HF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--model_name_or_path", "tiny", "--dataset_options", json.dumps(SMALL_SYNTHETIC), "--stages", "prompt",
            "--prompt_epochs", "1", "--output_dir", str(out), "--disable_tqdm", "true"]
    shown = _print_settings(argv, capsys)
    assert train_main(argv) == 0
    written = json.loads((out / "resolved_settings.json").read_text())
    assert written == shown
    assert written["training"]["prompt_epochs"] == 1 and written["model"]["model_name_or_path"] == "tiny"
