"""What the ``evaluate`` and ``retrieval`` command lines share: their flags, loading the model and
dataset they name, logging, and the one-line error report (exit code 2)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

logger = logging.getLogger("ccafl_hf")

#: Exit code of a bad input (missing model folder, unknown dataset, malformed file).
USER_ERROR = 2


def setup_logging() -> None:
    """INFO logging for the package; the libraries' chatter at WARNING."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "huggingface_hub", "datasets", "filelock", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(error: BaseException) -> int:
    """Print ``error`` as one ``error: ...`` line on stderr; returns `USER_ERROR`."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR


class ArgumentParser(argparse.ArgumentParser):
    """Shows every flag's default in ``--help``; a bad flag or value is one ``error:`` line, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(USER_ERROR)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def count_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model`` and ``--trust_remote_code``."""
    parser.add_argument("--model", required=required, help="Saved CCAFL model folder (e.g. outputs/ccafl-demo) or Hub id.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Load the model's own code from its folder (needed only where ccafl_hf is not installed).")


def add_extraction_args(parser: argparse.ArgumentParser) -> None:
    """Feature-extraction flags: batch size, workers, mixed precision, flip, progress bar."""
    parser.add_argument("--batch_size", type=positive_int, default=128, help="Images per forward pass.")
    parser.add_argument("--num_workers", type=count_int, default=0, help="DataLoader worker processes.")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 autocast.")
    precision.add_argument("--fp16", action="store_true", help="float16 autocast (bfloat16 on CPU).")
    parser.add_argument("--flip", action="store_true", help="Average each feature with its horizontal flip.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")


def add_dataset_args(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--dataset``, ``--data_dir`` and ``--dataset_options``."""
    parser.add_argument("--dataset", required=required,
                        help="A ccafl_hf.data.available_datasets() reader, e.g. market1501, custom, synthetic "
                             "or hf (🤗 datasets: see --data_dir).")
    parser.add_argument("--data_dir", default=None,
                        help="Dataset folder or file (optional for synthetic); for hf a Hub dataset id, "
                             "save_to_disk folder or parquet.")
    parser.add_argument("--dataset_options", default="{}", help="JSON dict of reader options.")


def extraction_options(args: argparse.Namespace):
    """The `ExtractionOptions` of the extraction flags."""
    from ..evaluation import ExtractionOptions
    from ..utils.precision import resolve_mixed_precision

    return ExtractionOptions(batch_size=args.batch_size, num_workers=args.num_workers, flip=args.flip,
                             mixed_precision=resolve_mixed_precision(bf16=args.bf16, fp16=args.fp16),
                             progress=not args.no_progress)


def extraction_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The extraction flags as keyword arguments (`embed_images`, `embed_folder`)."""
    import dataclasses

    return dataclasses.asdict(extraction_options(args))


def metrics_table(rows: dict[str, dict[str, float]], label: str | None = None) -> str:
    """The one metrics table of the commands: a header of `METRIC_KEYS`, then one line per non-empty row
    (fractions shown in percent); with ``label``, a first column headed ``label`` holds the row names."""
    from ..evaluation import METRIC_KEYS

    def line(name: str, cells: str) -> str:
        return (f"{name:<10}" if label is not None else "") + cells

    lines = [line(label or "", "".join(f"{k:>9}" for k in METRIC_KEYS))]
    lines += [line(name, "".join(f"{100 * metrics[k]:>8.1f}%" for k in METRIC_KEYS))
              for name, metrics in rows.items() if metrics]
    return "\n".join(lines)


def load_dataset_from_args(args: argparse.Namespace):
    """The `load_reid_dataset` splits that ``--dataset/--data_dir/--dataset_options`` name."""
    from ..data import load_reid_dataset

    return load_reid_dataset(args.dataset, args.data_dir, **dataset_options_from_args(args))


def dataset_options_from_args(args: argparse.Namespace) -> dict:
    """``--dataset_options`` as a dict (one-line ``ValueError`` unless it is a JSON object)."""
    try:
        options = json.loads(args.dataset_options or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"--dataset_options must be a JSON object: {error}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--dataset_options must be a JSON object, got {args.dataset_options!r}")
    return options


def load_model_from_args(args: argparse.Namespace):
    """``(model, image_processor)`` of ``--model`` on this process's device (`load_reid_model`)."""
    from accelerate import PartialState

    from ..retrieval import load_reid_model
    from ..utils.model_files import load_checked

    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # a corrupt or cut-off safetensors file, a config value of the wrong type, pickle-only weights: one line
    return load_checked(args.model, lambda: load_reid_model(args.model, PartialState().device,
                                                            trust_remote_code=args.trust_remote_code))


def add_faiss_device(parser: argparse.ArgumentParser) -> None:
    """``--faiss_device {auto,cpu,gpu}``."""
    parser.add_argument("--faiss_device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="Where faiss searches (auto: a GPU when faiss-gpu sees one).")


def faiss_use_gpu(args: argparse.Namespace) -> bool | None:
    """``use_gpu`` of the faiss functions from ``--faiss_device`` (``None``: a GPU when available)."""
    return {"auto": None, "cpu": False, "gpu": True}[args.faiss_device]


__all__ = [
    "ArgumentParser",
    "count_int",
    "positive_int",
    "USER_ERROR",
    "add_dataset_args",
    "add_extraction_args",
    "add_faiss_device",
    "add_model_args",
    "extraction_kwargs",
    "extraction_options",
    "fail",
    "faiss_use_gpu",
    "load_dataset_from_args",
    "load_model_from_args",
    "metrics_table",
    "setup_logging",
]
