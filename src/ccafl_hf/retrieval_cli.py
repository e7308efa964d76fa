"""Command lines for using a trained model: ``ccafl-evaluate`` (scripts/evaluate.py) and
``ccafl-retrieval`` (scripts/retrieval.py: ``embed``, ``index``, ``search``, ``export-onnx``).

Both return an exit code; a bad input (missing model folder, unknown dataset, malformed file) is
reported as one ``error: ...`` line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("ccafl_hf")

USER_ERROR = 2


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "huggingface_hub", "datasets", "filelock", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(error: BaseException) -> int:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR


class _Parser(argparse.ArgumentParser):
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


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="Saved CCAFL model folder (e.g. outputs/ccafl-demo) or Hub id.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Load the model's own code from its folder (needed only where ccafl_hf is not installed).")


def _add_extraction_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=_positive, default=128, help="Images per forward pass.")
    parser.add_argument("--num_workers", type=_count, default=0, help="DataLoader worker processes.")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 autocast.")
    precision.add_argument("--fp16", action="store_true", help="float16 autocast (bfloat16 on CPU).")
    parser.add_argument("--flip", action="store_true", help="Average each feature with its horizontal flip.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")


def _add_dataset_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--dataset", required=required,
                        help="A ccafl_hf.data.available_datasets() reader, e.g. market1501, custom, synthetic "
                             "or hf (🤗 datasets: see --data_dir).")
    parser.add_argument("--data_dir", default=None,
                        help="Dataset folder or file (optional for synthetic); for hf a Hub dataset id, "
                             "save_to_disk folder or parquet.")
    parser.add_argument("--dataset_options", default="{}", help="JSON dict of reader options.")


def _extraction_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(batch_size=args.batch_size, num_workers=args.num_workers, flip=args.flip,
                mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else None,
                progress=not args.no_progress)


def _load_dataset(args: argparse.Namespace):
    from .data import load_reid_dataset

    try:
        options = json.loads(args.dataset_options or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"--dataset_options must be a JSON object: {error}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--dataset_options must be a JSON object, got {args.dataset_options!r}")
    return load_reid_dataset(args.dataset, args.data_dir, **options)


def _load_model(args: argparse.Namespace):
    from accelerate import PartialState

    from .model_files import load_checked
    from .retrieval import load_reid_model

    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # a corrupt or cut-off safetensors file, a config value of the wrong type, pickle-only weights: one line
    return load_checked(args.model, lambda: load_reid_model(args.model, PartialState().device,
                                                            trust_remote_code=args.trust_remote_code))


# ----------------------------------------------------------------------------------------- evaluate
def build_evaluate_parser() -> argparse.ArgumentParser:
    """Arguments of ``scripts/evaluate.py`` / ``ccafl-evaluate``."""
    parser = _Parser(
        prog="ccafl-evaluate",
        description="Evaluate a trained CCAFL model on a ReID query/gallery split (Market-1501 protocol); "
                    "any dataset, so cross-dataset evaluation is one flag away.",
    )
    _add_model_args(parser)
    _add_dataset_args(parser, required=True)
    _add_extraction_args(parser)
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking.")
    parser.add_argument("--output", default=None, help="Write the metrics and settings to this JSON file.")
    parser.add_argument("--save_features", default=None,
                        help="Folder for query.safetensors and gallery.safetensors (usable by `ccafl-retrieval search`).")
    parser.add_argument("--save_ranked_lists", default=None,
                        help="Folder for worst.png / best.png ranked lists (by AP) and ranked_lists.json.")
    parser.add_argument("--num_lists", type=_positive, default=10, help="Queries in each of worst.png and best.png.")
    parser.add_argument("--topk", type=_positive, default=10, help="Gallery images shown per query.")
    return parser


def _format_metrics(metrics: dict) -> str:
    keys = ("mAP", "rank1", "rank5", "rank10", "mINP")
    head = "".join(f"{k:>9}" for k in keys)
    values = "".join(f"{100 * metrics[k]:>8.1f}%" for k in keys)
    return f"{head}\n{values}"


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/evaluate.py``: metrics of a saved model on a dataset's query/gallery splits."""
    args = build_evaluate_parser().parse_args(argv)
    _setup_logging()
    if args.num_lists < 1 or args.topk < 1:
        return _fail(ValueError(f"--num_lists and --topk must be >= 1, got {args.num_lists} and {args.topk}"))
    try:
        return _evaluate(args)
    except (ValueError, OSError) as error:  # RetrievalError, ReIDDatasetError, bad values: messages name them
        return _fail(error)


def _evaluate(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from .data import ReIDCollator
    from .data.datasets.base import get_reader
    from .evaluation import compute_reid_metrics
    from .inference import extract_features
    from .retrieval import FeatureSet, eval_transform_for

    get_reader(args.dataset)  # an unknown name fails here, before the model is loaded
    model, image_processor = _load_model(args)
    dataset = _load_dataset(args)
    collate = ReIDCollator(eval_transform_for(model, image_processor))
    common = _extraction_kwargs(args)
    query = extract_features(model, dataset["query"], collate, desc="Query features", **common)
    gallery = extract_features(model, dataset["gallery"], collate, desc="Gallery features", **common)
    metrics = compute_reid_metrics(
        query.reid_features, gallery.reid_features, query.labels["pids"], gallery.labels["pids"],
        query.labels["camids"], gallery.labels["camids"], rerank=args.rerank,
    )
    if not PartialState().is_main_process:
        return 0
    settings = {"model": args.model, "dataset": args.dataset, "data_dir": args.data_dir,
                "dataset_options": json.loads(args.dataset_options or "{}"), "rerank": args.rerank,
                "flip": args.flip, "mixed_precision": common["mixed_precision"] or "no",
                "num_query": len(dataset["query"]), "num_gallery": len(dataset["gallery"])}
    print(f"\n{args.dataset} query/gallery ({settings['num_query']}/{settings['num_gallery']} images), "
          f"model {args.model}{', re-ranked' if args.rerank else ''}:")
    print(_format_metrics(metrics))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**metrics, "settings": settings}, indent=2))
        print(f"metrics written to {out}")
    query_paths, gallery_paths = dataset["query"]["image_path"][:], dataset["gallery"]["image_path"][:]
    if args.save_features:
        for name, extracted, paths in (("query", query, query_paths), ("gallery", gallery, gallery_paths)):
            feature_set = FeatureSet.from_paths(
                extracted.reid_features, paths, camids=extracted.labels["camids"], pids=extracted.labels["pids"],
                metadata={"model": args.model, "dataset": args.dataset, "split": name,
                          "flip": str(args.flip).lower(), "mixed_precision": settings["mixed_precision"]},
            )
            print(f"{name} features written to {feature_set.save(Path(args.save_features) / f'{name}.safetensors')}")
    if args.save_ranked_lists:
        from .visualization import rank_gallery, save_worst_and_best

        ranking = rank_gallery(query.reid_features, gallery.reid_features, query.labels["pids"],
                               gallery.labels["pids"], query.labels["camids"], gallery.labels["camids"], k=args.topk)
        written = save_worst_and_best(args.save_ranked_lists, ranking, query_paths, gallery_paths, args.num_lists)
        if args.rerank:
            print("note: the ranked lists are ranked by cosine similarity (without re-ranking)")
        print("ranked lists written: " + ", ".join(str(p) for p in written.values()))
    return 0


# ---------------------------------------------------------------------------------------- retrieval
def build_retrieval_parser() -> argparse.ArgumentParser:
    """Arguments of ``scripts/retrieval.py`` / ``ccafl-retrieval`` and its subcommands."""
    parser = _Parser(prog="ccafl-retrieval", description="Embed, index and search image galleries.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{embed,index,search,export-onnx}")

    embed = sub.add_parser("embed", help="Embed a folder of images or a dataset split into a features file.")
    _add_model_args(embed)
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="Folder of images (searched recursively, sorted).")
    source.add_argument("--dataset", help="A ReID dataset name (with --data_dir, --split).")
    embed.add_argument("--data_dir", default=None, help="Dataset folder (with --dataset).")
    embed.add_argument("--dataset_options", default="{}", help="JSON dict of reader options (with --dataset).")
    embed.add_argument("--split", default="gallery", help="Dataset split to embed: query, gallery or train.")
    embed.add_argument("--output", required=True, help="Features file to write (.safetensors).")
    _add_extraction_args(embed)

    index = sub.add_parser("index", help="Build a faiss index over a features file.")
    index.add_argument("--features", required=True, help="Gallery features file (from `embed`).")
    index.add_argument("--output", required=True, help="Index file to write (.faiss).")
    index.add_argument("--kind", choices=("flat", "ivf"), default="flat",
                       help="flat: exact inner product; ivf: inverted lists for very large galleries.")
    index.add_argument("--nlist", type=_positive, default=None, help="IVF lists (default ~4*sqrt(N)).")
    index.add_argument("--nprobe", type=_positive, default=None, help="IVF lists visited per query (default nlist/8).")
    index.add_argument("--recall_k", type=_positive, default=10, help="k of the recall@k measured for an IVF index.")
    index.add_argument("--recall_queries", type=_positive, default=1000, help="Gallery vectors used as recall queries.")
    _add_faiss_device(index)

    search = sub.add_parser("search", help="Search queries against a gallery; print/write the top-k.")
    search.add_argument("--gallery", required=True, help="Gallery features file (from `embed`).")
    search.add_argument("--index", default=None, help="Index file (from `index`); default: exact search.")
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument("--queries", help="Query features file (from `embed`).")
    queries.add_argument("--query_images", help="Folder of query images (embedded with --model).")
    _add_model_args(search, required=False)
    _add_extraction_args(search)
    search.add_argument("--k", type=_positive, default=10, help="Matches per query.")
    search.add_argument("--output", default=None, help="Write every query's matches to this JSON file.")
    search.add_argument("--num_print", type=_count, default=5, help="Queries whose matches are printed.")
    search.add_argument("--save_ranked_lists", default=None, help="Folder for search.png, the first queries' ranked lists.")
    search.add_argument("--num_lists", type=_positive, default=10, help="Queries drawn in search.png.")
    _add_faiss_device(search)

    export = sub.add_parser("export-onnx", help="Export the image tower (pixels -> retrieval features) to ONNX.")
    _add_model_args(export)
    export.add_argument("--output", required=True, help="ONNX file to write.")
    export.add_argument("--opset", type=_positive, default=17, help="ONNX opset version.")
    export.add_argument("--no_verify", action="store_true", help="Skip the onnxruntime parity check.")
    return parser


def _add_faiss_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--faiss_device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="Where faiss searches (auto: a GPU when faiss-gpu sees one).")


def _use_gpu(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "cpu": False, "gpu": True}[args.faiss_device]


def retrieval_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/retrieval.py {embed,index,search,export-onnx}``."""
    args = build_retrieval_parser().parse_args(argv)
    _setup_logging()
    commands = {"embed": _embed, "index": _index, "search": _search, "export-onnx": _export_onnx}
    try:
        return commands[args.command](args)
    except (ValueError, OSError) as error:  # RetrievalError, ReIDDatasetError, bad values: messages name them
        return _fail(error)


def _embed(args: argparse.Namespace) -> int:
    from .retrieval import embed_folder, embed_split

    kwargs = _extraction_kwargs(args)
    if args.images:
        model, image_processor = _load_model(args)
        features = embed_folder(model, args.images, image_processor, metadata={"source": args.images}, **kwargs)
    else:
        dataset = _load_dataset(args)
        if args.split not in dataset:
            raise ValueError(f"--split {args.split}: not a split of {args.dataset} (has {', '.join(dataset)})")
        model, image_processor = _load_model(args)
        features = embed_split(model, dataset[args.split], image_processor,
                               metadata={"dataset": args.dataset, "split": args.split}, **kwargs)
    features.metadata["model"] = args.model
    path = features.save(args.output)
    print(f"{len(features)} images embedded ({features.dim}-d) -> {path}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from .retrieval import FeatureSet, build_index, index_recall, save_index

    gallery = FeatureSet.load(args.features)
    index = build_index(gallery, args.kind, nlist=args.nlist, nprobe=args.nprobe, use_gpu=_use_gpu(args))
    path = save_index(index, args.output)
    print(f"{args.kind} index over {index.ntotal} vectors ({index.d}-d) -> {path}")
    if args.kind == "ivf":
        recall = index_recall(index, gallery, k=args.recall_k, num_queries=args.recall_queries)
        print(f"recall@{args.recall_k} against exact search: {recall:.4f} "
              f"({min(args.recall_queries, len(gallery))} gallery vectors as queries)")
    return 0


def _search(args: argparse.Namespace) -> int:
    from .retrieval import FeatureSet, build_index, embed_folder, load_index, search_gallery

    gallery = FeatureSet.load(args.gallery)
    if args.queries:
        queries = FeatureSet.load(args.queries)
    else:
        if not args.model:
            raise ValueError("--query_images needs --model to embed the images")
        model, image_processor = _load_model(args)
        queries = embed_folder(model, args.query_images, image_processor, **_extraction_kwargs(args))
    if queries.dim != gallery.dim:
        raise ValueError(f"query features are {queries.dim}-d but the gallery's are {gallery.dim}-d; "
                         "embed both with the same model")
    index = load_index(args.index, _use_gpu(args)) if args.index else build_index(gallery, use_gpu=_use_gpu(args))
    results = search_gallery(index, gallery, queries, k=args.k)
    for result in results[: max(args.num_print, 0)]:
        print(f"{result.query}:")
        for rank, match in enumerate(result.matches, start=1):
            print(f"  {rank:>3}  {match.score:.4f}  {match.path}")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.to_dict() for r in results], indent=2))
        print(f"{len(results)} queries' top-{args.k} written to {out}")
    if args.save_ranked_lists:
        from .visualization import RankedRow, save_ranked_list

        known = queries.pids is not None and gallery.pids is not None
        rows = [
            RankedRow(r.query, [m.path for m in r.matches], [m.score for m in r.matches],
                      [m.pid == r.pid for m in r.matches] if known else None,
                      f"id {r.pid}" if r.pid is not None else "query")
            for r in results[: args.num_lists]
        ]
        path = save_ranked_list(Path(args.save_ranked_lists) / "search.png", rows, num_matches=args.k)
        print(f"ranked lists written to {path}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx, onnxruntime_available, require_onnx, verify_onnx

    try:
        require_onnx()  # before loading anything
    except ImportError as error:
        return _fail(error)
    model, image_processor = _load_model(args)
    path = export_onnx(model, args.output, opset=args.opset, image_processor=image_processor)
    print(f"image tower exported to {path}")
    if args.no_verify:
        return 0
    if not onnxruntime_available():
        print("parity not checked: onnxruntime is not installed (pip install onnxruntime)")
        return 0
    difference = verify_onnx(model, path)
    print(f"onnxruntime parity: max |difference| = {difference:.2e} (tolerance 1e-4)")
    return 0


__all__ = ["build_evaluate_parser", "build_retrieval_parser", "evaluate_main", "retrieval_main"]
