"""``ccafl-retrieval link``: the tracks of several cameras (MOTChallenge layout) linked into global ids."""

from __future__ import annotations

import argparse
import math

from .options import add_extraction_args, add_faiss_device, add_model_args, extraction_kwargs, faiss_use_gpu


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_link_parser(sub) -> None:
    """The ``link`` subcommand's flags on the subparsers ``sub``."""
    link = sub.add_parser("link", help="Link the tracks of several cameras (MOTChallenge layout) into global ids.")
    add_model_args(link)
    link.add_argument("--data_dir", required=True,
                      help="Folder of camera folders: <camera>/img1/000001.jpg and <camera>/gt/gt.txt (or --dataset_options "
                           "'{\"tracks\": \"det/tracks.txt\"}' for a tracker's output).")
    link.add_argument("--dataset_options", default="{}",
                      help="JSON dict of the mot reader's options: tracks, crops_per_track, min_height, min_visibility, "
                           "classes, global_ids, global_id_column, crops_dir.")
    link.add_argument("--output", required=True,
                      help="Folder for <camera>.txt (the input's lines, global id in the id column) and links.json.")
    knob = link.add_mutually_exclusive_group()
    knob.add_argument("--rate", type=_non_negative_float, default=None,
                      help="Walk the rate x tracks closest cross-camera pairs (ICAL's association rate; default 1.0).")
    knob.add_argument("--threshold", type=_non_negative_float, default=None,
                      help="Walk every cross-camera pair within this squared distance (2 - 2 cos for unit features).")
    link.add_argument("--camera_centering", action="store_true",
                      help="Subtract each camera's mean tracklet feature before linking.")
    link.add_argument("--overwrite", action="store_true", help="Replace link files already in --output.")
    add_extraction_args(link)
    add_faiss_device(link)


def link_command(args: argparse.Namespace) -> int:
    """Read and check the tracks (crops cut or reused), then load the model, link, write, report."""
    from ..data.mot import MOTOptions, read_mot_scene
    from ..retrieval.tracking import link_mot_scene, link_output_files
    from .options import dataset_options_from_args, load_model_from_args

    scene = read_mot_scene(args.data_dir, MOTOptions.from_options(**dataset_options_from_args(args)))
    existing = [p for p in link_output_files(scene, args.output) if p.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"--output {args.output}: {existing[0]} already exists; pass --overwrite to replace it")
    model, image_processor = load_model_from_args(args)
    report = link_mot_scene(model, scene, args.output, image_processor, threshold=args.threshold, rate=args.rate,
                            camera_centering=args.camera_centering, use_gpu=faiss_use_gpu(args),
                            **extraction_kwargs(args))
    num_tracks = len(report["tracklets"])
    print(f"{num_tracks} tracks of {len(scene.cameras)} cameras -> {report['num_global_ids']} global ids "
          f"({len(report['links'])} links) written to {args.output}")
    metrics = report.get("metrics")
    if metrics:
        print(f"links against the given global ids ({metrics['num_tracklets']} tracks, {metrics['num_identities']} "
              f"people): precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f}  F1 {metrics['f1']:.4f}")
    return 0


__all__ = ["add_link_parser", "link_command"]
