"""Paper-scale dry run: the real architecture on a Market-1501-sized synthetic dataset, every phase timed.

The tower has the real sizes (ViT-B/16, or CLIP RN50 with ``--backbone rn50``) with random weights
(nothing is downloaded) at 256×128. The synthetic dataset has Market-1501's shape: 751 training people
over 6 cameras (≈ 3,400 intra-camera identities, ≈ 13,500 training images) plus a query/gallery split
of 750 other people, written to disk with the package's generator (cached in ``--data_dir``). With the
settings of the backbone's preset (``vit-b16-market1501`` or ``paper-market1501``), the run times:

* stage 1: the feature cache (one pass over the training images) and a few prompt-learning steps;
* one full camera-memory rebuild and one cross-camera association (the per-epoch work of stages 2–3),
  also at MSMT17 size on random features;
* a few stage-2 (ICDL) and stage-3 (ICAL, adversarial + image–text on) steps on real P×K batches,
  against a plain CLIP fine-tune step (same tower, linear cross-entropy head, same batch, same precision);
* one query/gallery evaluation.

It prints each phase's time and peak memory (CPU: the process's peak resident set, reset per phase
through ``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated``), and projects the wall
time of a full paper run (60 prompt epochs, 80 × 200 iterations, 80 memory rebuilds / associations,
3 evaluations) at Market-1501 and MSMT17 sizes on this device.

    python benchmarks/paper_scale.py --data_dir /tmp/paper-scale-data              # GPU when available
    nice python benchmarks/paper_scale.py --device cpu --data_dir /tmp/paper-scale-data \\
        --num_identities_per_batch 4 --extract_per_identity 1 --eval_people 100      # a 2-core CPU

On a small CPU, ``--extract_per_identity 1`` embeds one image per identity (the memory and the
association still cover every identity), ``--eval_people`` evaluates on part of the test people and
``--num_identities_per_batch`` cuts the P×K batch (activations of 128 images at 256×128 do not fit in
12 GB in fp32); the projections scale the measured per-image costs to the full sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import CLIPProcessor

from ccafl_hf import CCAFLConfig, CCAFLModel, build_reid_processor, create_tiny_model
from ccafl_hf.association import associate_across_cameras, identity_mean_features
from ccafl_hf.commands import parse_train_args
from ccafl_hf.data import (
    RandomIdentitySampler,
    ReIDCollator,
    build_eval_transform,
    build_train_transform,
    dataset_summary,
    load_reid_dataset,
)
from ccafl_hf.evaluation import evaluate_reid_model, extract_features
from ccafl_hf.losses import prompt_contrastive_loss
from ccafl_hf.memory import CameraMemory
from ccafl_hf.prompts import IdentityPromptLearner
from ccafl_hf.trainers import CCAFLForTraining, ICALObjective, ICDLObjective, set_image_stage_trainable
from ccafl_hf.utils.precision import MIXED_PRECISIONS, autocast_context, resolve_mixed_precision

# sizes of the real datasets (train images, intra-camera identities, cameras, query, gallery, P×K batch)
PAPER_SIZES = {
    "Market-1501": dict(train_images=12936, identities=3262, cameras=6, query=3368, gallery=15913, batch=16 * 8),
    "MSMT17": dict(train_images=32621, identities=4821, cameras=15, query=11659, gallery=82161, batch=32 * 8),
}
PRESETS = {"vit-b16": "vit-b16-market1501", "rn50": "paper-market1501"}
#: --quick: a tiny dataset and batch (any of these given explicitly wins)
QUICK = dict(num_people=12, num_test_people=6, num_distractors=0, iterations=1, num_identities_per_batch=2,
             num_instances=2, eval_batch_size=16)
PROMPT_EPOCHS, LOOP_EPOCHS, ITERS, ICDL_EPOCHS, EVALUATIONS = 60, 80, 200, 5, 3


# ------------------------------------------------------------------------------------------ metering
@dataclass
class Phase:
    name: str
    seconds: float
    peak_gb: float
    items: int | None = None  # images (or steps) the phase processed


class Meter:
    """Times phases and records each one's peak memory (CUDA allocator, or the CPU process's RSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, Phase] = {}
        self.rss_resettable = device.type == "cpu" and self._reset_rss()

    @staticmethod
    def _reset_rss() -> bool:
        try:  # "5" resets the peak resident set size (VmHWM) to the current one (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def _peak_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.rss_resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # lifetime peak (KiB on Linux)

    @contextlib.contextmanager
    def phase(self, name: str, items: int | None = None):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.rss_resettable:
            self._reset_rss()
        print(f"… {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.phases[name] = Phase(name, seconds, self._peak_gb(), items)
        print(f"  {seconds:.1f} s", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- model
def build_model(backbone: str, quick: bool = False) -> tuple[CCAFLModel, CLIPProcessor]:
    """The backbone's real CLIP architecture at 256×128 with random weights, and its processor
    (``quick``: the package's tiny model of the same kind instead)."""
    if quick:
        return create_tiny_model(backbone="vit" if backbone == "vit-b16" else "rn50")
    if backbone == "vit-b16":
        config = CCAFLConfig(
            vision_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                           "intermediate_size": 3072, "patch_size": 16},
            text_config={"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
                         "intermediate_size": 2048, "max_position_embeddings": 77},
            projection_dim=512, image_size=(256, 128),
        )
    else:
        config = CCAFLConfig(
            vision_config={"model_type": "ccafl_resnet_vision"},
            text_config={"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
                         "intermediate_size": 2048, "max_position_embeddings": 77},
            projection_dim=1024, image_size=(256, 128),
        )
    return CCAFLModel(config), build_reid_processor(config)


def rn50_available() -> bool:
    """Whether this version of ccafl_hf has the CLIP RN50 vision tower."""
    try:
        from ccafl_hf.configuration_ccafl import CCAFLResNetVisionConfig  # noqa: F401
    except ImportError:
        return False
    return True


def build_optimizer(params: list[torch.nn.Parameter], names: list[str], args) -> torch.optim.Optimizer:
    """The image-tower optimiser of the preset: Adam or SGD, biases at ``bias_lr_factor``× lr."""
    groups = [{"params": [p for p, n in zip(params, names) if not n.endswith("bias")], "lr": args.learning_rate},
              {"params": [p for p, n in zip(params, names) if n.endswith("bias")],
               "lr": args.learning_rate * args.bias_lr_factor}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=args.sgd_momentum, weight_decay=args.weight_decay)
    return torch.optim.Adam(groups, weight_decay=args.weight_decay)


# --------------------------------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, before any work
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=sorted(PRESETS), default="vit-b16")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data_dir", default=None,
                        help="Folder of the generated dataset (reused when it holds the same options; default: "
                             "a folder under the system temp dir).")
    parser.add_argument("--num_people", type=int, default=751, help="Training people (Market-1501: 751).")
    parser.add_argument("--num_test_people", type=int, default=750, help="Query/gallery people (Market-1501: 750).")
    parser.add_argument("--num_cameras", type=int, default=6)
    parser.add_argument("--images_per_camera", type=int, default=4, help="Images of a person in each of its cameras.")
    parser.add_argument("--min_cameras", type=int, default=3, help="Each person is seen by at least this many cameras.")
    parser.add_argument("--num_distractors", type=int, default=2793, help="Gallery distractors (Market-1501: 2793).")
    parser.add_argument("--iterations", type=int, default=5,
                        help="Timed steps of each kind (after one warm-up step), the kinds taking turns.")
    parser.add_argument("--num_identities_per_batch", type=int, default=None, help="P (default: the preset's).")
    parser.add_argument("--num_instances", type=int, default=None, help="K (default: the preset's).")
    parser.add_argument("--extract_per_identity", type=int, default=0,
                        help="Embed at most this many images per identity in the train-set pass (0 = all).")
    parser.add_argument("--eval_people", type=int, default=0, help="Evaluate on this many test people (0 = all).")
    parser.add_argument("--eval_batch_size", type=int, default=None, help="Default: the preset's.")
    parser.add_argument("--precision", choices=MIXED_PRECISIONS, default="auto",
                        help="auto = the presets' mixed precision (bf16/fp16 on a GPU, fp32 on a CPU).")
    parser.add_argument("--workers", type=int, default=0, help="Data-loading worker processes.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--output", default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: the tiny model of the backbone's kind on a tiny dataset (numbers meaningless)")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.backbone == "rn50" and not rn50_available():
        parser.error("--backbone rn50 needs the CLIP RN50 vision tower, which this version of ccafl_hf does not "
                     "have; use --backbone vit-b16")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    for name in ("num_people", "num_test_people", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main(argv=None) -> dict:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    torch.manual_seed(0)
    meter = Meter(device)
    preset = PRESETS[opts.backbone]
    flags = ["--preset", preset, "--output_dir", tempfile.gettempdir(), "--report_to", "none"]
    for name in ("num_identities_per_batch", "num_instances"):
        if getattr(opts, name):
            flags += [f"--{name}", str(getattr(opts, name))]
    _, _, args = parse_train_args(flags)
    mixed = resolve_mixed_precision(opts.precision, device=device)
    eval_batch = opts.eval_batch_size or args.per_device_eval_batch_size

    # ---------------------------------------------------------------------------------------- data
    options = dict(num_train_identities=opts.num_people, num_test_identities=opts.num_test_people,
                   num_cameras=opts.num_cameras, images_per_identity_per_camera=opts.images_per_camera,
                   min_cameras_per_identity=opts.min_cameras, num_distractors=opts.num_distractors,
                   image_size=(128, 64), seed=0)
    data_dir = Path(opts.data_dir or Path(tempfile.gettempdir()) / "ccafl-paper-scale")
    with meter.phase("data: generate or reuse the dataset"):
        dataset = load_reid_dataset("synthetic", data_dir / ("quick" if opts.quick else "market-sized"), **options)
    info = dataset_summary(dataset)
    train, n = dataset["train"], info.num_train_identities
    identity_camids = torch.as_tensor(info.identity_camids, dtype=torch.long)
    print(f"dataset: {len(train)} train images, {n} intra-camera identities, {info.num_cameras} cameras, "
          f"{len(dataset['query'])} query, {len(dataset['gallery'])} gallery", flush=True)

    model, processor = build_model(opts.backbone, opts.quick)
    model = model.to(device)
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    height, width = model.config.image_size
    eval_collator = ReIDCollator(build_eval_transform(height, width, mean, std))
    train_collator = ReIDCollator(build_train_transform(height, width, mean, std, erasing_p=args.random_erasing_prob))

    # ------------------------------------------------------------------ one pass over the train images
    intra = np.asarray(train["intra_id"])
    if opts.extract_per_identity:
        order = np.argsort(intra, kind="stable")
        rank = np.arange(len(intra)) - np.searchsorted(intra[order], intra[order])
        subset = train.select(np.sort(order[rank < opts.extract_per_identity]).tolist())
    else:
        subset = train
    with meter.phase("train-set feature pass (cache / rebuild / association input)", items=len(subset)):
        extracted = extract_features(model, subset, eval_collator, batch_size=eval_batch, num_workers=opts.workers,
                                     mixed_precision=mixed, with_alignment=True, progress=False)
    features, intra_ids = extracted.reid_features, extracted.labels["intra_ids"]

    # ------------------------------------------------------------------------------ stage 1 steps
    model.requires_grad_(False)
    learner = IdentityPromptLearner(model, processor.tokenizer, n, init_std=args.prompt_init_std).to(device)
    prompt_opt = torch.optim.Adam([learner.prompt_embedding.embedding.weight], lr=args.prompt_learning_rate,
                                  weight_decay=args.prompt_weight_decay)
    cache_camids = extracted.labels["camids"]

    def prompt_step() -> None:
        rows = torch.randint(0, features.shape[0], (args.prompt_batch_size,), device=device)
        with autocast_context(device, mixed):
            text = learner(intra_ids[rows])
        loss = prompt_contrastive_loss(extracted.alignment_features[rows], text.float(), intra_ids[rows],
                                       cache_camids[rows])
        prompt_opt.zero_grad(set_to_none=True)
        loss.backward()
        prompt_opt.step()

    prompt_step()
    with meter.phase("stage 1: prompt steps", items=opts.iterations):
        for _ in range(opts.iterations):
            prompt_step()
    with torch.no_grad(), autocast_context(device, mixed):
        text_features = learner.all_text_features().float()

    # ------------------------------------------------------------------- per-epoch work of stages 2–3
    set_image_stage_trainable(model, args.freeze_patch_embedding)
    module = CCAFLForTraining(
        model, identity_camids, text_features, memory_instances=args.memory_instances,
        memory_momentum=args.memory_momentum, memory_temperature=args.memory_temperature,
        classifier_scale=args.classifier_scale,
    ).to(device)
    with meter.phase("memory rebuild (from the pass's features)"):
        module.camera_memory.initialize(features, intra_ids)
    with meter.phase("association + global memory (from the pass's features)"):
        identity_features = identity_mean_features(features, intra_ids, n)
        labels = associate_across_cameras(identity_features, identity_camids.numpy(),
                                          int(round(args.association_rate * n)))
        module.set_pseudo_labels(torch.as_tensor(labels), features, intra_ids)
    print(f"association: {int(labels.max()) + 1} pseudo-identities, {int((labels >= 0).sum())}/{n} identities",
          flush=True)
    msmt = PAPER_SIZES["MSMT17"]
    g = torch.Generator().manual_seed(0)
    msmt_camids = torch.randint(0, msmt["cameras"], (msmt["identities"],), generator=g).sort().values
    msmt_ids = torch.cat([torch.arange(msmt["identities"]),
                          torch.randint(0, msmt["identities"], (msmt["train_images"] - msmt["identities"],), generator=g)])
    msmt_feats = F.normalize(torch.randn(msmt["train_images"], model.reid_feature_dim, generator=g), dim=1).to(device)
    msmt_memory = CameraMemory(msmt["identities"], model.reid_feature_dim, msmt_camids,
                               num_instances=args.memory_instances).to(device)
    with meter.phase("memory rebuild at MSMT17 size (random features)"):
        msmt_memory.initialize(msmt_feats, msmt_ids.to(device))
    with meter.phase("association at MSMT17 size (random features)"):
        associate_across_cameras(identity_mean_features(msmt_feats, msmt_ids.to(device), msmt["identities"]),
                                 msmt_camids.numpy(), int(round(1.3 * msmt["identities"])))
    del msmt_memory, msmt_feats

    # ----------------------------------------------------------------------------- stages 2–3 steps
    batch = args.pk_batch_size
    sampler = RandomIdentitySampler(train["intra_id"], num_instances=args.num_instances, batch_size=batch, seed=0)
    loader = DataLoader(train, batch_size=batch, sampler=sampler, collate_fn=train_collator, drop_last=True,
                        num_workers=opts.workers)
    batches = iter(loader)
    with meter.phase(f"data: load + augment P×K batches of {batch} (1 process)", items=opts.iterations + 1):
        inputs = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(opts.iterations + 1)]
    scaler = torch.amp.GradScaler(device.type, enabled=mixed == "fp16")
    trainable = [(n_, p_) for n_, p_ in model.named_parameters() if p_.requires_grad]
    optimizers = [
        build_optimizer([p_ for _, p_ in trainable], [n_ for n_, _ in trainable], args),
        torch.optim.Adam(module.classifier.parameters(), lr=args.classifier_learning_rate,
                         weight_decay=args.classifier_weight_decay),  # the global-ID classifier's own Adam
    ]

    icdl_objective, ical_objective = ICDLObjective.from_config(args), ICALObjective.from_config(args)
    adversarial_epoch = max(args.adversarial_start_epoch, args.ical_image_text_start_epoch)

    def stage_step(inp: dict, objective, epoch: int) -> None:
        """One step as `CCAFLTrainer.training_step` takes it: forward + backward of the objective, the
        memory update, then the global-ID classifier's own Adam on the detached features (fp32)."""
        with autocast_context(device, mixed):
            out = module(pixel_values=inp["pixel_values"])
        loss = sum(objective.losses(module, out, inp["intra_ids"], inp["camids"], epoch).values())
        features = out.reid_features.detach()
        optimizers[0].zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizers[0])
        scaler.update()
        objective.update_memories(module, features, inp["intra_ids"])
        loss = module.classifier.classification_loss(features.float(), inp["intra_ids"])
        optimizers[1].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[1].step()

    def icdl(inp: dict) -> None:
        stage_step(inp, icdl_objective, 0)

    def ical(inp: dict) -> None:  # an epoch where the adversarial and image–text losses are both on
        stage_step(inp, ical_objective, adversarial_epoch)

    # the plain fine-tune: same tower, same optimiser recipe, a linear cross-entropy head
    head = torch.nn.Linear(model.reid_feature_dim, n).to(device)
    head_names = [f"head.{k}" for k, _ in head.named_parameters()]
    base_opt = build_optimizer([p_ for _, p_ in trainable] + list(head.parameters()),
                               [n_ for n_, _ in trainable] + head_names, args)

    def plain(inp: dict) -> None:
        with autocast_context(device, mixed):
            logits = head(model.get_reid_outputs(inp["pixel_values"]).reid_features)
            loss = F.cross_entropy(logits.float(), inp["intra_ids"])
        base_opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(base_opt)
        scaler.update()

    steps = {"stage 2 (ICDL) steps": icdl, "stage 3 (ICAL, adversarial + image-text) steps": ical,
             "plain CLIP fine-tune steps (CE head)": plain}
    for name, fn in steps.items():  # warm-up, alone: each kind's own peak memory
        with meter.phase(f"{name}: warm-up step", items=batch):
            fn(inputs[0])
    # timed steps take turns, so a load change on a shared machine hits every kind alike
    spent = dict.fromkeys(steps, 0.0)
    with meter.phase("timed steps (interleaved)", items=3 * opts.iterations * batch):
        for inp in inputs[1:]:
            for name, fn in steps.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn(inp)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                spent[name] += time.perf_counter() - start
    block_peak = meter.phases["timed steps (interleaved)"].peak_gb
    del meter.phases["timed steps (interleaved)"]
    for name, seconds in spent.items():
        meter.phases[name] = Phase(name, seconds, block_peak, opts.iterations * batch)
    inputs.clear()
    base_opt.state.clear()
    head.weight.grad = None

    # ---------------------------------------------------------------------------------- evaluation
    query, gallery = dataset["query"], dataset["gallery"]
    if opts.eval_people:
        keep = set(sorted(set(query["pid"]))[: opts.eval_people])
        query = query.select([i for i, p in enumerate(query["pid"]) if p in keep])
        gallery = gallery.select([i for i, p in enumerate(gallery["pid"]) if p in keep])
    with meter.phase("evaluation (query + gallery)", items=len(query) + len(gallery)):
        metrics = evaluate_reid_model(model, query, gallery, eval_collator, batch_size=eval_batch,
                                      num_workers=opts.workers, mixed_precision=mixed, progress=False)
    return report(meter, opts, args, mixed, len(query), len(gallery), metrics)


def report(meter: Meter, opts, args, mixed, num_query: int, num_gallery: int, metrics: dict) -> dict:
    p = meter.phases
    device_name = torch.cuda.get_device_name(meter.device) if meter.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    batch = args.pk_batch_size
    memory_kind = "CUDA max allocated" if meter.device.type == "cuda" else (
        "peak RSS" if meter.rss_resettable else "process peak RSS so far")
    print(f"\nPaper-scale dry run: {opts.backbone}, random init, 256x128, preset {PRESETS[opts.backbone]} "
          f"({args.optimizer}), precision {'fp32' if mixed == 'no' else mixed}, batch {batch} (P {args.num_identities_per_batch} x K "
          f"{args.num_instances}), {device_name}")
    print(f"{'phase':<62}{'seconds':>10}{'items':>8}{'ms/item':>10}{memory_kind:>24}")
    for phase in p.values():
        per = f"{1e3 * phase.seconds / phase.items:.1f}" if phase.items else ""
        print(f"{phase.name:<62}{phase.seconds:>10.2f}{phase.items or '':>8}{per:>10}{phase.peak_gb:>21.2f} GB")

    per_image_pass = p["train-set feature pass (cache / rebuild / association input)"]
    t_image = per_image_pass.seconds / per_image_pass.items
    t_prompt = p["stage 1: prompt steps"].seconds / opts.iterations
    t_icdl = p["stage 2 (ICDL) steps"].seconds / (opts.iterations * batch)  # per image
    t_ical = p["stage 3 (ICAL, adversarial + image-text) steps"].seconds / (opts.iterations * batch)
    t_base = p["plain CLIP fine-tune steps (CE head)"].seconds / (opts.iterations * batch)
    eval_phase = p["evaluation (query + gallery)"]
    t_eval_image = eval_phase.seconds / eval_phase.items
    print(f"\nstage-2/3 step throughput: ICDL {1 / t_icdl:.3g} img/s, ICAL {1 / t_ical:.3g} img/s, plain CLIP "
          f"fine-tune {1 / t_base:.3g} img/s  ->  images/s of the stage step / of the plain step: "
          f"{t_base / t_icdl:.2f}x (ICDL), {t_base / t_ical:.2f}x (ICAL)")

    projections = {}
    print("\nprojected full paper run on this device (60 prompt epochs, 80 x 200 iterations, "
          "80 rebuilds/associations, 3 evaluations):")
    for name, size in PAPER_SIZES.items():
        rebuild = p["memory rebuild (from the pass's features)"].seconds
        assoc = p["association + global memory (from the pass's features)"].seconds
        if name == "MSMT17":
            rebuild = p["memory rebuild at MSMT17 size (random features)"].seconds
            assoc = p["association at MSMT17 size (random features)"].seconds
        parts = {
            "stage 1 (cache + prompt steps)": size["train_images"] * t_image
            + PROMPT_EPOCHS * math.ceil(size["train_images"] / args.prompt_batch_size) * t_prompt,
            "per-epoch feature passes": LOOP_EPOCHS * size["train_images"] * t_image,
            "memory rebuilds + associations": ICDL_EPOCHS * rebuild + (LOOP_EPOCHS - ICDL_EPOCHS) * assoc,
            "stage-2/3 steps": ITERS * size["batch"] * (ICDL_EPOCHS * t_icdl + (LOOP_EPOCHS - ICDL_EPOCHS) * t_ical),
            "evaluations": EVALUATIONS * (size["query"] + size["gallery"]) * t_eval_image,
        }
        total = sum(parts.values())
        epoch = ITERS * size["batch"] * t_ical
        per_epoch_extra = size["train_images"] * t_image + assoc
        projections[name] = {**{k: v / 3600 for k, v in parts.items()}, "total_hours": total / 3600,
                             "rebuild_association_share_of_epoch": per_epoch_extra / epoch}
        detail = ", ".join(f"{k} {v / 3600:.1f} h" for k, v in parts.items())
        print(f"  {name:<12} {total / 3600:8.1f} h  ({detail}); feature pass + association = "
              f"{100 * per_epoch_extra / epoch:.0f}% of an ICAL epoch's steps")
    print("  (steps scaled linearly from the measured batch to the paper's P x K; data loading assumed hidden "
          "by loader workers)")
    result = {
        "backbone": opts.backbone, "device": device_name, "precision": "fp32" if mixed == "no" else mixed, "batch": batch,
        "phases": {k: {"seconds": v.seconds, "peak_gb": v.peak_gb, "items": v.items} for k, v in p.items()},
        "images_per_second": {"icdl": 1 / t_icdl, "ical": 1 / t_ical, "plain": 1 / t_base},
        "ratio_icdl_vs_plain": t_base / t_icdl, "ratio_ical_vs_plain": t_base / t_ical,
        "projected_hours": projections, "eval_images": {"query": num_query, "gallery": num_gallery},
        "random_init_metrics": {k: float(metrics[k]) for k in ("mAP", "rank1")},
    }
    if opts.output:
        Path(opts.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
