"""The main job: the three CCAFL stages end to end, with evaluation, artifacts, resume and Hub push.

`scripts/train.py` only parses arguments (presets + flags) and calls `run_training`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from transformers import CLIPProcessor, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .data import (
    ReIDCollator,
    build_eval_transform,
    build_train_transform,
    dataset_summary,
    load_reid_dataset,
)
from .evaluation import METRIC_KEYS, evaluate_reid_model
from .modeling_ccafl import CCAFLModel
from .processing import build_reid_processor, load_tokenizer
from .prompts import IdentityPromptLearner, load_text_features, save_text_features
from .tiny import TINY_MODELS, create_tiny_model
from .tiny.pretraining import TINY_PRETRAINED_NAME, load_tiny_pretrained
from .trainers import (
    CCAFLForTraining,
    CCAFLTrainer,
    CCAFLTrainingArguments,
    FeatureCache,
    PromptLearningTrainer,
)
from .trainers.base import IMAGE_STAGES

logger = logging.getLogger(__name__)

RUN_FILE = "ccafl_run.json"
EVAL_FILE = "eval_results.json"
TEXT_FEATURES_FILE = "text_features.safetensors"
ADAPTER_DIR = "prompt_adapter"
STATE_FILE = "training_state.safetensors"
LOOP_CHECKPOINTS = "icdl_ical"  # checkpoints of the stage-2/3 loop: output_dir/checkpoints/icdl_ical
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


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


class RunError(ValueError):
    """A problem with the run's arguments or output folder (reported as one line by the script)."""


# ------------------------------------------------------------------------------------------ model
def build_model(model_args: ModelArguments, seed: int = 0) -> tuple[CCAFLModel, CLIPProcessor]:
    """The model and processor to start from: tiny preset (randomly initialised from ``seed``), the
    pre-trained tiny CLIP (`ccafl_hf.pretraining`, shipped weights), a CLIP checkpoint (converted)
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
    config_file = Path(name) / "config.json"
    is_ccafl = config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "ccafl"
    if is_ccafl:
        model = CCAFLModel.from_pretrained(name)
        if size and tuple(model.config.image_size) != size:
            raise RunError(f"{name} runs at {model.config.image_size}; --image_size {size} would need a new conversion")
    else:
        try:
            model = CCAFLModel.from_clip(name, image_size=size or (256, 128))
        except ValueError as error:  # a pickled checkpoint, another architecture, an image size that does not fit
            raise RunError(f"--model_name_or_path {name}: {error}") from None
    tokenizer = load_tokenizer(model_args.tokenizer_name or name)
    return model, build_reid_processor(model.config, tokenizer)


def _config_overrides(value: str | dict | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        overrides = json.loads(value) if isinstance(value, str) else dict(value)
    except json.JSONDecodeError as error:
        raise RunError(f"--config_overrides must be a JSON object: {error}") from None
    if not isinstance(overrides, dict):
        raise RunError(f"--config_overrides must be a JSON object, got {value!r}")
    return overrides


# ----------------------------------------------------------------------------------- output folder
def _run_fingerprint(model_args, data_args, args: CCAFLTrainingArguments) -> dict[str, Any]:
    keys = ("stages", "seed", "prompt_epochs", "icdl_epochs", "ical_epochs", "iters_per_epoch",
            "num_identities_per_batch", "num_instances", "learning_rate")
    return {"model": asdict(model_args), "data": asdict(data_args), "training": {k: getattr(args, k) for k in keys}}


SETTINGS_FILE = "resolved_settings.json"  # every resolved setting of the run, written at its start


def resolved_settings(model_args, data_args, args: CCAFLTrainingArguments) -> dict[str, Any]:
    """Every setting of a run after preset + flags, JSON-ready: ``{"model": …, "data": …, "training": …}``
    (tokens redacted as `TrainingArguments.to_dict` does)."""
    return json.loads(json.dumps(
        {"model": asdict(model_args), "data": asdict(data_args), "training": args.to_dict()}, default=str))


def prepare_output_dir(model_args, data_args, args: CCAFLTrainingArguments) -> bool:
    """Check the output folder; return True when a previous run of the same settings is resumed.

    Refuses (RunError) a folder that holds another run's checkpoints unless ``--overwrite_output_dir``.
    """
    out = Path(args.output_dir)
    run_file = out / RUN_FILE
    fingerprint = _run_fingerprint(model_args, data_args, args)
    has_run = run_file.is_file() or (out / "checkpoints").is_dir()
    if has_run and args.overwrite_output_dir:
        return False
    if not has_run:
        return False
    previous = json.loads(run_file.read_text()) if run_file.is_file() else None
    if previous == json.loads(json.dumps(fingerprint)) or args.resume_from_checkpoint:
        return True
    raise RunError(
        f"--output_dir {out} holds another run's checkpoints (different settings); pass --overwrite_output_dir "
        "to replace it, --resume_from_checkpoint to continue it, or choose another --output_dir"
    )


# --------------------------------------------------------------------------------------- training
def run_training(
    model_args: ModelArguments, data_args: DataArguments, args: CCAFLTrainingArguments
) -> dict[str, Any]:
    """Run the requested stages (resuming what a previous run of the same settings left) and write
    the model, processor, prompt adapter, text features, ``eval_results.json`` and model card.

    ``--torch_num_threads`` applies for the run only: the caller's thread count is restored after.
    Returns the content of ``eval_results.json``.
    """
    threads = torch.get_num_threads()
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    try:
        return _run_stages(model_args, data_args, args)
    finally:
        torch.set_num_threads(threads)


def _run_stages(model_args: ModelArguments, data_args: DataArguments, args: CCAFLTrainingArguments) -> dict[str, Any]:
    device = args.device  # sets up the (distributed) state of this process
    process = PartialState()
    resuming = prepare_output_dir(model_args, data_args, args)
    explicit = _explicit_checkpoint(args)  # a bad checkpoint path fails before any work
    out = Path(args.output_dir)
    if process.is_main_process:
        if args.overwrite_output_dir and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(_run_fingerprint(model_args, data_args, args), indent=2))
        (out / SETTINGS_FILE).write_text(json.dumps(resolved_settings(model_args, data_args, args), indent=2))
    process.wait_for_everyone()
    set_seed(args.seed)

    try:
        options = json.loads(data_args.dataset_options or "{}")
    except json.JSONDecodeError as error:
        raise RunError(f"--dataset_options must be a JSON object: {error}") from None
    dataset = load_reid_dataset(data_args.dataset, data_args.data_dir, **options)
    info = dataset_summary(dataset)
    if info.num_cameras < 2:
        raise RunError(f"{data_args.dataset}: the train split has one camera; cross-camera learning needs >= 2")

    model, processor = build_model(model_args, seed=args.seed)
    model.to(device)
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    height, width = model.config.image_size
    train_collator = ReIDCollator(build_train_transform(
        height, width, mean, std, erasing_p=args.random_erasing_prob, color_jitter=args.color_jitter
    ))
    eval_collator = ReIDCollator(build_eval_transform(height, width, mean, std))
    mixed = args.mixed_precision

    def evaluate(stage: str) -> dict:
        if len(dataset["query"]) == 0 or len(dataset["gallery"]) == 0:
            logger.warning("no query/gallery split: skipping the evaluation after %s", stage)
            return {}
        metrics = evaluate_reid_model(
            model, dataset["query"], dataset["gallery"], eval_collator, batch_size=args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers, mixed_precision=mixed, flip=args.eval_flip,
            rerank=args.eval_rerank,
        )
        summary = {k: float(metrics[k]) for k in METRIC_KEYS}
        logger.info("evaluation after %s: %s", stage, {k: round(v, 4) for k, v in summary.items()})
        return summary

    stage_results: dict[str, dict] = {}
    untrained_file = out / "checkpoints" / "untrained_eval.json"
    if resuming and untrained_file.is_file():
        stage_results["untrained"] = json.loads(untrained_file.read_text())
    else:
        stage_results["untrained"] = evaluate("untrained")
        if process.is_main_process:
            untrained_file.parent.mkdir(parents=True, exist_ok=True)
            untrained_file.write_text(json.dumps(stage_results["untrained"]))

    identity_camids = torch.as_tensor(info.identity_camids, dtype=torch.long)
    tokenizer = processor.tokenizer
    text_features = None

    for stage in [s for s in args.stage_list if s not in IMAGE_STAGES]:  # stage 1
        stage_args = args.stage_arguments(stage)
        final_dir = Path(stage_args.output_dir) / "final"
        done = resuming and (final_dir / EVAL_FILE).is_file() and (explicit is None or explicit[0] != stage)
        resume = None
        if resuming and not done:
            resume = explicit[1] if explicit and explicit[0] == stage else last_complete_checkpoint(
                stage_args.output_dir, discard_incomplete=process.is_main_process)
            process.wait_for_everyone()
        model.requires_grad_(False)
        if done:
            learner = IdentityPromptLearner.from_pretrained(final_dir / ADAPTER_DIR, model, tokenizer)
        else:
            learner = IdentityPromptLearner(
                model, tokenizer, info.num_train_identities, init_std=args.prompt_init_std
            ).to(device)
            cache = FeatureCache.build(model, dataset["train"], eval_collator, args)
            trainer = PromptLearningTrainer(learner, stage_args, cache)
            trainer.train(resume_from_checkpoint=resume)
        text_features = learner.all_text_features().to(device)
        if process.is_main_process and not done:
            learner.save_pretrained(final_dir / ADAPTER_DIR)
            save_text_features(text_features, identity_camids, final_dir / TEXT_FEATURES_FILE)
        if done:
            stage_results[stage] = json.loads((final_dir / EVAL_FILE).read_text())
        else:
            # stage 1 trains only the prompts (its trainer asserts the model is frozen): the image tower,
            # hence the retrieval metrics, are those of the untrained model, so they are not recomputed
            stage_results[stage] = dict(stage_results["untrained"])
            if process.is_main_process:
                final_dir.mkdir(parents=True, exist_ok=True)
                (final_dir / EVAL_FILE).write_text(json.dumps(stage_results[stage]))
        process.wait_for_everyone()

    image_stages = [s for s in args.stage_list if s in IMAGE_STAGES]
    if image_stages:
        prompt_text = Path(args.stage_output_dir("prompt")) / "final" / TEXT_FEATURES_FILE
        if text_features is None and prompt_text.is_file():
            text_features, _ = load_text_features(prompt_text)
        module = CCAFLForTraining(model, identity_camids, text_features, args).to(device)
        stage_results.update(_run_image_stages(
            module, dataset, info, args, image_stages, resuming, explicit, train_collator, eval_collator,
            previous=stage_results.get("prompt", stage_results["untrained"]),
        ))

    last = args.stage_list[-1] if args.stage_list else "untrained"
    results = {**stage_results[last], "stages": stage_results}
    if process.is_main_process:
        save_artifacts(model, processor, args, model_args, data_args, info, results)
        if args.push_to_hub:
            push_output_dir(args)
    process.wait_for_everyone()
    return results


class _StageEndWriter(TrainerCallback):
    """Writes ``checkpoints/<stage>/final`` (metrics; the module state after the last stage) when the
    stage-2/3 trainer evaluates at the end of a stage — before that epoch's checkpoint is saved, so a
    run resumed from that checkpoint finds them."""

    def __init__(self, trainer: CCAFLTrainer, finals: dict[str, Path], last_stage: str):
        self.trainer, self.finals, self.last_stage = trainer, finals, last_stage

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        stage = self.trainer.objective.name
        if self.trainer.accelerator.is_main_process and stage in self.trainer.stage_results:
            _write_stage_final(self.finals[stage], self.trainer.stage_results[stage],
                               self.trainer.training_module if stage == self.last_stage else None)


def _write_stage_final(final_dir: Path, metrics: dict, module: CCAFLForTraining | None) -> None:
    final_dir.mkdir(parents=True, exist_ok=True)
    if module is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, str(final_dir / STATE_FILE))
    (final_dir / EVAL_FILE).write_text(json.dumps(metrics))


def _run_image_stages(
    module: CCAFLForTraining, dataset, info, args: CCAFLTrainingArguments, stages: list[str], resuming: bool,
    explicit: tuple[str, str] | None, train_collator, eval_collator, previous: dict,
) -> dict[str, dict]:
    """Stages 2–3 as one `CCAFLTrainer` loop (checkpoints in ``checkpoints/icdl_ical``); returns the
    metrics after each stage (a stage without epochs keeps the previous stage's metrics)."""
    process = PartialState()
    finals = {stage: Path(args.stage_output_dir(stage)) / "final" for stage in stages}
    last = finals[stages[-1]]
    done = resuming and explicit is None and (last / EVAL_FILE).is_file() and (last / STATE_FILE).is_file()
    if done:
        module.load_state_dict(load_file(str(last / STATE_FILE), device=str(args.device)))
    else:
        loop_dir = args.stage_output_dir(LOOP_CHECKPOINTS)
        resume = None
        if resuming:
            resume = explicit[1] if explicit and explicit[0] == LOOP_CHECKPOINTS else last_complete_checkpoint(
                loop_dir, discard_incomplete=process.is_main_process)
            process.wait_for_everyone()
        trainer = CCAFLTrainer(
            module, dataclasses.replace(args, output_dir=loop_dir, push_to_hub=False), dataset["train"],
            train_collator, eval_collator, stages=stages, diagnostic_pids=info.identity_diagnostic_pids,
            eval_dataset={"query": dataset["query"], "gallery": dataset["gallery"]},
        )
        trainer.add_callback(_StageEndWriter(trainer, finals, stages[-1]))
        trainer.train(resume_from_checkpoint=resume)
        if process.is_main_process:  # stages without epochs, or without a query/gallery split
            for stage in stages:
                if not (finals[stage] / EVAL_FILE).is_file() or (stage == stages[-1] and not (last / STATE_FILE).is_file()):
                    metrics = trainer.stage_results.get(stage) or (
                        json.loads((finals["icdl"] / EVAL_FILE).read_text())
                        if stage == "ical" and "icdl" in finals and (finals["icdl"] / EVAL_FILE).is_file() else previous)
                    _write_stage_final(finals[stage], metrics, module if stage == stages[-1] else None)
        process.wait_for_everyone()
    return {stage: json.loads((finals[stage] / EVAL_FILE).read_text()) for stage in stages}


def _checkpoint_is_complete(folder: Path) -> bool:
    """The Trainer writes ``trainer_state.json`` last: a checkpoint without a readable one was cut off."""
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(folder: str | Path, discard_incomplete: bool = False) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that was completely written, or None.

    A run killed while saving leaves a partial folder; it is skipped (and deleted when
    ``discard_incomplete``, so the resumed run can write that step again).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (m := _CHECKPOINT.fullmatch(path.name))]
    for _, path in sorted(found, reverse=True):
        if _checkpoint_is_complete(path):
            return str(path)
        logger.warning("skipping %s: written only in part (the run was stopped while saving it)", path)
        if discard_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def _explicit_checkpoint(args: CCAFLTrainingArguments) -> tuple[str, str] | None:
    """``(stage, path)`` of an explicit ``--resume_from_checkpoint PATH`` inside this run's folder."""
    value = args.resume_from_checkpoint
    if not value or str(value).lower() == "true":
        return None
    path = Path(value).resolve()
    if not path.is_dir():
        raise RunError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    checkpoints = Path(args.output_dir).resolve() / "checkpoints"
    if path.parent.parent != checkpoints or path.parent.name not in [*args.stage_list, LOOP_CHECKPOINTS]:
        raise RunError(
            f"--resume_from_checkpoint {value} is not a checkpoint of this run; expected "
            f"{checkpoints}/<stage>/checkpoint-N (or pass --resume_from_checkpoint true for the last one)"
        )
    if not _checkpoint_is_complete(path):
        raise RunError(f"--resume_from_checkpoint {value} was written only in part (no readable "
                       f"{TRAINER_STATE_NAME}); pass --resume_from_checkpoint true for the last complete one")
    return path.parent.name, str(path)


# -------------------------------------------------------------------------------------- artifacts
def save_artifacts(model, processor, args, model_args, data_args, info, results: dict) -> None:
    """Write the loadable model (+ custom code), processor, adapter, text features, results and card."""
    out = Path(args.output_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    prompt_final = Path(args.stage_output_dir("prompt")) / "final"
    if (prompt_final / ADAPTER_DIR).is_dir():
        shutil.copytree(prompt_final / ADAPTER_DIR, out / ADAPTER_DIR, dirs_exist_ok=True)
        shutil.copy2(prompt_final / TEXT_FEATURES_FILE, out / TEXT_FEATURES_FILE)
    (out / EVAL_FILE).write_text(json.dumps(results, indent=2))
    from .model_card import render_model_card

    render_model_card(model, args, model_args, data_args, info, results).save(out / "README.md")


def push_output_dir(args: CCAFLTrainingArguments) -> str:
    """Upload the output folder (model, custom code, processor, adapter, text features, card — not the
    checkpoints) to the Hub in one commit. Returns the repo id."""
    from huggingface_hub import HfApi

    out = Path(args.output_dir)
    repo_id = args.hub_model_id or out.name
    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=out, ignore_patterns=["checkpoints/*", RUN_FILE],
                      commit_message="Upload CCAFL model trained with ccafl-hf")
    logger.info("pushed %s to https://huggingface.co/%s", out, repo_id)
    return repo_id


__all__ = ["DataArguments", "ModelArguments", "RunError", "build_model", "push_output_dir", "run_training"]
