"""Stage-1 step time vs the bare text tower (issue 5 target: ratio <= 1.2).

Both are measured in one run on the same prompts: (a) one full PromptLearningTrainer-style step on
cached features (prompt splice, text tower forward + backward, per-camera losses, Adam step) and
(b) the text tower's forward + backward on the same prompt embeddings alone.

    python benchmarks/prompt_learning.py            # CLIP ViT-B/16 text tower (random init), batch 64
    python benchmarks/prompt_learning.py --quick    # tiny model
"""

from __future__ import annotations

import argparse
import time

import torch

from ccafl_hf import CCAFLConfig, CCAFLModel, build_tiny_tokenizer, create_tiny_model
from ccafl_hf.losses import prompt_contrastive_loss
from ccafl_hf.prompts import IdentityPromptLearner


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_identities", type=int, default=3262)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.quick:
        model, processor = create_tiny_model()
        tokenizer = processor.tokenizer
    else:
        tokenizer = build_tiny_tokenizer()
        config = CCAFLConfig(
            text_config={"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                         "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
            vision_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 16,
                           "intermediate_size": 3072},
            projection_dim=512, image_size=(256, 128),
        )
        model = CCAFLModel(config)
    model.eval().requires_grad_(False)
    learner = IdentityPromptLearner(model, tokenizer, args.num_identities)
    optimizer = torch.optim.Adam(learner.parameters(), lr=3.5e-4, weight_decay=1e-4)
    dim = model.config.projection_dim
    images = torch.randn(args.batch_size, dim)
    intra_ids = torch.randint(0, args.num_identities, (args.batch_size,))
    camids = intra_ids * 6 // args.num_identities

    def stage1_step() -> None:
        text = learner(intra_ids)
        loss = prompt_contrastive_loss(images, text, intra_ids, camids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    embeds = learner.prompt_embeddings(intra_ids).detach().requires_grad_(True)
    eot = torch.full((args.batch_size,), learner.eot_position)

    def text_tower() -> None:
        embeds.grad = None
        model.encode_prompt_embeddings(embeds, eot).sum().backward()

    tower = _time(text_tower, args.repeats)
    step = _time(stage1_step, args.repeats)
    print(f"text tower fwd+bwd: {tower * 1e3:.1f} ms   stage-1 step: {step * 1e3:.1f} ms")
    print(f"ratio stage-1 step / text tower = {step / tower:.3f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
