"""What a run is made of: the model and data arguments, the model to start from, the dataset, and
every resolved setting."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import CLIPProcessor

from ..data import (
    dataset_summary,
    load_reid_dataset,
)
from ..errors import CCAFLError
from ..modeling_ccafl import CCAFLModel
from ..processing import build_reid_processor, load_tokenizer
from ..tiny import TINY_MODELS, create_tiny_model
from ..tiny.pretraining import TINY_PRETRAINED_NAME, load_tiny_pretrained
from ..trainers import (
    CCAFLTrainingArguments,
)
from ..utils.model_files import ModelFolderError, check_model_folder, load_checked

logger = logging.getLogger(__name__)

@dataclass
class ModelArguments:
    """Which model to start from."""

    model_name_or_path: str = field(
        default="tiny",
        metadata={"help": "'tiny' (random tiny CLIP, tests), 'tiny-pretrained' (the tiny CLIP pre-trained on "
                          "captioned synthetic people, weights shipped with the package: the demo), a CLIP checkpoint "
                          "(Hub id or folder, e.g. openai/clip-vit-base-patch16) or a saved CCAFL model folder."},
    )
    image_size: list[int] | None = field(
        default=None, metadata={"help": "ReID input as HEIGHT WIDTH (default 256 128; the tiny model: 64 32)."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "JSON dict of config fields for a model built from scratch ('tiny' only), e.g. "
                          "'{\"vision_config\": {\"patch_size\": 4}}' (the demo preset's finer patch grid)."},
    )

    def __post_init__(self):
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise RunError(f"--image_size takes HEIGHT WIDTH (two integers >= 1), got {self.image_size}")
        _json_object(self.config_overrides, "--config_overrides")


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    dataset: str = field(
        default="synthetic", metadata={"help": "A ccafl_hf.data.available_datasets() reader, e.g. synthetic, "
                                               "market1501, custom or hf (🤗 datasets: see --data_dir)."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "Dataset folder or file (optional for synthetic); "
                                                         "for hf a Hub dataset id, save_to_disk folder or parquet."})
    dataset_options: str = field(
        default="{}", metadata={"help": "JSON dict of reader options, e.g. '{\"num_identities\": 40}' for synthetic."}
    )
    preset: str = field(default="demo", metadata={"help": "Packaged hyper-parameter preset (ccafl_hf/presets/*.json)."})

    def __post_init__(self):
        from ..data.datasets.base import get_reader

        get_reader(self.dataset)  # an unknown name: one line listing the known ones
        _json_object(self.dataset_options, "--dataset_options")


class RunError(CCAFLError):
    """A problem with the run's arguments or output folder (reported as one line by the script)."""


# ------------------------------------------------------------------------------------------ model
def build_model(model_args: ModelArguments, seed: int = 0) -> tuple[CCAFLModel, CLIPProcessor]:
    """The model and processor to start from: tiny preset (randomly initialised from ``seed``), the
    pre-trained tiny CLIP (`ccafl_hf.tiny.pretraining`, shipped weights), a CLIP checkpoint (converted)
    or a CCAFL one."""
    size = tuple(model_args.image_size) if model_args.image_size else None
    if size is not None and len(size) != 2:
        raise RunError(f"--image_size takes HEIGHT WIDTH, got {model_args.image_size}")
    name = model_args.model_name_or_path
    overrides = _config_overrides(model_args.config_overrides)
    if name in TINY_MODELS:
        try:
            return create_tiny_model(seed=seed, backbone=TINY_MODELS[name],
                                     **{**overrides, **({"image_size": size} if size else {})})
        except (TypeError, ValueError) as error:
            raise RunError(f"--config_overrides {model_args.config_overrides}: {error}") from None
    if overrides:
        raise RunError(f"--config_overrides only applies to a model built from scratch (tiny), not {name}")
    if name == TINY_PRETRAINED_NAME:
        model, processor = load_tiny_pretrained()
        if size and tuple(model.config.image_size) != size:
            raise RunError(f"{name} runs at {tuple(model.config.image_size)}, not --image_size {size}")
        return model, processor
    check_model_folder(name, "--model_name_or_path")  # bad JSON, pickle-only, cut-off safetensors: one line
    config_file = Path(name) / "config.json"
    is_ccafl = config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "ccafl"
    if is_ccafl:
        model = load_checked(name, lambda: CCAFLModel.from_pretrained(name), "--model_name_or_path")
        if size and tuple(model.config.image_size) != size:
            raise RunError(f"{name} runs at {model.config.image_size}; --image_size {size} would need a new conversion")
    else:
        try:
            model = load_checked(name, lambda: CCAFLModel.from_clip(name, image_size=size or (256, 128)),
                                 "--model_name_or_path")
        except ModelFolderError:
            raise
        except ValueError as error:  # a pickled checkpoint, another architecture, an image size that does not fit
            raise RunError(f"--model_name_or_path {name}: {error}") from None
    tokenizer = load_tokenizer(model_args.tokenizer_name or name)
    return model, build_reid_processor(model.config, tokenizer)


def _config_overrides(value: str | dict | None) -> dict[str, Any]:
    return _json_object(value, "--config_overrides")


def _json_object(value: str | dict | None, flag: str) -> dict[str, Any]:
    """``value`` (JSON text or a dict) as a dict; anything else is a `RunError` naming ``flag``."""
    if not value:
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as error:
        raise RunError(f"{flag} must be a JSON object, e.g. '{{\"key\": 1}}': {error}") from None
    if not isinstance(parsed, dict):
        raise RunError(f"{flag} must be a JSON object, e.g. '{{\"key\": 1}}', got {value!r}")
    return parsed


# ----------------------------------------------------------------------------------- output folder
def resolved_settings(model_args, data_args, args: CCAFLTrainingArguments) -> dict[str, Any]:
    """Every setting of a run after preset + flags, JSON-ready: ``{"model": …, "data": …, "training": …}``
    (tokens redacted as `TrainingArguments.to_dict` does). Unlike the run's fingerprint
    (`ccafl_hf.pipeline.run_directory.run_settings`) this includes the run-only settings (logging, paths, workers)."""
    return json.loads(json.dumps(
        {"model": asdict(model_args), "data": asdict(data_args), "training": args.to_dict()}, default=str))


def _load_dataset(data_args: DataArguments):
    options = _json_object(data_args.dataset_options, "--dataset_options")
    dataset = load_reid_dataset(data_args.dataset, data_args.data_dir, **options)
    info = dataset_summary(dataset)
    if info.num_cameras < 2:
        raise RunError(f"{data_args.dataset}: the train split has one camera; cross-camera learning needs >= 2")
    return dataset, info


