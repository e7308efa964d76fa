"""Batched feature extraction: the one loop that turns images into features.

Used for evaluation, for the stage-1 feature cache, for rebuilding the ICDL camera memories and
for the ICAL association, and by the retrieval tools. Mixed precision, a progress bar, and under
several processes each rank embeds its share and the results are gathered in dataset order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..modeling_ccafl import CCAFLModel
from ..utils.precision import autocast_context

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
        mixed_precision: ``"bf16"``/``"fp16"`` autocast, or None/``"no"``; under an ``accelerator`` its own
            autocast applies (a different explicit value is an error).
        accelerator: the run's `accelerate.Accelerator` (None: the current process state). With several
            processes each one embeds every num_processes-th batch and every process receives the full
            result, in dataset order (`Accelerator.gather_for_metrics`).
    Returns:
        [`ExtractedFeatures`] on the model's device.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    device = model.device
    # an own generator: creating the iterator must not consume the global RNG (exact resume)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn,
                        generator=torch.Generator())
    sharded = (accelerator if accelerator is not None else PartialState()).num_processes > 1
    if sharded:
        # as the Trainer evaluates: each process embeds every num_processes-th batch, and gather_for_metrics
        # returns each step's batches in dataset order, without the samples repeated to even out the shares
        if not isinstance(accelerator, Accelerator):
            accelerator = Accelerator()
        loader = accelerator.prepare_data_loader(loader, device_placement=False)
    if isinstance(accelerator, Accelerator):
        if mixed_precision not in (None, "no", accelerator.mixed_precision):
            raise ValueError(f"mixed_precision={mixed_precision!r} contradicts the Accelerator's "
                             f"{accelerator.mixed_precision!r}")
        autocast = accelerator.autocast
    else:
        def autocast():
            return autocast_context(device, mixed_precision)

    was_training = model.training
    model.eval()
    reid, align, labels = [], [], {}
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress or not PartialState().is_main_process, leave=False):
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            with autocast():
                out = model.get_reid_outputs(pixels)
                feats, aligned = out.reid_features.float(), out.alignment_features.float()
                if flip:
                    out_f = model.get_reid_outputs(pixels.flip(-1))
                    feats = torch.nn.functional.normalize(feats + out_f.reid_features.float(), dim=-1)
                    aligned = (aligned + out_f.alignment_features.float()) / 2
            step = {"reid": feats, **{key: batch[key].to(device) for key in label_keys if key in batch}}
            if with_alignment:
                step["align"] = aligned
            if sharded:
                step = accelerator.gather_for_metrics(step)
            reid.append(step.pop("reid"))
            if with_alignment:
                align.append(step.pop("align"))
            for key, value in step.items():
                labels.setdefault(key, []).append(value)
    finally:
        model.train(was_training)

    dim = model.reid_feature_dim
    reid_t = torch.cat(reid) if reid else torch.zeros(0, dim, device=device)
    align_t = torch.cat(align) if align else None
    return ExtractedFeatures(reid_t, align_t, {k: torch.cat(v) for k, v in labels.items()})


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

__all__ = ["METRIC_KEYS", "ExtractedFeatures", "evaluate_reid_model", "extract_features"]
