"""Stage 2 — ICDL: intra-camera discriminative learning (METHOD.md §4)."""

from __future__ import annotations

import logging

import torch

from ..inference import extract_features
from .base import CCAFLStageTrainer

logger = logging.getLogger(__name__)


class ICDLTrainer(CCAFLStageTrainer):
    """Trains the image tower and neck with per-camera hybrid memories, hard-sample contrast,
    intra-camera image–text alignment and triplet losses; the camera memories are rebuilt from
    freshly extracted features at the start of every epoch and updated after every step."""

    stage = "icdl"

    def prepare_epoch(self, epoch: int, resumed_mid_epoch: bool) -> None:
        super().prepare_epoch(epoch, resumed_mid_epoch)
        module = self.accelerator.unwrap_model(self.model)
        module.stage = self.stage
        args = self.args
        module.switches.memory = args.use_memory_loss
        module.switches.image_text = args.use_image_text_loss
        module.switches.triplet = args.use_triplet_loss
        module.switches.adversarial = False
        if resumed_mid_epoch:
            logger.info("ICDL: resumed inside epoch %d, keeping the checkpointed camera memories", epoch)
            return
        extracted = extract_features(
            module.model, self.train_dataset, self.eval_collator, batch_size=args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers, mixed_precision=_mixed_precision(args),
            accelerator=self.accelerator, desc=f"ICDL epoch {self.loop_epoch}: memory features",
        )
        generator = torch.Generator(device="cpu").manual_seed(args.seed * 1000 + self.loop_epoch)
        module.camera_memory.initialize(extracted.reid_features, extracted.labels["intra_ids"], generator=generator)


def _mixed_precision(args) -> str | None:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else None


__all__ = ["ICDLTrainer"]
