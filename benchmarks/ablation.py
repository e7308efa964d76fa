"""Ablation of the CCAFL stages on the embedded synthetic dataset (issue 8): does each stage help?

Every run is ``scripts/train.py`` with the ``demo`` preset (tiny random CLIP, synthetic data, all
three stages) and at most one switch; the rows are read from the runs' ``eval_results.json``
(query/gallery, Market-1501 protocol) and averaged over seeds (the seed drives the tiny model's
initialisation, the P×K sampling and the augmentation):

=========================  =====================================================================
untrained                  the randomly initialised model (evaluated before training)
+prompt                    after stage 1. Stage 1 trains only the identity prompts, so the image
                           tower, hence this row, equals "untrained"; the prompts act through
                           the image–text losses of stages 2–3, measured by the "without prompts"
                           rows (``--use_image_text_loss false``: stage 1's output is unused)
ICDL without prompts       stage 2 without the intra-camera image–text loss
+ICDL                      stage 2 with it (the prompts' contribution to stage 2)
ICAL without prompts       stages 2–3 without either image–text loss
+ICAL w/o adversarial      stages 2–3 with ``--use_adversarial_loss false``
+ICAL                      everything: the no-argument demo
=========================  =====================================================================

Each "helps" line below the table compares a row with the one it builds on, per seed.

``--warm_start`` first gives the tiny image tower prior knowledge, standing in for CLIP's
pre-training: it is trained with person labels on a *disjoint* synthetic population (other people,
other camera styles: dataset seed 1), then every run starts from it. The runs themselves still see
only intra-camera labels of their own training data. With the random tower of the demo, stage 1
has nothing to transfer (see the README, "Ablation on the synthetic dataset"); this shows what the prompts do when it has.

    python benchmarks/ablation.py                       # seeds 0 1, 2 runs at a time
    python benchmarks/ablation.py --quick               # smoke test: a few steps per stage, 1 seed
    python benchmarks/ablation.py --seeds 0 1 2 --jobs 1 --output_dir outputs/ablation
    python benchmarks/ablation.py --warm_start --output_dir outputs/ablation-warm
    python benchmarks/ablation.py -- --learning_rate 1e-3   # flags after "--" go to every run

Runs whose output folder already holds ``eval_results.json`` are reused (``--rerun`` to redo them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"

#: run name -> flags added to the preset
RUNS = {
    "full": [],
    "no_image_text": ["--use_image_text_loss", "false"],
    "no_adversarial": ["--use_adversarial_loss", "false"],
}
#: table row -> (run, stage whose evaluation it reports)
ROWS = {
    "untrained": ("full", "untrained"),
    "+prompt": ("full", "prompt"),
    "ICDL without prompts": ("no_image_text", "icdl"),
    "+ICDL": ("full", "icdl"),
    "ICAL without prompts": ("no_image_text", "ical"),
    "+ICAL w/o adversarial": ("no_adversarial", "ical"),
    "+ICAL": ("full", "ical"),
}
#: (what, row, baseline row): "row" must beat "baseline"
CHECKS = (
    ("ICDL", "+ICDL", "untrained"),
    ("prompts in stage 2", "+ICDL", "ICDL without prompts"),
    ("prompts in stages 2-3", "+ICAL", "ICAL without prompts"),
    ("ICAL", "+ICAL", "+ICDL"),
    ("adversarial loss", "+ICAL", "+ICAL w/o adversarial"),
)
QUICK_FLAGS = ["--prompt_epochs", "2", "--iters_per_epoch", "5"]
#: synthetic population of --warm_start: the default size with another seed (other people and cameras)
WARM_START_DATA = {"seed": 1}


def warm_start_tower(folder: Path, steps: int, seed: int = 0) -> Path:
    """Train the demo's tiny image tower with person labels on a disjoint synthetic population and
    save it (model + processor) in ``folder``; reused when already there."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, RandomSampler

    from ccafl_hf import create_tiny_model
    from ccafl_hf.cli import load_preset
    from ccafl_hf.data import ReIDCollator, build_train_transform, load_reid_dataset

    torch.manual_seed(seed)
    overrides = json.loads(load_preset("demo").get("config_overrides") or "{}")
    model, processor = create_tiny_model(seed=seed, **overrides)
    train = load_reid_dataset("synthetic", None, **WARM_START_DATA)["train"]
    labels = torch.unique(torch.tensor(train["diagnostic_pid"]), return_inverse=True)[1]
    train = train.add_column("index", list(range(len(train))))
    height, width = model.config.image_size
    transform = build_train_transform(height, width, processor.image_processor.image_mean,
                                      processor.image_processor.image_std, erasing_p=0.0)
    batch_size = 64
    sampler = RandomSampler(train, replacement=True, num_samples=steps * batch_size,
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(train, batch_size=batch_size, sampler=sampler, collate_fn=ReIDCollator(transform))
    classifier = torch.nn.Parameter(0.01 * torch.randn(int(labels.max()) + 1, model.reid_feature_dim))
    params = [*model.vision_model.parameters(), model.neck.weight, classifier]
    optimizer = torch.optim.Adam(params, lr=3.5e-4, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    model.train()
    for step, batch in enumerate(loader):
        features = model(batch["pixel_values"]).reid_features
        logits = features @ F.normalize(classifier, dim=1).t() / 0.05  # cosine classifier, as the memories
        loss = F.cross_entropy(logits, labels[batch["indices"]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 200 == 0:
            print(f"  warm start: step {step + 1}/{steps}, loss {loss.item():.3f}", flush=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def run_one(name: str, seed: int, out: Path, extra: list[str], rerun: bool) -> dict:
    """One ``scripts/train.py`` run (a subprocess, so runs can go in parallel); returns its results."""
    run_dir = out / f"{name}-seed{seed}"
    results_file = run_dir / "eval_results.json"
    if results_file.is_file() and not rerun:
        return {"results": json.loads(results_file.read_text()), "seconds": None}
    command = [
        sys.executable, str(TRAIN_SCRIPT), "--output_dir", str(run_dir), "--overwrite_output_dir",
        "--seed", str(seed), "--disable_tqdm", "true", *RUNS[name], *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    log = out / f"{name}-seed{seed}.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"run {name} (seed {seed}) failed with exit code {done.returncode}; see {log}")
    print(f"  {name} seed {seed}: {seconds:.0f} s", flush=True)
    return {"results": json.loads(results_file.read_text()), "seconds": seconds}


def collect(runs: dict[tuple[str, int], dict], seeds: list[int]) -> dict[str, dict[str, list[float]]]:
    """Row -> metric -> per-seed values (fractions)."""
    table = {}
    for row, (name, stage) in ROWS.items():
        values = [runs[(name, seed)]["results"]["stages"][stage] for seed in seeds]
        table[row] = {metric: [v[metric] for v in values] for metric in ("mAP", "rank1")}
    return table


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ({', '.join(f'{100 * v:.1f}' for v in values)})"


def markdown(table: dict[str, dict[str, list[float]]], seeds: list[int]) -> str:
    """The ablation table (mean over seeds, per-seed values in brackets) and the per-seed checks."""
    lines = [
        f"| variant | mAP % (seeds {', '.join(map(str, seeds))}) | rank-1 % |",
        "|---|---|---|",
    ]
    lines += [f"| {row} | {_cell(m['mAP'])} | {_cell(m['rank1'])} |" for row, m in table.items()]
    lines.append("")
    for what, row, base in CHECKS:
        gains = [a - b for a, b in zip(table[row]["mAP"], table[base]["mAP"])]
        verdict = "helps on every seed" if min(gains) > 0 else "DOES NOT HELP on every seed"
        lines.append(
            f"- {what}: {row} vs {base}: mAP {100 * statistics.fmean(gains):+.1f} points "
            f"(per seed {', '.join(f'{100 * g:+.1f}' for g in gains)}), {verdict}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: a few steps per stage (numbers meaningless)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (--quick: 0)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time")
    parser.add_argument("--output_dir", default="outputs/ablation", help="one folder per run, logs, ablation.json")
    parser.add_argument("--rerun", action="store_true", help="redo runs that already have results")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every stage helps on every seed")
    parser.add_argument("--warm_start", action="store_true",
                        help="start every run from a tiny tower pre-trained on a disjoint synthetic population")
    parser.add_argument("--warm_start_steps", type=int, default=800, help="steps (batch 64) of that pre-training")
    parser.add_argument("extra", nargs="*", help="flags passed to every scripts/train.py run (after --)")
    args = parser.parse_args()
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    extra = (QUICK_FLAGS if args.quick else []) + list(args.extra)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    if args.warm_start:
        start = time.perf_counter()
        steps = 20 if args.quick else args.warm_start_steps
        tower = warm_start_tower(out.resolve() / f"warm_start_model-{steps}steps", steps)
        print(f"warm-started tower in {tower} ({time.perf_counter() - start:.0f} s)", flush=True)
        extra = ["--model_name_or_path", str(tower), "--config_overrides", "", *extra]

    jobs = [(name, seed) for seed in seeds for name in RUNS]
    print(f"{len(jobs)} runs ({len(RUNS)} variants x {len(seeds)} seeds), {args.jobs} at a time, in {out}", flush=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {job: pool.submit(run_one, *job, out, extra, args.rerun) for job in jobs}
        runs = {job: future.result() for job, future in futures.items()}
    total = time.perf_counter() - start

    table = collect(runs, seeds)
    text = markdown(table, seeds)
    (out / "ablation.json").write_text(json.dumps(
        {"seeds": seeds, "warm_start": args.warm_start, "extra_flags": extra, "table": table,
         "run_seconds": {f"{n}-seed{s}": r["seconds"] for (n, s), r in runs.items()}}, indent=2))
    if args.warm_start:
        text = "Every run starts from the warm-started tower (\"untrained\" = before CCAFL).\n\n" + text
    print(f"\n{text}\n\n{len(jobs)} runs in {total / 60:.1f} min; details in {out / 'ablation.json'}")
    if args.check:
        ok = all(
            min(a - b for a, b in zip(table[row]["mAP"], table[base]["mAP"])) > 0 for _, row, base in CHECKS
        )
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
