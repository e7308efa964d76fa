"""``ccafl-retrieval`` (scripts/retrieval.py): ``embed``, ``index``, ``search``, ``export-onnx`` and ``link``.

Returns an exit code; a bad input (missing model folder, unknown dataset, malformed file) is reported
as one ``error: ...`` line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .link import add_link_parser, link_command
from .options import (
    ArgumentParser,
    add_extraction_args,
    add_faiss_device,
    add_model_args,
    count_int,
    extraction_kwargs,
    fail,
    faiss_use_gpu,
    load_dataset_from_args,
    load_model_from_args,
    positive_int,
    setup_logging,
)


def build_retrieval_parser() -> argparse.ArgumentParser:
    """Arguments of ``scripts/retrieval.py`` / ``ccafl-retrieval`` and its subcommands."""
    parser = ArgumentParser(prog="ccafl-retrieval", description="Embed, index and search image galleries.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{embed,index,search,export-onnx,link}")

    embed = sub.add_parser("embed", help="Embed a folder of images or a dataset split into a features file.")
    add_model_args(embed)
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="Folder of images (searched recursively, sorted).")
    source.add_argument("--dataset", help="A ReID dataset name (with --data_dir, --split).")
    embed.add_argument("--data_dir", default=None, help="Dataset folder (with --dataset).")
    embed.add_argument("--dataset_options", default="{}", help="JSON dict of reader options (with --dataset).")
    embed.add_argument("--split", default="gallery", help="Dataset split to embed: query, gallery or train.")
    embed.add_argument("--output", required=True, help="Features file to write (.safetensors).")
    add_extraction_args(embed)

    index = sub.add_parser("index", help="Build a faiss index over a features file.")
    index.add_argument("--features", required=True, help="Gallery features file (from `embed`).")
    index.add_argument("--output", required=True, help="Index file to write (.faiss).")
    index.add_argument("--kind", choices=("flat", "ivf"), default="flat",
                       help="flat: exact inner product; ivf: inverted lists for very large galleries.")
    index.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default ~4*sqrt(N)).")
    index.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists visited per query (default nlist/8).")
    index.add_argument("--recall_k", type=positive_int, default=10, help="k of the recall@k measured for an IVF index.")
    index.add_argument("--recall_queries", type=positive_int, default=1000, help="Gallery vectors used as recall queries.")
    add_faiss_device(index)

    search = sub.add_parser("search", help="Search queries against a gallery; print/write the top-k.")
    search.add_argument("--gallery", required=True, help="Gallery features file (from `embed`).")
    search.add_argument("--index", default=None, help="Index file (from `index`); default: exact search.")
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument("--queries", help="Query features file (from `embed`).")
    queries.add_argument("--query_images", help="Folder of query images (embedded with --model).")
    add_model_args(search, required=False)
    add_extraction_args(search)
    search.add_argument("--k", type=positive_int, default=10, help="Matches per query.")
    search.add_argument("--output", default=None, help="Write every query's matches to this JSON file.")
    search.add_argument("--num_print", type=count_int, default=5, help="Queries whose matches are printed.")
    search.add_argument("--save_ranked_lists", default=None, help="Folder for search.png, the first queries' ranked lists.")
    search.add_argument("--num_lists", type=positive_int, default=10, help="Queries drawn in search.png.")
    add_faiss_device(search)

    export = sub.add_parser("export-onnx", help="Export the image tower (pixels -> retrieval features) to ONNX.")
    add_model_args(export)
    export.add_argument("--output", required=True, help="ONNX file to write.")
    export.add_argument("--opset", type=positive_int, default=17, help="ONNX opset version.")
    export.add_argument("--no_verify", action="store_true", help="Skip the onnxruntime parity check.")
    add_link_parser(sub)
    return parser


def retrieval_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/retrieval.py {embed,index,search,export-onnx,link}``."""
    args = build_retrieval_parser().parse_args(argv)
    setup_logging()
    commands = {"embed": _embed, "index": _index, "search": _search, "export-onnx": _export_onnx, "link": link_command}
    try:
        return commands[args.command](args)
    except (ValueError, OSError) as error:  # RetrievalError, ReIDDatasetError, bad values: messages name them
        return fail(error)


def _embed(args: argparse.Namespace) -> int:
    from ..retrieval import embed_folder, embed_split, list_images

    kwargs = extraction_kwargs(args)
    if args.images:
        list_images(args.images)  # a missing or empty folder: one line before the model is loaded
        model, image_processor = load_model_from_args(args)
        features = embed_folder(model, args.images, image_processor, metadata={"source": args.images}, **kwargs)
    else:
        dataset = load_dataset_from_args(args)
        if args.split not in dataset:
            raise ValueError(f"--split {args.split}: not a split of {args.dataset} (has {', '.join(dataset)})")
        model, image_processor = load_model_from_args(args)
        features = embed_split(model, dataset[args.split], image_processor,
                               metadata={"dataset": args.dataset, "split": args.split}, **kwargs)
    features.metadata["model"] = args.model
    path = features.save(args.output)
    print(f"{len(features)} images embedded ({features.dim}-d) -> {path}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from ..retrieval import FeatureSet, build_index, index_recall, save_index

    gallery = FeatureSet.load(args.features)
    index = build_index(gallery, args.kind, nlist=args.nlist, nprobe=args.nprobe, use_gpu=faiss_use_gpu(args))
    path = save_index(index, args.output)
    print(f"{args.kind} index over {index.ntotal} vectors ({index.d}-d) -> {path}")
    if args.kind == "ivf":
        recall = index_recall(index, gallery, k=args.recall_k, num_queries=args.recall_queries)
        print(f"recall@{args.recall_k} against exact search: {recall:.4f} "
              f"({min(args.recall_queries, len(gallery))} gallery vectors as queries)")
    return 0


def _search(args: argparse.Namespace) -> int:
    from ..retrieval import FeatureSet, build_index, embed_folder, list_images, load_index, search_gallery

    gallery = FeatureSet.load(args.gallery)
    if args.queries:
        queries = FeatureSet.load(args.queries)
    else:
        if not args.model:
            raise ValueError("--query_images needs --model to embed the images")
        list_images(args.query_images)  # before the model is loaded
        model, image_processor = load_model_from_args(args)
        queries = embed_folder(model, args.query_images, image_processor, **extraction_kwargs(args))
    if queries.dim != gallery.dim:
        raise ValueError(f"query features are {queries.dim}-d but the gallery's are {gallery.dim}-d; "
                         "embed both with the same model")
    index = load_index(args.index, faiss_use_gpu(args)) if args.index else build_index(gallery, use_gpu=faiss_use_gpu(args))
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
        from ..evaluation import RankedRow, save_ranked_list

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
    from ..retrieval import export_onnx, onnxruntime_available, require_onnx, verify_onnx

    try:
        require_onnx()  # before loading anything
    except ImportError as error:
        return fail(error)
    model, image_processor = load_model_from_args(args)
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


__all__ = ["build_retrieval_parser", "retrieval_main"]
