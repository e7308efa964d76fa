"""The benchmarks run: each one's smoke mode goes through the same code as its full run, so a change of
the library's API breaks a test here rather than the next paper-scale measurement."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backbone", ["vit-b16", "rn50"])
def test_paper_scale_quick_runs_every_phase(backbone, tmp_path):
    paper_scale = _load("paper_scale")
    output = tmp_path / "figures.json"
    result = paper_scale.main(["--quick", "--backbone", backbone, "--device", "cpu",
                               "--data_dir", str(tmp_path / "data"), "--output", str(output)])
    phases = result["phases"]
    for name in ("train-set feature pass (cache / rebuild / association input)", "stage 1: prompt steps",
                 "memory rebuild (from the pass's features)", "association at MSMT17 size (random features)",
                 "stage 2 (ICDL) steps", "stage 3 (ICAL, adversarial + image-text) steps",
                 "plain CLIP fine-tune steps (CE head)", "evaluation (query + gallery)"):
        assert phases[name]["seconds"] > 0, name
        assert phases[name]["peak_gb"] > 0, name
    assert result["eval_images"]["query"] > 0 and result["eval_images"]["gallery"] > 0
    for size in ("Market-1501", "MSMT17"):
        assert result["projected_hours"][size]["total_hours"] > 0
    assert output.is_file()
    assert 0 <= result["random_init_metrics"]["mAP"] <= 1


def test_paper_scale_bad_flag_is_one_line(capsys):
    paper_scale = _load("paper_scale")
    with pytest.raises(SystemExit) as exit_info:
        paper_scale.parse_args(["--iterations", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --iterations must be >= 1"


@pytest.mark.parametrize("backbone", ["vit", "rn50"])
def test_stage_steps_quick_prints_the_ratios(backbone):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "stage_steps.py"), "--quick", "--backbone", backbone,
                          "--num_identities", "64", "--batch_size", "8", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ratio ICDL / baseline" in run.stdout and "overhead" in run.stdout
