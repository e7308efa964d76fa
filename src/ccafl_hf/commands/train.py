"""The train command (`scripts/train.py`, `ccafl-train`): presets + flags -> `run_training`; print only here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources
from typing import Any

import torch
from transformers import HfArgumentParser

from ..errors import ArgumentError, CCAFLError
from ..trainers.arguments import REPLACED_TRAINER_FLAGS
from ..trainers.validation import epoch_window_problems
from .options import metrics_table

logger = logging.getLogger("ccafl_hf")


class PresetError(CCAFLError):
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


def _check_replaced_flags(argv: list[str]) -> None:
    """One line for a `REPLACED_TRAINER_FLAGS` flag given on the command line."""
    for token in argv:
        name = token.split("=", 1)[0][2:] if token.startswith("--") else None
        if name in REPLACED_TRAINER_FLAGS:
            raise ArgumentError(f"--{name} is not used by CCAFL training (each stage sets it); use "
                                f"{REPLACED_TRAINER_FLAGS[name]}")


def _check_epoch_windows(argv: list[str], args) -> None:
    """An epoch window given on the command line that lies past the end of the stage-2/3 loop is refused (a
    preset's window that a shorter loop leaves behind is only warned about, when the arguments are built)."""
    given = {token.split("=", 1)[0][2:] for token in argv if token.startswith("--")}
    for flag, message in epoch_window_problems(args).items():
        if flag in given and any(s in ("icdl", "ical") for s in args.stages):
            raise ArgumentError(message)


def _check_data_flags(argv: list[str], dataset: str, data_dir: str | None) -> None:
    """``--data_dir`` while the dataset is still the preset's synthetic one is almost always a missing
    ``--dataset``: refuse instead of generating the synthetic set inside the user's data folder."""
    if dataset == "synthetic" and data_dir is not None and _peek_option(argv, "dataset", "") != "synthetic":
        raise ArgumentError(
            f"--data_dir {data_dir} is given but the dataset is the preset's 'synthetic': pass --dataset "
            "(market1501, dukemtmc, msmt17, custom, hf) for your data, or --dataset synthetic to generate the "
            "synthetic set in that folder"
        )


#: list-valued flags that also take the comma-separated form of 0.1.0 (``--stages prompt,icdl``)
COMMA_LIST_FLAGS = ("stages", "lr_decay_epochs")


def _split_comma_lists(argv: list[str]) -> list[str]:
    """``--stages prompt,icdl`` / ``--stages=prompt,icdl`` -> ``--stages prompt icdl`` (same for every
    `COMMA_LIST_FLAGS` flag); other tokens unchanged."""
    out: list[str] = []
    in_list = False
    for token in argv:
        name, eq, value = token.partition("=")
        if token.startswith("--") and name[2:] in COMMA_LIST_FLAGS:
            out.append(name)
            in_list = True
            token = value if eq else None
        elif token.startswith("--"):
            in_list = False
        if token is None:
            continue
        out.extend([item for item in token.split(",") if item] if in_list else [token])
    return out


def parse_train_args(argv: list[str] | None = None):
    """Parse ``train.py`` arguments: preset values become defaults, explicit flags override them."""
    return _parse_train_command(argv)[:3]


def _parse_train_command(argv: list[str] | None = None):
    """``(model_args, data_args, training_args, process_options)`` of a ``train.py`` command line; the process
    options (``print_settings``, ``num_threads``) are not settings of the run."""
    from ..pipeline import DataArguments, ModelArguments
    from ..trainers.arguments import CCAFLTrainingArguments

    argv = _split_comma_lists(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser((ModelArguments, DataArguments, CCAFLTrainingArguments))
    parser.add_argument("--print_settings", action="store_true",
                        help="Print every resolved setting (preset + flags) as JSON and exit without training.")
    parser.add_argument("--num_threads", "--torch_num_threads", type=int, default=None,
                        help="CPU threads of torch in this process (a machine setting, not a hyper-parameter: not "
                             "in the run's settings). Default: torch's own, i.e. OMP_NUM_THREADS, which `accelerate "
                             "launch` sets to 1 unless given --num_cpu_threads_per_process. On a small shared CPU, 1 "
                             "avoids the stalls of threads spin-waiting for a core another job holds.")
    parser.error = _raise_usage_error  # a bad flag or value: one line (train_main), not argparse's usage block
    for action in parser._actions:
        if action.dest in REPLACED_TRAINER_FLAGS:
            action.help = argparse.SUPPRESS  # refused by _check_replaced_flags: not shown as something to set
    preset_name = _peek_option(argv, "preset", "demo")
    preset = load_preset(preset_name)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(preset) - known)
    if unknown:
        raise PresetError(f"preset {preset_name!r} sets unknown argument(s): {', '.join(unknown)}")
    parser.set_defaults(**preset)
    _check_replaced_flags(argv)
    model_args, data_args, training_args, extra = parser.parse_args_into_dataclasses(args=argv)
    _check_data_flags(argv, data_args.dataset, data_args.data_dir)
    _check_epoch_windows(argv, training_args)
    extra.requested_mixed_precision = _peek_option(argv, "mixed_precision", str(preset.get("mixed_precision", "no")))
    if extra.num_threads is not None and extra.num_threads < 1:
        raise ArgumentError(f"--num_threads must be an integer >= 1, got {extra.num_threads}")
    return model_args, data_args, training_args, extra


def _raise_usage_error(message: str):
    raise ArgumentError(message)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def train_main(argv: list[str] | None = None) -> int:
    """``accelerate launch scripts/train.py [flags]``: all three stages on the chosen data."""
    from ..pipeline import run_training
    from ..pipeline.manifest import describe_write_error

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        model_args, data_args, training_args, options = _parse_train_command(argv)
    except (CCAFLError, ValueError) as error:  # bad flag values (also transformers' own), presets, validation
        if int(os.environ.get("RANK", "0")) == 0:  # `accelerate launch`: every process parses the same flags
            print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    if options.print_settings:
        from ..data.samplers import describe_pk_batch
        from ..pipeline import resolved_settings

        if int(os.environ.get("RANK", "0")) != 0:  # `accelerate launch`: one copy, from the main process
            return 0
        print(json.dumps(resolved_settings(model_args, data_args, training_args), indent=2))
        batch = describe_pk_batch(training_args.num_identities_per_batch, training_args.num_instances,
                                  int(os.environ.get("WORLD_SIZE", "1")), training_args.scale_batch_with_processes)
        print(f"note: {batch}", file=sys.stderr)
        if options.requested_mixed_precision == "auto":
            print(f"note: mixed_precision 'auto' resolved to {training_args.mixed_precision!r} on this machine "
                  "(bf16 on a GPU that supports it, else fp16 with a loss scaler; no mixed precision on a CPU)",
                  file=sys.stderr)
        return 0
    threads = torch.get_num_threads()
    if options.num_threads is not None:
        torch.set_num_threads(options.num_threads)
    try:
        results = run_training(model_args, data_args, training_args)
    except (CCAFLError, OSError, RuntimeError) as error:
        # a RuntimeError is reported here only when it is a failed write (torch.save on a full disk)
        line = describe_write_error(error, training_args.output_dir)
        if line is None and isinstance(error, RuntimeError):
            raise
        print(f"error: {_one_line(line or error)}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # the caller's own count (train_main may run inside another program)
    from ..utils.processes import close_process_group

    if training_args.process_index == 0 and results.get("already_finished"):
        print(f"\nnothing trained: this run already finished in {training_args.output_dir} with the same settings "
              f"(final mAP {100 * results.get('mAP', 0.0):.1f}%, all stages in eval_results.json); pass "
              "--overwrite_output_dir to train it again")
    elif training_args.process_index == 0:
        print("\nCCAFL results (query/gallery, Market-1501 protocol):")
        print(metrics_table(results["stages"], label="stage"))
        print(f"\nmodel, card and eval_results.json written to {training_args.output_dir}")
    close_process_group()  # under accelerate launch: every rank ends together (see close_process_group)
    return 0


__all__ = ["REPLACED_TRAINER_FLAGS", "available_presets", "load_preset", "parse_train_args", "train_main"]
