"""Render the Hub model card (`README.md` of an output folder) from the packaged `templates/model_card.md`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..tiny.pretraining import TINY_PRETRAINED_NAME

TEMPLATE_PATH = Path(__file__).parent.parent / "templates" / "model_card.md"

#: Hub dataset ids used in the card metadata (data, not code branches).
HUB_DATASETS = {
    "market1501": "market1501",
    "dukemtmc": "dukemtmc-reid",
    "msmt17": "msmt17",
}
DATASET_NAMES = {
    "market1501": "Market-1501",
    "dukemtmc": "DukeMTMC-reID",
    "msmt17": "MSMT17",
    "synthetic": "the embedded synthetic multi-camera dataset of ccafl-hf",
    "custom": "a custom multi-camera dataset",
}
METRIC_NAMES = {"mAP": "mAP", "rank1": "Rank-1", "rank5": "Rank-5", "rank10": "Rank-10", "mINP": "mINP"}


def _results_table(results: dict[str, Any]) -> str:
    stages = results.get("stages", {})
    header = "| stage | " + " | ".join(METRIC_NAMES.values()) + " |\n|---|" + "---|" * len(METRIC_NAMES) + "\n"
    rows = [
        f"| {stage} | " + " | ".join(f"{100 * metrics[k]:.1f}" for k in METRIC_NAMES) + " |"
        for stage, metrics in stages.items()
        if metrics
    ]
    if not rows:
        return "Not evaluated (the data had no query/gallery split)."
    return header + "\n".join(rows) + "\n\n(percent; the last row is the released model)"


def render_model_card(model, args, model_args, data_args, info, results: dict[str, Any],
                      repo_id: str | None = None) -> ModelCard:
    """A `huggingface_hub.ModelCard` with YAML metadata (library, tags, datasets, model-index with
    the measured metrics) and the training settings."""
    dataset = data_args.dataset
    dataset_name = DATASET_NAMES.get(dataset, dataset)
    repo_id = repo_id or args.hub_model_id or Path(args.output_dir).name
    eval_results = [
        EvalResult(
            task_type="image-feature-extraction", task_name="Person re-identification",
            dataset_type=HUB_DATASETS.get(dataset, dataset), dataset_name=dataset_name, dataset_split="query/gallery",
            metric_type=key.lower(), metric_name=name, metric_value=round(100 * float(results[key]), 2),
        )
        for key, name in METRIC_NAMES.items()
        if key in results
    ]
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag="image-feature-extraction",
        tags=["person-reid", "re-identification", "clip", "ccafl", "intra-camera-supervision", "ccafl-hf"],
        datasets=[HUB_DATASETS[dataset]] if dataset in HUB_DATASETS else None,
        model_name=repo_id,
        eval_results=eval_results,
        base_model=hub_base_model(model_args.model_name_or_path),
    )
    vision = model.config.vision_config
    architecture = (
        f"CLIP ViT (hidden {vision.hidden_size}, {vision.num_hidden_layers} layers, patch {vision.patch_size}) "
        f"from `{model_args.model_name_or_path}` with a BN-neck"
    ) if not model.config.is_resnet else (
        f"CLIP modified ResNet (blocks {list(vision.layers)}, width {vision.width}, last stride {vision.last_stride}) "
        f"from `{model_args.model_name_or_path}` with GeM pooling and a BN-neck"
    )
    settings = {
        key: getattr(args, key)
        for key in ("stages", "seed", "prompt_epochs", "prompt_batch_size", "icdl_epochs", "ical_epochs",
                    "iters_per_epoch", "num_identities_per_batch", "num_instances", "learning_rate", "weight_decay",
                    "memory_lambda", "association_rate", "adversarial_margin", "adversarial_start_epoch",
                    "adversarial_end_epoch", "use_memory_loss", "use_image_text_loss", "use_triplet_loss",
                    "use_adversarial_loss", "bf16", "fp16")
    }
    settings["preset"] = data_args.preset
    training_settings = "```json\n" + json.dumps(settings, indent=2) + "\n```"
    training_data = (
        f"{dataset_name}: {info.num_train_identities} intra-camera identities over {info.num_cameras} cameras "
        f"({info.num_train_images} training images). Only (camera, identity-within-camera) labels were used; "
        "cross-camera identity was never used for training."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=repo_id,
        repo_id=repo_id,
        architecture=architecture,
        image_size=f"{model.config.image_size[0]}×{model.config.image_size[1]}",
        reid_feature=model.config.reid_feature,
        feature_dim=model.reid_feature_dim,
        stages=", ".join(args.stages),
        training_data=training_data,
        training_settings=training_settings,
        results_table=_results_table(results),
        dataset_name=dataset_name,
    )


def hub_base_model(name: str) -> str | None:
    """``name`` when it is a Hub model id (the card's ``base_model``); None for the built-in tiny models
    and local folders, which the Hub could not link to."""
    if name in ("tiny", "tiny-rn50", TINY_PRETRAINED_NAME) or Path(name).exists():
        return None
    return name


__all__ = ["hub_base_model", "render_model_card"]
