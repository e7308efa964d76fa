"""Benchmark of using a trained model (issue 9 targets).

(a) Feature extraction throughput (images/s) through `ccafl_hf.evaluation.extract_features` for the
    tiny demo model and the ViT-B/16 architecture (random init from a config, no download), fp32
    versus bf16 autocast, reported as a ratio. Inputs are preprocessed tensors in memory, so the
    figure is the model's; for the tiny model the end-to-end rate from JPEG files (decode + resize +
    normalise, `embed_images`) is reported too.
(b) Exact search latency for 1 and 1,000 queries against N = 100,000 random 512-d gallery
    vectors (flat inner-product index): `ccafl_hf.retrieval.search` and `search_gallery` (paths,
    scores, match objects) against the bare `index.search` on the same index, medians of repeats.

Usage: ``PYTHONPATH=src python benchmarks/retrieval.py [--quick] [--device cpu] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from ccafl_hf import CCAFLConfig, CCAFLModel, create_tiny_model
from ccafl_hf.evaluation import extract_features
from ccafl_hf.retrieval import FeatureSet, build_index, embed_images, search, search_gallery


def vit_b16_model() -> CCAFLModel:
    """The ViT-B/16 CCAFL architecture at 256x128 with random weights (default CLIP text config)."""
    config = CCAFLConfig(
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
                           intermediate_size=3072),
        projection_dim=512, image_size=(256, 128),
    )
    torch.manual_seed(0)
    return CCAFLModel(config).eval()


def stack_collate(rows: list[dict]) -> dict:
    return {"pixel_values": torch.stack([row["pixel_values"] for row in rows])}


def throughput(model: CCAFLModel, num_images: int, batch_size: int, mixed_precision: str | None) -> float:
    """Images/s of `extract_features` over ``num_images`` preprocessed inputs (one warm-up batch first)."""
    height, width = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.randn(3, height, width, generator=generator)} for _ in range(num_images)]
    extract_features(model, rows[:batch_size], stack_collate, batch_size=batch_size, mixed_precision=mixed_precision,
                     progress=False)
    start = time.perf_counter()
    extract_features(model, rows, stack_collate, batch_size=batch_size, mixed_precision=mixed_precision,
                     progress=False)
    return num_images / (time.perf_counter() - start)


def files_throughput(model, processor, num_images: int, batch_size: int) -> float:
    """Images/s of `embed_images` from JPEG files on disk (128x64 pictures), fp32."""
    from PIL import Image

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(num_images):
            path = f"{folder}/{i:05d}.jpg"
            Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(path)
        embed_images(model, paths[:batch_size], processor, batch_size=batch_size, progress=False)
        start = time.perf_counter()
        embed_images(model, paths, processor, batch_size=batch_size, progress=False)
        return num_images / (time.perf_counter() - start)


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function; the functions take turns within each repeat, so load from
    other processes on a shared machine hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer images, a 20,000-vector gallery, fewer repeats.")
    parser.add_argument("--device", default="cpu", help="Device of the extraction benchmark (default cpu).")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and faiss (default: theirs). On a shared machine 1 thread "
                             "gives stable figures: OpenMP teams stall when another process holds a core.")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")

    print("\n(a) feature extraction, images/s (extract_features, preprocessed inputs)")
    print("| model | input | batch | fp32 | bf16 autocast | bf16 / fp32 |")
    print("|---|---|---|---|---|---|")
    tiny, processor = create_tiny_model(seed=0)
    setups = [("tiny (demo)", tiny.eval().to(device), 64, 256 if args.quick else 2048),
              ("ViT-B/16", vit_b16_model().to(device), 16, 16 if args.quick else 64)]
    for name, model, batch, count in setups:
        fp32 = throughput(model, count, batch, None)
        bf16 = throughput(model, count, batch, "bf16")
        height, width = model.config.image_size
        print(f"| {name} | {height}x{width} | {batch} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f}x |")
        del model
    rate = files_throughput(tiny.to(device), processor, 128 if args.quick else 1024, 64)
    print(f"\ntiny model from JPEG files (decode + transform + model, fp32, batch 64): {rate:.1f} images/s")

    num_gallery = 20_000 if args.quick else 100_000
    dim, k = 512, 10
    print(f"\n(b) exact search, flat inner-product index, N = {num_gallery:,} x {dim}-d, k = {k}, "
          f"faiss {__import__('faiss').__version__}")
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((num_gallery, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    feature_set = FeatureSet(torch.from_numpy(gallery), [f"gallery/{i:06d}.jpg" for i in range(num_gallery)], "/data")
    start = time.perf_counter()
    index = build_index(feature_set)
    print(f"index build: {time.perf_counter() - start:.2f} s")
    print("| queries | bare index.search | search() | ratio | search_gallery() | ratio |")
    print("|---|---|---|---|---|---|")
    for num_queries, repeats in ((1, 20 if args.quick else 50), (1000, 3 if args.quick else 9)):
        queries = rng.standard_normal((num_queries, dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        queries_t = torch.from_numpy(queries)
        medians = median_times({
            "bare": lambda q=queries: index.search(q, k),
            "search": lambda q=queries_t: search(index, q, k),
            "search_gallery": lambda q=queries_t: search_gallery(index, feature_set, q, k),
        }, repeats)
        bare, ours, named = medians["bare"], medians["search"], medians["search_gallery"]
        print(f"| {num_queries:,} | {1e3 * bare:.2f} ms | {1e3 * ours:.2f} ms | {ours / bare:.2f}x | "
              f"{1e3 * named:.2f} ms | {named / bare:.2f}x |")


if __name__ == "__main__":
    main()
