"""Batched feature extraction: the one loop that turns images into features.

Used for evaluation, for the stage-1 feature cache, for rebuilding the ICDL camera memories and
for the ICAL association, and by the retrieval tools. Mixed precision, a progress bar, and under
several processes each rank embeds its share and the results are gathered in dataset order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..modeling_ccafl import CCAFLModel

logger = logging.getLogger(__name__)


@dataclass
class ExtractedFeatures:
    """Features of a dataset, in dataset order.

    Attributes:
        reid_features: ``[M, D]`` L2-normalised retrieval features (fp32).
        alignment_features: ``[M, P]`` projected alignment features (fp32), if requested.
        labels: other integer columns collated by the collator (e.g. ``camids``, ``pids``, ``intra_ids``), ``[M]`` each.
    """

    reid_features: torch.Tensor
    alignment_features: torch.Tensor | None
    labels: dict[str, torch.Tensor]


def autocast_context(device: torch.device, mixed_precision: str | None):
    """`torch.autocast` for ``mixed_precision`` in {"bf16", "fp16", None/"no"} on ``device``."""
    if mixed_precision in (None, "no", "fp32"):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16  # fp16 autocast on CPU is slow and poorly supported
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def extract_features(
    model: CCAFLModel,
    dataset: Dataset,
    collate_fn: Callable,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    mixed_precision: str | None = None,
    flip: bool = False,
    with_alignment: bool = False,
    accelerator=None,
    label_keys: Sequence[str] = ("camids", "pids", "intra_ids", "cam_pids"),
    desc: str = "Extracting features",
    progress: bool = True,
) -> ExtractedFeatures:
    """Embed every item of ``dataset`` (eval mode; model mode restored afterwards).

    Args:
        model: the CCAFL model (may be wrapped by DDP; it is unwrapped).
        dataset: map-style dataset of rows understood by ``collate_fn`` (returns a dict with
            ``pixel_values [B, 3, H, W]`` and integer label tensors).
        flip: average the features of the image and its horizontal flip (then renormalise).
        accelerator: an `accelerate.Accelerator` or `PartialState` (None: the current state); with
            several processes each rank embeds a contiguous share and all ranks receive the full result.
    Returns:
        [`ExtractedFeatures`] on the model's device.
    """
    from accelerate import PartialState
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    device = model.device
    total = len(dataset)
    state = accelerator if accelerator is not None else PartialState()
    world, rank = state.num_processes, state.process_index
    share = -(-total // world)
    start, stop = min(rank * share, total), min((rank + 1) * share, total)
    subset = dataset if world == 1 else Subset(dataset, range(start, stop))
    # an own generator: creating the iterator must not consume the global RNG (exact resume)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn,
                        generator=torch.Generator())

    was_training = model.training
    model.eval()
    reid, align, labels = [], [], {}
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress or rank != 0, leave=False):
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            with autocast_context(device, mixed_precision):
                out = model.get_reid_outputs(pixels)
                feats, aligned = out.reid_features.float(), out.alignment_features.float()
                if flip:
                    out_f = model.get_reid_outputs(pixels.flip(-1))
                    feats = torch.nn.functional.normalize(feats + out_f.reid_features.float(), dim=-1)
                    aligned = (aligned + out_f.alignment_features.float()) / 2
            reid.append(feats)
            if with_alignment:
                align.append(aligned)
            for key in label_keys:
                if key in batch:
                    labels.setdefault(key, []).append(batch[key].to(device))
    finally:
        model.train(was_training)

    dim = model.reid_feature_dim
    reid_t = torch.cat(reid) if reid else torch.zeros(0, dim, device=device)
    align_t = torch.cat(align) if align else None
    labels_t = {k: torch.cat(v) for k, v in labels.items()}
    if world > 1:
        reid_t = _gather_rows(reid_t, total, share)
        align_t = _gather_rows(align_t, total, share) if with_alignment else None
        labels_t = {k: _gather_rows(v, total, share) for k, v in labels_t.items()}
    return ExtractedFeatures(reid_t, align_t, labels_t)


def _gather_rows(rows: torch.Tensor, total: int, share: int) -> torch.Tensor:
    """Gather per-rank contiguous shares (padded to ``share`` rows) back into ``[total, ...]``."""
    from accelerate.utils import gather

    if rows.shape[0] < share:
        pad = torch.zeros(share - rows.shape[0], *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        rows = torch.cat([rows, pad])
    gathered = gather(rows.contiguous())
    return gathered[:total]  # only trailing ranks are short, so the padding sits at the end





METRIC_KEYS = ("mAP", "rank1", "rank5", "rank10", "mINP")


def evaluate_reid_model(
    model: CCAFLModel,
    query_dataset: Dataset,
    gallery_dataset: Dataset,
    collate_fn: Callable,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    mixed_precision: str | None = None,
    flip: bool = False,
    rerank: bool = False,
    accelerator=None,
    progress: bool = True,
) -> dict:
    """Market-1501-protocol metrics of ``model`` on a query/gallery pair (docs/method.md §1).

    Returns the dict of `ccafl_hf.evaluation.compute_reid_metrics` (``mAP``, ``rank1``, …, fractions).
    """
    from .ranking import compute_reid_metrics

    common = dict(batch_size=batch_size, num_workers=num_workers, mixed_precision=mixed_precision, flip=flip,
                  accelerator=accelerator, progress=progress)
    query = extract_features(model, query_dataset, collate_fn, desc="Query features", **common)
    gallery = extract_features(model, gallery_dataset, collate_fn, desc="Gallery features", **common)
    return compute_reid_metrics(
        query.reid_features, gallery.reid_features, query.labels["pids"], gallery.labels["pids"],
        query.labels["camids"], gallery.labels["camids"], rerank=rerank,
    )
__all__ = ["METRIC_KEYS", "ExtractedFeatures", "autocast_context", "evaluate_reid_model", "extract_features"]
