"""Command lines: argument parsing and printing live here, the work in the library.

* `evaluate` - ``ccafl-evaluate`` (scripts/evaluate.py);
* `retrieval` - ``ccafl-retrieval`` (scripts/retrieval.py: ``embed``, ``index``, ``search``, ``export-onnx``);
* `options` - the flags, loaders and error report both share.
"""

from .evaluate import build_evaluate_parser, evaluate_main
from .retrieval import build_retrieval_parser, retrieval_main

__all__ = ["build_evaluate_parser", "build_retrieval_parser", "evaluate_main", "retrieval_main"]
