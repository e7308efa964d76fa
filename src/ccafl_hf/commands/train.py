"""The train command (`scripts/train.py`, `ccafl-train`): presets + flags -> `run_training`; print only here."""

from __future__ import annotations

import json
import logging
import sys
from importlib import resources
from typing import Any

from transformers import HfArgumentParser

logger = logging.getLogger("ccafl_hf")


class PresetError(ValueError):
    """Unknown preset, or a preset that names an unknown argument."""


def available_presets() -> list[str]:
    """Names of the packaged presets (``ccafl_hf/presets/*.json``)."""
    return sorted(p.name[:-5] for p in (resources.files("ccafl_hf") / "presets").iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The hyper-parameters of a packaged preset (keys starting with ``_`` are comments)."""
    if name not in available_presets():
        raise PresetError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    values = json.loads((resources.files("ccafl_hf") / "presets" / f"{name}.json").read_text())
    return {k: v for k, v in values.items() if not k.startswith("_")}


def _peek_option(argv: list[str], name: str, default: str) -> str:
    for i, token in enumerate(argv):
        if token == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(f"--{name}="):
            return token.split("=", 1)[1]
    return default


def parse_train_args(argv: list[str] | None = None):
    """Parse ``train.py`` arguments: preset values become defaults, explicit flags override them."""
    return _parse_train_command(argv)[:3]


def _parse_train_command(argv: list[str] | None = None):
    """``(model_args, data_args, training_args, print_settings)`` of a ``train.py`` command line."""
    from ..pipeline import DataArguments, ModelArguments
    from ..trainers.arguments import CCAFLTrainingArguments

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, CCAFLTrainingArguments))
    parser.add_argument("--print_settings", action="store_true",
                        help="Print every resolved setting (preset + flags) as JSON and exit without training.")
    parser.error = _raise_usage_error  # a bad flag or value: one line (train_main), not argparse's usage block
    preset_name = _peek_option(argv, "preset", "demo")
    preset = load_preset(preset_name)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(preset) - known)
    if unknown:
        raise PresetError(f"preset {preset_name!r} sets unknown argument(s): {', '.join(unknown)}")
    parser.set_defaults(**preset)
    model_args, data_args, training_args, extra = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args, extra.print_settings


def _raise_usage_error(message: str):
    raise ValueError(message)


def _format_table(results: dict[str, Any]) -> str:
    keys = ("mAP", "rank1", "rank5", "rank10", "mINP")
    lines = [f"{'stage':<10}" + "".join(f"{k:>9}" for k in keys)]
    for stage, metrics in results["stages"].items():
        if not metrics:
            continue
        lines.append(f"{stage:<10}" + "".join(f"{100 * metrics[k]:>8.1f}%" for k in keys))
    return "\n".join(lines)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def train_main(argv: list[str] | None = None) -> int:
    """``accelerate launch scripts/train.py [flags]``: all three stages on the chosen data."""
    from ..data import ReIDDatasetError
    from ..model_files import ModelFolderError
    from ..pipeline import RunError, run_training
    from ..pipeline.run_directory import RunDirectoryError, describe_write_error

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        model_args, data_args, training_args, print_settings = _parse_train_command(argv)
    except ValueError as error:  # bad flag values, preset problems, argument validation
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    if print_settings:
        from ..pipeline import resolved_settings

        print(json.dumps(resolved_settings(model_args, data_args, training_args), indent=2))
        return 0
    try:
        results = run_training(model_args, data_args, training_args)
    except (RunError, RunDirectoryError, ModelFolderError, ReIDDatasetError, OSError, RuntimeError) as error:
        # a RuntimeError is reported here only when it is a failed write (torch.save on a full disk)
        line = describe_write_error(error, training_args.output_dir)
        if line is None and isinstance(error, RuntimeError):
            raise
        print(f"error: {_one_line(line or error)}", file=sys.stderr)
        return 2
    if training_args.process_index == 0 and results.get("already_finished"):
        print(f"\nnothing trained: this run already finished in {training_args.output_dir} with the same settings "
              f"(final mAP {100 * results.get('mAP', 0.0):.1f}%, all stages in eval_results.json); pass "
              "--overwrite_output_dir to train it again")
    elif training_args.process_index == 0:
        print("\nCCAFL results (query/gallery, Market-1501 protocol):")
        print(_format_table(results))
        print(f"\nmodel, card and eval_results.json written to {training_args.output_dir}")
    return 0


__all__ = ["available_presets", "load_preset", "parse_train_args", "train_main"]
