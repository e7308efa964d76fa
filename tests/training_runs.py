"""Small end-to-end training runs shared by the tests of the train script and of the run's lifecycle: the
flags, a fresh process running train.py, a process that kills itself at a chosen point, and the bit-for-bit
comparison of two finished runs (a plain module: importable by name)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from synthetic_options import SMALL_SYNTHETIC

ROOT = Path(__file__).resolve().parent.parent
SMALL_RUN = [
    "--model_name_or_path", "tiny", "--dataset_options", json.dumps(SMALL_SYNTHETIC),
    "--prompt_epochs", "3", "--icdl_epochs", "2", "--ical_epochs", "3", "--iters_per_epoch", "4",
    "--ical_image_text_start_epoch", "2", "--adversarial_start_epoch", "3", "--adversarial_end_epoch", "4",
    "--disable_tqdm", "true",
    "--num_threads", "1",  # the bit-for-bit resume checks compare runs of several processes: one float-sum order
]


def run_script(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--output_dir", str(out), *SMALL_RUN, *extra]


def run_env(cache: Path) -> dict:
    env = {**os.environ, "CCAFL_HF_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


#: Runs train.py in a process that SIGKILLs itself at a point chosen by the test (argv[1]), by patching the
#: package from outside: after a stage's results are sealed (``after-<stage>``), when the stage-2/3 loop
#: begins the step after global step N (``step-N``; checkpoint N is sealed then), or while the final files
#: are written (``artifacts``). The library has no kill hook of its own.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    import ccafl_hf.model_card
    import ccafl_hf.pipeline.run as run

    point, argv = sys.argv[1], sys.argv[2:]

    def kill(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point.startswith("after-"):
        seal = run.TrainingRun._seal

        def sealed(self, stage, *args, **kwargs):
            seal(self, stage, *args, **kwargs)
            if stage == point[len("after-"):]:
                kill()

        run.TrainingRun._seal = sealed
    elif point.startswith("step-"):
        class Kill(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == int(point[len("step-"):]):
                    kill()

        init = run.CCAFLTrainer.__init__

        def with_kill(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.add_callback(Kill())

        run.CCAFLTrainer.__init__ = with_kill
    elif point == "artifacts":
        ccafl_hf.model_card.render_model_card = kill
    from ccafl_hf.commands import train_main
    sys.exit(train_main(argv))
""")


def killed_at(point: str, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", KILLER, point, "--output_dir", str(out), *SMALL_RUN, *extra]
    killed = subprocess.run(argv, env=run_env(cache), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
    assert not (out / "eval_results.json").exists()
    return killed


def assert_same_run(out: Path, reference: Path) -> None:
    expected = load_file(str(reference / "model.safetensors"))
    resumed = load_file(str(out / "model.safetensors"))
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
    assert json.loads((out / "eval_results.json").read_text()) == json.loads(
        (reference / "eval_results.json").read_text())
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]  # no leftovers


