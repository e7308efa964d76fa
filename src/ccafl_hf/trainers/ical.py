"""Stage 3 — ICAL: inter-camera adversarial learning (METHOD.md §5)."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast

from ..association import associate_across_cameras, association_diagnostics
from ..inference import extract_features
from .base import CCAFLStageTrainer
from .icdl import _mixed_precision

logger = logging.getLogger(__name__)


def camera_centered(features: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
    """Subtract each camera's mean row from ``features [N, D]`` (cameras ``[N]``) and L2-normalise."""
    cameras = cameras.long().to(features.device)
    num_cameras = int(cameras.max()) + 1
    sums = torch.zeros(num_cameras, features.shape[1], device=features.device, dtype=features.dtype)
    sums.index_add_(0, cameras, features)
    counts = torch.bincount(cameras, minlength=num_cameras).clamp_min(1).to(features.dtype)
    return F.normalize(features - (sums / counts[:, None])[cameras], dim=1)


def identity_mean_features(features: torch.Tensor, intra_ids: torch.Tensor, num_identities: int) -> torch.Tensor:
    """L2-normalised mean feature ``[N, D]`` of each intra-camera identity from image features ``[M, D]``."""
    sums = torch.zeros(num_identities, features.shape[1], device=features.device, dtype=torch.float32)
    sums.index_add_(0, intra_ids.long(), features.float())
    return F.normalize(sums, dim=1)


class ICALTrainer(CCAFLStageTrainer):
    """Re-associates identities across cameras at the start of every epoch (pseudo-labels live in a
    buffer indexed by intra-camera identity, so the dataloader is never rebuilt) and trains with the
    global memory, triplet, inter-camera image–text and camera-adversarial losses.

    Args:
        diagnostic_pids: ``[N]`` ground-truth person id of each intra-camera identity, used **only**
            to log association precision/purity; never seen by the losses.
    """

    stage = "ical"

    def __init__(self, *args, diagnostic_pids: np.ndarray | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.diagnostic_pids = diagnostic_pids
        self.association_log: list[dict] = []

    def prepare_epoch(self, epoch: int, resumed_mid_epoch: bool) -> None:
        super().prepare_epoch(epoch, resumed_mid_epoch)
        module = self.accelerator.unwrap_model(self.model)
        module.stage = self.stage
        args = self.args
        loop_epoch = self.loop_epoch
        module.switches.memory = args.use_memory_loss
        module.switches.triplet = args.use_triplet_loss
        module.switches.image_text = args.use_image_text_loss and loop_epoch >= args.ical_image_text_start_epoch
        module.switches.adversarial = (
            args.use_adversarial_loss and args.adversarial_start_epoch <= loop_epoch <= args.adversarial_end_epoch
        )
        if resumed_mid_epoch:
            logger.info("ICAL: resumed inside epoch %d, keeping the checkpointed pseudo-labels and memory", epoch)
            return
        self.associate(module)

    @torch.no_grad()
    def associate(self, module) -> np.ndarray:
        """Extract features, average per identity, associate across cameras (main process), broadcast."""
        args = self.args
        num_identities = module.identity_camids.numel()
        extracted = extract_features(
            module.model, self.train_dataset, self.eval_collator, batch_size=args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers, mixed_precision=_mixed_precision(args),
            accelerator=self.accelerator, desc=f"ICAL epoch {self.loop_epoch}: association features",
        )
        identity_features = identity_mean_features(extracted.reid_features, extracted.labels["intra_ids"], num_identities)
        labels = torch.full((num_identities,), -1, dtype=torch.long, device=identity_features.device)
        pairs = None
        if self.accelerator.is_main_process:
            num_pairs = int(round(args.association_rate * num_identities))
            search_features = (
                camera_centered(identity_features, module.identity_camids)
                if args.association_camera_centering
                else identity_features
            )
            result, pairs = associate_across_cameras(
                search_features, module.identity_camids.cpu().numpy(), num_pairs, return_pairs=True
            )
            labels = torch.as_tensor(result, dtype=torch.long, device=identity_features.device)
        labels = broadcast(labels, from_process=0)
        module.set_pseudo_labels(labels, identity_features)
        labels_np = labels.cpu().numpy()
        record = {"loop_epoch": self.loop_epoch, "num_clusters": int(labels_np.max() + 1) if labels_np.size else 0,
                  "num_associated": int((labels_np >= 0).sum())}
        if self.diagnostic_pids is not None and self.accelerator.is_main_process:
            record.update(association_diagnostics(labels_np, self.diagnostic_pids, pairs=pairs))
        self.association_log.append(record)
        logger.info("ICAL association (diagnostics only): %s", record)
        if self.accelerator.is_main_process:
            self.log({f"assoc_{k}": v for k, v in record.items() if k != "loop_epoch" and isinstance(v, int | float)})
        return labels_np


__all__ = ["ICALTrainer", "camera_centered", "identity_mean_features"]
