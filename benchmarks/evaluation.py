"""Benchmark of the scalable evaluation: metrics and re-ranking at the cost of one matrix product.

(a) MSMT17 test size by default - 11,659 queries × 82,161 gallery, 512-d float32 features: time of
    ``compute_reid_metrics`` versus one bare ``torch.mm`` of the same features (measured in the same
    run; also versus the same product in row chunks into a reused buffer, and in the 1,024 × 4,096
    tiles the evaluation multiplies, i.e. its pure arithmetic) and the extra peak memory of the
    evaluation. Targets: <= 1.15x the bare mm, <= 1 GB extra.
(b) k-reciprocal re-ranking from features (``compute_reid_metrics(..., rerank=True)``) at the same size
    unless ``--rerank-queries/--rerank-gallery`` say otherwise, versus one full ``N × N`` product of
    the stacked features (``N = Q + G``; row blocks into a reused buffer, as the matrix itself would
    not fit), measured in the same run. Targets: <= 0.75x that product, <= 2 GB extra.

Each measurement runs in its own subprocess so peak memory (the kernel's resident-set high-water mark,
reset after the features are loaded) belongs to that measurement alone. The features are synthetic
but shaped like real ones: identities seen by several cameras with a camera bias, L2-normalised.

Usage: ``PYTHONPATH=src python benchmarks/evaluation.py [--quick] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# ------------------------------------------------------------------------------------------------ data
def make_split(
    num_query: int, num_gallery: int, dim: int, num_ids: int, num_cams: int, noise: float = 1.2, seed: int = 0
):
    """Synthetic query/gallery features ``[Q, dim]``/``[G, dim]`` (float32, L2-normalised) with ids and
    cameras: every identity has gallery images in several cameras, queries are drawn from the same
    identities, ~2% of the gallery are distractors (pid 0). ``noise`` sets the difficulty (1.2 gives
    an mAP near MSMT17's at its size; 3 is close to random features)."""
    rng = np.random.default_rng(seed)
    persons = rng.standard_normal((num_ids + 1, dim), dtype=np.float32) / math.sqrt(dim)
    cam_bias = 0.8 * rng.standard_normal((num_cams, dim), dtype=np.float32) / math.sqrt(dim)

    def draw(pids: np.ndarray, cams: np.ndarray) -> np.ndarray:
        x = persons[pids] + cam_bias[cams]
        x += noise * rng.standard_normal(x.shape, dtype=np.float32) / math.sqrt(dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    g_pids = rng.integers(1, num_ids + 1, num_gallery)
    g_pids[rng.random(num_gallery) < 0.02] = 0
    g_cams = rng.integers(0, num_cams, num_gallery)
    q_pids = rng.integers(1, num_ids + 1, num_query)
    q_cams = rng.integers(0, num_cams, num_query)
    return draw(q_pids, q_cams), draw(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


def save_split(folder: Path, split) -> None:
    for name, array in zip(("qf", "gf", "q_pids", "g_pids", "q_cams", "g_cams"), split):
        np.save(folder / f"{name}.npy", array)


def load_split(folder: Path):
    return [np.load(folder / f"{name}.npy") for name in ("qf", "gf", "q_pids", "g_pids", "q_cams", "g_cams")]


# -------------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter where Linux allows it; returns the baseline in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    try:
        return _status_kb("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


# ------------------------------------------------------------------------------------------- workers
def worker(kind: str, folder: Path, threads: int) -> dict:
    import torch

    from ccafl_hf.evaluation import compute_reid_metrics

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    qf, gf, q_pids, g_pids, q_cams, g_cams = load_split(folder)
    qt, gt = torch.from_numpy(qf), torch.from_numpy(gf)
    torch.mm(qt[:64], gt[:4096].T)  # warm up BLAS threads
    base = reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    if kind == "mm":
        out = torch.mm(qt, gt.T)
        seconds = time.perf_counter() - start
        del out
        result = {}
    elif kind == "mm_tiled":  # the same product in 1,024 × 4,096 tiles: what the evaluation multiplies
        buf = torch.empty(1024 * 4096)
        for lo in range(0, qt.shape[0], 1024):
            chunk = qt[lo : lo + 1024]
            for j0 in range(0, gt.shape[0], 4096):
                block = gt[j0 : j0 + 4096]
                torch.mm(chunk, block.T, out=buf[: chunk.shape[0] * block.shape[0]].view(chunk.shape[0], -1))
        seconds = time.perf_counter() - start
        result = {}
    elif kind in ("mm_chunked", "mm_full"):
        if kind == "mm_full":  # the stacked query + gallery features against themselves
            qt = gt = torch.cat((qt, gt))
            base = reset_peak_rss()
            start, cpu_start = time.perf_counter(), time.process_time()
        rows = 1024
        buf = torch.empty(rows, gt.shape[0])
        for lo in range(0, qt.shape[0], rows):
            chunk = qt[lo : lo + rows]
            torch.mm(chunk, gt.T, out=buf[: chunk.shape[0]])
        seconds = time.perf_counter() - start
        result = {}
    else:
        result = compute_reid_metrics(qt, gt, q_pids, g_pids, q_cams, g_cams, rerank=kind == "rerank")
        seconds = time.perf_counter() - start
        result = {k: result[k] for k in ("mAP", "mINP", "rank1", "rank5", "rank10", "num_valid_queries")}
    cpu = time.process_time() - cpu_start  # all threads: robust to other processes on a shared machine
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_extra_bytes": peak_rss() - base, **result}


def run_worker(kind: str, folder: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(folder), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for line in done.stderr.splitlines():
        if line.startswith("re-ranking"):
            print("      " + line)
            found = re.search(r"\(one pass\) in ([0-9.]+) s", line)
            if found:
                result["one_pass_seconds"] = float(found.group(1))
    return result


def times(run: dict) -> str:
    return f"{run['seconds']:8.2f} s wall ({run['cpu_seconds']:.2f} s CPU)"


def ratios(run: dict, reference: dict) -> str:
    """Wall-clock ratio, and the CPU-time ratio (what counts when other processes share the cores)."""
    return (f"{run['seconds'] / reference['seconds']:.2f}x wall, "
            f"{run['cpu_seconds'] / reference['cpu_seconds']:.2f}x CPU")


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=11659)
    parser.add_argument("--gallery", type=int, default=82161)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ids", type=int, default=3060, help="identities in the test split")
    parser.add_argument("--cams", type=int, default=15)
    parser.add_argument("--rerank-queries", type=int, default=None, help="default: --queries")
    parser.add_argument("--rerank-gallery", type=int, default=None, help="default: --gallery")
    parser.add_argument("--noise", type=float, default=1.2, help="feature noise (difficulty) of the synthetic data")
    parser.add_argument("--skip-rerank", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a small run (2,000 × 12,000 × 512) for development")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.data), args.threads)))
        return
    if args.quick:
        args.queries, args.gallery, args.dim, args.ids = 2000, 12000, 512, 500
    rq = args.rerank_queries or args.queries
    rg = args.rerank_gallery or args.gallery

    print("load average (1, 5, 15 min) at start: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
          + f" on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "main"
        folder.mkdir()
        save_split(folder, make_split(args.queries, args.gallery, args.dim, args.ids, args.cams, args.noise))
        print(f"(a) {args.queries} queries × {args.gallery} gallery × {args.dim}-d, {args.threads} threads")
        mm = run_worker("mm", folder, args.threads)
        mm_chunked = run_worker("mm_chunked", folder, args.threads)
        mm_tiled = run_worker("mm_tiled", folder, args.threads)
        metrics = run_worker("metrics", folder, args.threads)
        print(f"    bare torch.mm (one call, fresh output):    {times(mm)}  "
              f"(peak extra {gib(mm['peak_extra_bytes'])})")
        print(f"    chunked torch.mm into a reused buffer:     {times(mm_chunked)}")
        print(f"    tiled torch.mm (1,024 × 4,096 tiles):      {times(mm_tiled)}")
        print(f"    compute_reid_metrics:                      {times(metrics)}  "
              f"(peak extra {gib(metrics['peak_extra_bytes'])}; target <= 1 GB)")
        print(f"    ratio to bare mm {ratios(metrics, mm)} (target <= 1.15x), "
              f"to chunked mm {ratios(metrics, mm_chunked)}, to tiled mm {ratios(metrics, mm_tiled)}")
        print("    metrics: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in ("mAP", "mINP", "rank1", "rank10")))
        if args.skip_rerank:
            print("load average (1, 5, 15 min) at end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
            return
        if (rq, rg) != (args.queries, args.gallery):
            folder = Path(tmp) / "rerank"
            folder.mkdir()
            ids = max(2, round(args.ids * rg / args.gallery))
            save_split(folder, make_split(rq, rg, args.dim, ids, args.cams, args.noise))
        print(f"(b) re-ranking from features: {rq} queries × {rg} gallery × {args.dim}-d")
        full = run_worker("mm_full", folder, args.threads)
        rerank = run_worker("rerank", folder, args.threads)
        print(f"    one full {rq + rg} × {rq + rg} torch.mm (row blocks): {times(full)}")
        print(f"    compute_reid_metrics(rerank=True):         {times(rerank)}  "
              f"(peak extra {gib(rerank['peak_extra_bytes'])}; target <= 2 GB)")
        print(f"    ratio to the full product {ratios(rerank, full)} (target <= 0.75x)")
        if "one_pass_seconds" in rerank:
            print(f"    of which the one neighbour pass: {rerank['one_pass_seconds'] / full['seconds']:.2f}x the full "
                  "product (wall; it computes half of it)")
        print("    metrics: " + ", ".join(f"{k} {rerank[k]:.4f}" for k in ("mAP", "mINP", "rank1", "rank10")))
    print("load average (1, 5, 15 min) at end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
