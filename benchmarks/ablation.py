"""Ablation of the CCAFL stages on the embedded synthetic dataset (issue 8): does each stage help?

Every run is ``scripts/train.py`` with the ``demo`` preset (the pre-trained tiny CLIP, synthetic
data, all three stages) and at most one switch; the rows are read from the runs' ``eval_results.json``
(query/gallery, Market-1501 protocol) and averaged over seeds (the seed drives the P×K sampling, the
augmentation and the prompts' initialisation; with ``tiny`` also the model's):

=========================  =====================================================================
untrained                  the model before any CCAFL stage (the pre-trained tiny CLIP, zero-shot)
+prompt                    after stage 1. Stage 1 trains only the identity prompts, so the image
                           tower, hence this row, equals "untrained"; the prompts act through
                           the image–text losses of stages 2–3, measured by the "without prompts"
                           rows (``--use_image_text_loss false``: stage 1's output is unused)
ICDL without prompts       stage 2 without the intra-camera image–text loss
+ICDL                      stage 2 with it
ICAL without prompts       stages 2–3 without either image–text loss
+ICAL w/o adversarial      stages 2–3 with ``--use_adversarial_loss false``
+ICAL                      everything: the no-argument demo
=========================  =====================================================================

Each "helps" line below the table compares a row with the one it builds on, per seed: the stage
checks (``--check`` requires them on every seed) and, for information, the prompts within stage 2
alone (see the README for why that one is negative on the synthetic data).

The demo preset starts from ``tiny-pretrained``: the tiny CLIP pre-trained contrastively on captioned
synthetic people of a *disjoint* population (`ccafl_hf.tiny.pretraining`), standing in for CLIP's
pre-training; the runs themselves see only intra-camera labels of their own training data. To
ablate from a randomly initialised tower instead (no vision–language prior: nothing for the prompts
to transfer; see the README), pass ``-- --model_name_or_path tiny --config_overrides
'{"vision_config": {"patch_size": 4}}'``.

    python benchmarks/ablation.py                       # seeds 0 1, 2 runs at a time
    python benchmarks/ablation.py --quick               # smoke test: a few steps per stage, 1 seed
    python benchmarks/ablation.py --seeds 0 1 2 --jobs 1 --output_dir outputs/ablation
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
#: (what, row, baseline row): each stage's contribution to the final model; "row" must beat "baseline"
CHECKS = (
    ("prompts (stage 1, used by stages 2-3)", "+ICAL", "ICAL without prompts"),
    ("ICDL", "+ICDL", "untrained"),
    ("ICAL", "+ICAL", "+ICDL"),
    ("adversarial loss", "+ICAL", "+ICAL w/o adversarial"),
)
#: compared and printed, not required
DIAGNOSTICS = (("prompts within stage 2 alone", "+ICDL", "ICDL without prompts"),)
QUICK_FLAGS = ["--prompt_epochs", "2", "--iters_per_epoch", "5"]
def run_one(name: str, seed: int, out: Path, extra: list[str], rerun: bool) -> dict:
    """One ``scripts/train.py`` run (a subprocess, so runs can go in parallel); returns its results."""
    run_dir = out / f"{name}-seed{seed}"
    results_file = run_dir / "eval_results.json"
    if results_file.is_file() and not rerun:
        return {"results": json.loads(results_file.read_text()), "seconds": None}
    command = [
        sys.executable, str(TRAIN_SCRIPT), "--output_dir", str(run_dir), "--overwrite_output_dir",
        "--seed", str(seed), "--disable_tqdm", "true", "--num_threads", "1", *RUNS[name], *extra,
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
    for what, row, base in (*CHECKS, *DIAGNOSTICS):
        gains = [a - b for a, b in zip(table[row]["mAP"], table[base]["mAP"])]
        verdict = "helps on every seed" if min(gains) > 0 else "does not help on every seed"
        if (what, row, base) in CHECKS and min(gains) <= 0:
            verdict = verdict.upper()
        elif (what, row, base) in DIAGNOSTICS:
            verdict += " (information)"
        spread = f" ± {100 * statistics.stdev(gains) / len(gains) ** 0.5:.1f} s.e." if len(gains) > 1 else ""
        lines.append(
            f"- {what}: {row} vs {base}: mAP {100 * statistics.fmean(gains):+.1f}{spread} points "
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
    parser.add_argument("extra", nargs="*", help="flags passed to every scripts/train.py run (after --)")
    args = parser.parse_args()
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    extra = (QUICK_FLAGS if args.quick else []) + list(args.extra)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

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
        {"seeds": seeds, "extra_flags": extra, "table": table,
         "run_seconds": {f"{n}-seed{s}": r["seconds"] for (n, s), r in runs.items()}}, indent=2))
    print(f"\n{text}\n\n{len(jobs)} runs in {total / 60:.1f} min; details in {out / 'ablation.json'}")
    if args.check:
        ok = all(
            min(a - b for a, b in zip(table[row]["mAP"], table[base]["mAP"])) > 0 for _, row, base in CHECKS
        )
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
