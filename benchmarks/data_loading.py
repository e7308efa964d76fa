"""Benchmark of the ReID data path (issue 3 targets).

(a) Listing + parsing an MSMT17-sized release (126,441 files: 32,621 train+val, 11,659 query,
    82,161 gallery) into a `DatasetDict`, for the official list-file layout (with the existence check
    of every listed file) and for a Market-1501-style copy. The files are empty with valid names.
    Target: <= 5 s each.
(b) Images/s of the train pipeline — JPEG decode, train transform (bicubic resize, flip, pad + crop,
    normalise, random erasing) and collation through a `torch.utils.data.DataLoader` with the P×K
    sampler — on the synthetic dataset, with the default worker count (0, as 🤗 Trainer) and more.

Usage: ``PYTHONPATH=src python benchmarks/data_loading.py [--quick] [--workers 0 2] [--size 256 128]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ccafl_hf.data import (
    RandomIdentitySampler,
    ReIDCollator,
    build_train_transform,
    dataset_summary,
    load_reid_dataset,
)

# MSMT17 split sizes: (images, identities)
MSMT_SPLITS = {"train": (30_248, 1_041), "val": (2_373, 1_041), "query": (11_659, 3_060), "gallery": (82_161, 3_060)}


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def make_msmt_tree(root: Path, scale: float = 1.0, seed: int = 0) -> int:
    """Write an MSMT17_V1-like list layout of empty files plus a Market-style copy's names.

    Returns the number of image files of the list layout.
    """
    rng = np.random.default_rng(seed)
    total = 0
    market_names: dict[str, list[str]] = {"bounding_box_train": [], "query": [], "bounding_box_test": []}
    for split, (count, ids) in MSMT_SPLITS.items():
        count, ids = max(1, int(count * scale)), max(2, int(ids * scale))
        folder = root / "MSMT17_V1" / ("train" if split in ("train", "val") else "test")
        pids = np.sort(rng.integers(0, ids, count))
        cams = rng.integers(1, 16, count)
        lines = []
        made_dirs = set()
        for k, (pid, cam) in enumerate(zip(pids.tolist(), cams.tolist())):
            name = f"{pid:04d}_{k:03d}_{cam:02d}_0303morning_{k % 10000:04d}_{split[0]}.jpg"
            if pid not in made_dirs:
                (folder / f"{pid:04d}").mkdir(parents=True, exist_ok=True)
                made_dirs.add(pid)
            _touch(os.path.join(folder, f"{pid:04d}", name))
            lines.append(f"{pid:04d}/{name} {pid}\n")
            market = {"train": "bounding_box_train", "val": "bounding_box_train", "query": "query"}.get(
                split, "bounding_box_test")
            market_names[market].append(f"{pid + (0 if split in ('train', 'val') else 2000):04d}_c{cam}_{split[0]}{k:06d}.jpg")
        (root / "MSMT17_V1" / f"list_{split}.txt").write_text("".join(lines))
        total += count
    for folder, names in market_names.items():
        (root / "market_style" / folder).mkdir(parents=True)
        for name in names:
            _touch(os.path.join(root, "market_style", folder, name))
    return total


def bench_parsing(scale: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        count = make_msmt_tree(root, scale)
        print(f"(a) wrote {count:,} empty files x 2 layouts in {time.perf_counter() - start:.1f} s")
        for label, name, path in (("MSMT17 list layout", "msmt17", root / "MSMT17_V1"),
                                  ("Market-style layout", "msmt17", root / "market_style")):
            start = time.perf_counter()
            dataset = load_reid_dataset(name, path)
            seconds = time.perf_counter() - start
            info = dataset_summary(dataset)
            rows = sum(len(dataset[s]) for s in dataset)
            print(f"    {label:22s}: {rows:,} rows, {info.num_train_identities:,} intra-camera identities, "
                  f"{seconds:.2f} s  (target <= 5 s)")


def bench_pipeline(workers: list[int], size: tuple[int, int], batches: int) -> None:
    dataset = load_reid_dataset("synthetic")
    train = dataset["train"]
    height, width = size
    collate = ReIDCollator(build_train_transform(height, width, (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)))
    print(f"(b) train pipeline on the synthetic dataset ({len(train)} images of 128x64 -> {height}x{width}), "
          f"batch 64 (16 x 4), torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    for num_workers in workers:
        sampler = RandomIdentitySampler(train["intra_id"], num_instances=4, batch_size=64, seed=0)
        loader = DataLoader(train, batch_size=64, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                            drop_last=True, persistent_workers=num_workers > 0)
        seen, epoch, start = 0, 0, None
        while seen < batches * 64 + 64:
            sampler.set_epoch(epoch)
            for batch in loader:
                if start is None:  # skip the first batch (worker start-up)
                    start = time.perf_counter()
                    continue
                seen += batch["pixel_values"].shape[0]
                if seen >= batches * 64:
                    break
            epoch += 1
        rate = seen / (time.perf_counter() - start)
        default = " (default)" if num_workers == 0 else ""
        print(f"    num_workers={num_workers}{default}: {rate:,.0f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 5%% tree and fewer batches")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--size", type=int, nargs=2, default=[256, 128], metavar=("HEIGHT", "WIDTH"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    bench_parsing(0.05 if args.quick else 1.0)
    bench_pipeline(args.workers, tuple(args.size), 5 if args.quick else 30)


if __name__ == "__main__":
    main()
