"""``ccafl-evaluate`` (scripts/evaluate.py): metrics of a saved model on a dataset's query/gallery splits.

Returns an exit code; a bad input (missing model folder, unknown dataset, malformed file) is reported
as one ``error: ...`` line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .options import (
    ArgumentParser,
    add_dataset_args,
    add_extraction_args,
    add_model_args,
    extraction_options,
    fail,
    load_dataset_from_args,
    load_model_from_args,
    metrics_table,
    positive_int,
    setup_logging,
)


def build_evaluate_parser() -> argparse.ArgumentParser:
    """Arguments of ``scripts/evaluate.py`` / ``ccafl-evaluate``."""
    parser = ArgumentParser(
        prog="ccafl-evaluate",
        description="Evaluate a trained CCAFL model on a ReID query/gallery split (Market-1501 protocol); "
                    "any dataset, so cross-dataset evaluation is one flag away.",
    )
    add_model_args(parser)
    add_dataset_args(parser, required=True)
    add_extraction_args(parser)
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking.")
    parser.add_argument("--output", default=None, help="Write the metrics and settings to this JSON file.")
    parser.add_argument("--save_features", default=None,
                        help="Folder for query.safetensors and gallery.safetensors (usable by `ccafl-retrieval search`).")
    parser.add_argument("--save_ranked_lists", default=None,
                        help="Folder for worst.png / best.png ranked lists (by AP) and ranked_lists.json.")
    parser.add_argument("--num_lists", type=positive_int, default=10, help="Queries in each of worst.png and best.png.")
    parser.add_argument("--topk", type=positive_int, default=10, help="Gallery images shown per query.")
    return parser


def format_metrics(metrics: dict) -> str:
    """Two lines: the names of `METRIC_KEYS` and their values in percent."""
    return metrics_table({"": metrics})


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/evaluate.py``: metrics of a saved model on a dataset's query/gallery splits."""
    args = build_evaluate_parser().parse_args(argv)
    setup_logging()
    if args.num_lists < 1 or args.topk < 1:
        return fail(ValueError(f"--num_lists and --topk must be >= 1, got {args.num_lists} and {args.topk}"))
    try:
        return _evaluate(args)
    except (ValueError, OSError) as error:  # RetrievalError, ReIDDatasetError, bad values: messages name them
        return fail(error)


def _evaluate(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..data import ReIDCollator
    from ..data.datasets.base import get_reader
    from ..evaluation import compute_reid_metrics, extract_features
    from ..retrieval import FeatureSet, eval_transform_for

    get_reader(args.dataset)  # an unknown name fails here, before the model is loaded
    model, image_processor = load_model_from_args(args)
    dataset = load_dataset_from_args(args)
    collate = ReIDCollator(eval_transform_for(model, image_processor))
    options = extraction_options(args)
    query = extract_features(model, dataset["query"], collate, options, desc="Query features")
    gallery = extract_features(model, dataset["gallery"], collate, options, desc="Gallery features")
    metrics = compute_reid_metrics(
        query.reid_features, gallery.reid_features, query.labels["pids"], gallery.labels["pids"],
        query.labels["camids"], gallery.labels["camids"], rerank=args.rerank,
    )
    if not PartialState().is_main_process:
        return 0
    settings = {"model": args.model, "dataset": args.dataset, "data_dir": args.data_dir,
                "dataset_options": json.loads(args.dataset_options or "{}"), "rerank": args.rerank,
                "flip": args.flip, "mixed_precision": options.mixed_precision or "no",
                "num_query": len(dataset["query"]), "num_gallery": len(dataset["gallery"])}
    print(f"\n{args.dataset} query/gallery ({settings['num_query']}/{settings['num_gallery']} images), "
          f"model {args.model}{', re-ranked' if args.rerank else ''}:")
    print(format_metrics(metrics))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**metrics, "settings": settings}, indent=2))
        print(f"metrics written to {out}")
    query_paths, gallery_paths = dataset["query"]["image_path"][:], dataset["gallery"]["image_path"][:]
    if args.save_features:
        for name, extracted in (("query", query), ("gallery", gallery)):
            feature_set = FeatureSet.for_split(
                extracted.reid_features, dataset[name], camids=extracted.labels["camids"],
                pids=extracted.labels["pids"],
                metadata={"model": args.model, "dataset": args.dataset, "split": name,
                          "flip": str(args.flip).lower(), "mixed_precision": settings["mixed_precision"]},
            )
            print(f"{name} features written to {feature_set.save(Path(args.save_features) / f'{name}.safetensors')}")
    if args.save_ranked_lists:
        from ..evaluation import rank_gallery, save_worst_and_best, split_image_sources

        ranking = rank_gallery(query.reid_features, gallery.reid_features, query.labels["pids"],
                               gallery.labels["pids"], query.labels["camids"], gallery.labels["camids"], k=args.topk)
        written = save_worst_and_best(args.save_ranked_lists, ranking, query_paths, gallery_paths, args.num_lists,
                                      query_images=split_image_sources(dataset["query"]),
                                      gallery_images=split_image_sources(dataset["gallery"]))
        if args.rerank:
            print("note: the ranked lists are ranked by cosine similarity (without re-ranking)")
        print("ranked lists written: " + ", ".join(str(p) for p in written.values()))
    return 0


__all__ = ["build_evaluate_parser", "evaluate_main", "format_metrics"]
