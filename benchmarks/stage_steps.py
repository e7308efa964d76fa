"""ICDL / ICAL step time against a plain classification step (issues 6 and 7 targets).

All in one run, same batch, same model (CLIP ViT-B/16 architecture, random init, 256×128, batch 32):

* baseline: vision tower forward + backward with a linear cross-entropy head, Adam step;
* ICDL step: `CCAFLForTraining` forward with every stage-2 loss of `ICDLObjective` (camera memories
  with N identities, image–text, triplets, per-camera reduction), backward, Adam step, memory update,
  and the global-ID classifier's own Adam step; target ICDL / baseline <= 1.10;
* ICAL step with vs without the adversarial loss and the classifier; target overhead <= 5 %.

    python benchmarks/stage_steps.py            # ViT-B/16 (slow on 2 CPU cores: a few minutes)
    python benchmarks/stage_steps.py --backbone rn50   # CLIP RN50, last stride 1, GeM (the paper's tower)
    python benchmarks/stage_steps.py --quick    # tiny model (--backbone rn50: the tiny ResNet)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ccafl_hf import CCAFLConfig, CCAFLModel, create_tiny_model
from ccafl_hf.trainers import (
    CCAFLForTraining,
    CCAFLTrainingArguments,
    ICALObjective,
    ICDLObjective,
    set_image_stage_trainable,
)


def _interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median time of each function, the functions taking turns (fair on a noisy, shared machine)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backbone", choices=["vit", "rn50"], default="vit")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_identities", type=int, default=3262)
    parser.add_argument("--num_cameras", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 gives stable ratios on a shared machine: with other jobs on the "
                             "cores, multi-threaded small ops stall far more than large ones)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        model, _ = create_tiny_model(backbone=args.backbone)
    elif args.backbone == "rn50":
        model = CCAFLModel(CCAFLConfig(vision_config={"model_type": "ccafl_resnet_vision"}, projection_dim=1024,
                                       image_size=(256, 128)))
    else:
        model = CCAFLModel(CCAFLConfig(
            vision_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                           "patch_size": 16, "intermediate_size": 3072},
            projection_dim=512, image_size=(256, 128),
        ))
    set_image_stage_trainable(model)
    model.train()
    n, b = args.num_identities, args.batch_size
    identity_camids = torch.arange(n) * args.num_cameras // n
    training_args = CCAFLTrainingArguments(output_dir="/tmp/ccafl-bench", memory_instances=32, report_to="none")
    text = F.normalize(torch.randn(n, model.projection_dim), dim=1)
    module = CCAFLForTraining(model, identity_camids, text, memory_instances=training_args.memory_instances)
    dim = model.reid_feature_dim
    module.camera_memory.initialize(F.normalize(torch.randn(4 * n, dim), dim=1), torch.arange(n).repeat(4))
    # ICAL state: pairs of identities from different cameras form pseudo-identities
    pseudo = torch.full((n,), -1)
    half = n // 2
    pseudo[:half] = torch.arange(half)
    pseudo[half:2 * half] = torch.arange(half)
    module.set_pseudo_labels(pseudo, F.normalize(torch.randn(n, dim), dim=1), torch.arange(n))  # an image each

    pixels = torch.randn(b, 3, *model.config.image_size)
    intra_ids = torch.randint(0, half, (b // 4,)).repeat_interleave(4)
    camids = identity_camids[intra_ids]

    head = torch.nn.Linear(model.vision_embed_dim, n)
    base_params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    base_opt = torch.optim.Adam(base_params, lr=1e-5)

    def baseline() -> None:
        pooled = model.get_reid_outputs(pixels).pooled_features
        loss = F.cross_entropy(head(pooled), intra_ids)
        base_opt.zero_grad(set_to_none=True)
        loss.backward()
        base_opt.step()

    opt = torch.optim.Adam([p for p in module.model.parameters() if p.requires_grad], lr=1e-5)
    classifier_opt = torch.optim.Adam(module.classifier.parameters(), lr=3.5e-4, weight_decay=5e-4)
    icdl, ical = ICDLObjective.from_config(training_args), ICALObjective.from_config(training_args)

    def configured(objective, epoch: int, classifier: bool):
        def step() -> None:
            out = module(pixel_values=pixels)
            loss = sum(objective.losses(module, out, intra_ids, camids, epoch).values())
            features = out.reid_features.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            objective.update_memories(module, features, intra_ids)
            if classifier:  # the trainer's classifier step: its own Adam on the detached features
                loss = module.classifier.classification_loss(features, intra_ids)
                classifier_opt.zero_grad(set_to_none=True)
                loss.backward()
                classifier_opt.step()
        return step

    image_text_epoch = training_args.ical_image_text_start_epoch
    adversarial_epoch = training_args.adversarial_start_epoch
    medians = _interleaved_medians(
        {
            "baseline": baseline,
            "icdl": configured(icdl, 0, True),
            "ical_plain": configured(ical, image_text_epoch, False),
            "ical_adv": configured(ical, adversarial_epoch, True),
        },
        args.repeats,
    )
    t_base, t_icdl, t_ical_plain, t_ical_adv = (medians[k] for k in ("baseline", "icdl", "ical_plain", "ical_adv"))
    print(f"baseline (vision fwd+bwd + CE head): {t_base * 1e3:.0f} ms")
    print(f"ICDL step: {t_icdl * 1e3:.0f} ms  ->  ratio ICDL / baseline = {t_icdl / t_base:.3f}  (target <= 1.10)")
    print(f"ICAL step without / with adversarial + classifier: {t_ical_plain * 1e3:.0f} / {t_ical_adv * 1e3:.0f} ms"
          f"  ->  overhead {100 * (t_ical_adv / t_ical_plain - 1):+.1f} %  (target <= 5 %)")


if __name__ == "__main__":
    main()
