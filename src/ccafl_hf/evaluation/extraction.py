"""Batched feature extraction: the one loop that turns images into features.

Used for evaluation, for the stage-1 feature cache, for rebuilding the ICDL camera memories and
for the ICAL association, and by the retrieval tools. Mixed precision, a progress bar, and under
several processes each rank embeds its share and the results are gathered in dataset order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..modeling_ccafl import CCAFLModel
from ..utils.precision import autocast_context

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionOptions:
    """How features are extracted: the one options object of every extraction (evaluation, the stage-1
    cache, the memory rebuild and association, the retrieval tools).

    Attributes:
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes.
        mixed_precision: ``"bf16"``/``"fp16"`` autocast, or None/``"no"``.
        flip: average each feature with the one of its horizontal flip (then renormalise).
        progress: show a progress bar (main process only).
    """

    batch_size: int = 128
    num_workers: int = 0
    mixed_precision: str | None = None
    flip: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}")


def _options(options: ExtractionOptions | None, overrides: dict) -> ExtractionOptions:
    """``options`` (default: `ExtractionOptions()`) with keyword overrides (the keywords of 0.2)."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ExtractionOptions)}
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    return dataclasses.replace(options or ExtractionOptions(), **overrides)


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
    options: ExtractionOptions | None = None,
    *,
    with_alignment: bool = False,
    accelerator=None,
    label_keys: Sequence[str] = ("camids", "pids", "intra_ids", "cam_pids"),
    desc: str = "Extracting features",
    **option_overrides,
) -> ExtractedFeatures:
    """Embed every item of ``dataset`` (eval mode; model mode restored afterwards).

    Args:
        model: the CCAFL model (may be wrapped by DDP; it is unwrapped).
        dataset: map-style dataset of rows understood by ``collate_fn`` (returns a dict with
            ``pixel_values [B, 3, H, W]`` and integer label tensors).
        options: batch size, workers, mixed precision, flip, progress (`ExtractionOptions`); its fields also
            work as keywords (``batch_size=64``). Under an ``accelerator`` its own autocast applies (a different
            explicit mixed precision is an error).
        accelerator: the run's `accelerate.Accelerator` (None: the current process state). With several
            processes each one embeds every num_processes-th batch and every process receives the full
            result, in dataset order (`Accelerator.gather_for_metrics`).
    Returns:
        [`ExtractedFeatures`] on the model's device.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import extract_model_from_parallel

    opts = _options(options, option_overrides)
    batch_size, num_workers, mixed_precision, flip, progress = (
        opts.batch_size, opts.num_workers, opts.mixed_precision, opts.flip, opts.progress)
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
    options: ExtractionOptions | None = None,
    *,
    rerank: bool = False,
    accelerator=None,
    **option_overrides,
) -> dict:
    """Market-1501-protocol metrics of ``model`` on a query/gallery pair (docs/method.md §1), features
    extracted with ``options`` (`ExtractionOptions`; its fields also work as keywords).

    Returns the dict of `ccafl_hf.evaluation.compute_reid_metrics` (``mAP``, ``rank1``, …, fractions).
    """
    from .ranking import compute_reid_metrics

    opts = _options(options, option_overrides)
    query = extract_features(model, query_dataset, collate_fn, opts, accelerator=accelerator, desc="Query features")
    gallery = extract_features(model, gallery_dataset, collate_fn, opts, accelerator=accelerator,
                               desc="Gallery features")
    return compute_reid_metrics(
        query.reid_features, gallery.reid_features, query.labels["pids"], gallery.labels["pids"],
        query.labels["camids"], gallery.labels["camids"], rerank=rerank,
    )

def evaluate_splits(
    model: CCAFLModel,
    splits: Mapping[str, Dataset] | None,
    collate_fn: Callable,
    options: ExtractionOptions | None = None,
    *,
    rerank: bool = False,
    accelerator=None,
    stage: str = "",
) -> dict[str, float]:
    """The one stage evaluation of training: `METRIC_KEYS` of ``model`` on ``splits["query"]`` /
    ``splits["gallery"]`` (floats), or ``{}`` with a warning when either split is missing or empty."""
    if not splits or len(splits.get("query", ())) == 0 or len(splits.get("gallery", ())) == 0:
        logger.warning("no query/gallery split: skipping the evaluation%s", f" after {stage}" if stage else "")
        return {}
    metrics = evaluate_reid_model(model, splits["query"], splits["gallery"], collate_fn, options, rerank=rerank,
                                  accelerator=accelerator)
    return {k: float(metrics[k]) for k in METRIC_KEYS}


__all__ = ["METRIC_KEYS", "ExtractedFeatures", "ExtractionOptions", "evaluate_reid_model", "evaluate_splits",
           "extract_features"]
