"""Command lines: argument parsing and printing live here, the work in the library.

* `train` - ``ccafl-train`` (scripts/train.py: presets + flags, ``--print_settings``);
* `evaluate` - ``ccafl-evaluate`` (scripts/evaluate.py);
* `retrieval` - ``ccafl-retrieval`` (scripts/retrieval.py: ``embed``, ``index``, ``search``, ``export-onnx``);
* `options` - the flags, loaders and error report both share.
"""

from .evaluate import build_evaluate_parser, evaluate_main
from .retrieval import build_retrieval_parser, retrieval_main
from .train import available_presets, load_preset, parse_train_args, train_main

__all__ = [
    "available_presets",
    "build_evaluate_parser",
    "build_retrieval_parser",
    "evaluate_main",
    "load_preset",
    "parse_train_args",
    "retrieval_main",
    "train_main",
]
