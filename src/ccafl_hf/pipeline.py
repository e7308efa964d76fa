"""The main job: the three CCAFL stages end to end, with evaluation, artifacts, resume and Hub push.

`scripts/train.py` only parses arguments (presets + flags) and calls `run_training`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
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
from .model_files import ModelFolderError, check_model_folder, load_checked
from .modeling_ccafl import CCAFLModel
from .processing import build_reid_processor, load_tokenizer
from .prompts import IdentityPromptLearner, load_text_features, save_text_features
from .run_directory import (
    RUN_FILE,
    RunDirectory,
    dataset_identity,
    kill_point,
    run_settings,
    write_atomically,
    write_json,
)
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

EVAL_FILE = "eval_results.json"
TEXT_FEATURES_FILE = "text_features.safetensors"
ADAPTER_DIR = "prompt_adapter"
STATE_FILE = "training_state.safetensors"
SETTINGS_FILE = "resolved_settings.json"  # every resolved setting of the run, written when it starts training
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
        from .data.datasets.base import get_reader

        get_reader(self.dataset)  # an unknown name: one line listing the known ones
        _json_object(self.dataset_options, "--dataset_options")


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
    (`ccafl_hf.run_directory.run_settings`) this includes the run-only settings (logging, paths, workers)."""
    return json.loads(json.dumps(
        {"model": asdict(model_args), "data": asdict(data_args), "training": args.to_dict()}, default=str))


def _load_dataset(data_args: DataArguments):
    options = _json_object(data_args.dataset_options, "--dataset_options")
    dataset = load_reid_dataset(data_args.dataset, data_args.data_dir, **options)
    info = dataset_summary(dataset)
    if info.num_cameras < 2:
        raise RunError(f"{data_args.dataset}: the train split has one camera; cross-camera learning needs >= 2")
    return dataset, info


def _resume_message(stage: str, checkpoint: str, out: Path) -> str:
    state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
    return (f"resuming {stage.upper()} at epoch {state.get('epoch', 0):g} (step {state.get('global_step', 0)}) "
            f"from {_relative(checkpoint, out)}")


def _relative(path: str | Path, out: Path) -> Path:
    """``path`` relative to the output folder when inside it."""
    where = Path(path).resolve()
    return where.relative_to(out.resolve()) if where.is_relative_to(out.resolve()) else where


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
    _ = args.device  # sets up the (distributed) state of this process
    process = PartialState()
    out = Path(args.output_dir)
    run_dir = RunDirectory(out, is_main_process=process.is_main_process)
    with run_dir.lock():  # a second run into the folder fails here, at once
        explicit = _explicit_checkpoint(args)  # a bad checkpoint path fails before any work
        # data and model before the folder is touched: a run that fails on them leaves it as it found it
        dataset, info = _load_dataset(data_args)
        model, processor = build_model(model_args, seed=args.seed)
        run_dir.set_settings(run_settings(model_args, data_args, args, dataset_identity(dataset)))
        plan = run_dir.plan(overwrite=args.overwrite_output_dir)
        process.wait_for_everyone()
        if plan.action == "finished":
            results = run_dir.result("final")
            logger.info("every stage of this run already finished in %s with the same settings: nothing to train "
                        "(results: %s)", out, out / EVAL_FILE)
            if process.is_main_process and args.push_to_hub:
                push_output_dir(args)
            return {**results, "already_finished": True}
        run_dir.start()
        if process.is_main_process:
            write_json(out / SETTINGS_FILE, resolved_settings(model_args, data_args, args))
        process.wait_for_everyone()
        return _train_stages(run_dir, plan.action == "resume", explicit, model, processor, dataset, info,
                             model_args, data_args, args)


def _train_stages(run_dir: RunDirectory, resuming: bool, explicit: tuple[str, str] | None, model: CCAFLModel,
                  processor: CLIPProcessor, dataset, info, model_args: ModelArguments, data_args: DataArguments,
                  args: CCAFLTrainingArguments) -> dict[str, Any]:
    device = args.device
    process = PartialState()
    out = run_dir.path
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
    stored = run_dir.result("untrained") if resuming else None
    if stored is not None:
        stage_results["untrained"] = stored
    else:
        stage_results["untrained"] = evaluate("untrained")
        run_dir.save_result("untrained", stage_results["untrained"])

    identity_camids = torch.as_tensor(info.identity_camids, dtype=torch.long)
    tokenizer = processor.tokenizer
    text_features = None

    for stage in [s for s in args.stage_list if s not in IMAGE_STAGES]:  # stage 1
        # every stage starts from the same random state whether or not the previous ones ran in this process:
        # a run resumed at a stage boundary continues bit for bit
        set_seed(args.seed)
        stage_args = args.stage_arguments(stage)
        final_dir = Path(stage_args.output_dir) / "final"
        stored = run_dir.result(stage) if resuming and (explicit is None or explicit[0] != stage) else None
        done = stored is not None
        resume = None
        if done:
            logger.info("%s already finished with these settings: reusing its results", stage.upper())
        elif resuming:
            resume = explicit[1] if explicit and explicit[0] == stage else last_complete_checkpoint(
                stage_args.output_dir, discard_incomplete=process.is_main_process)
            if resume is not None:
                logger.info(_resume_message(stage, resume, out))
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
            learner.save_pretrained(final_dir / ADAPTER_DIR)  # trusted only once the marker below exists
            features = text_features
            write_atomically(final_dir / TEXT_FEATURES_FILE,
                             lambda path, f=features: save_text_features(f, identity_camids, path))
        if done:
            stage_results[stage] = stored
        else:
            # stage 1 trains only the prompts (its trainer asserts the model is frozen): the image tower,
            # hence the retrieval metrics, are those of the untrained model, so they are not recomputed
            stage_results[stage] = dict(stage_results["untrained"])
            run_dir.save_result(stage, stage_results[stage])  # written last: the stage's "finished" marker
        process.wait_for_everyone()
        kill_point(f"after-{stage}")

    image_stages = [s for s in args.stage_list if s in IMAGE_STAGES]
    if image_stages:
        set_seed(args.seed)  # as above: the loop starts from the same random state, resumed or not
        prompt_text = Path(args.stage_output_dir("prompt")) / "final" / TEXT_FEATURES_FILE
        if text_features is None and prompt_text.is_file():
            text_features, _ = load_text_features(prompt_text)
        module = CCAFLForTraining(model, identity_camids, text_features, args).to(device)
        stage_results.update(_run_image_stages(
            run_dir, module, dataset, info, args, image_stages, resuming, explicit, train_collator, eval_collator,
            previous=stage_results.get("prompt", stage_results["untrained"]),
        ))

    last = args.stage_list[-1] if args.stage_list else "untrained"
    results = {**stage_results[last], "stages": stage_results}
    if process.is_main_process:
        save_artifacts(model, processor, args, model_args, data_args, info, results)
        run_dir.finish()
        if args.push_to_hub:
            push_output_dir(args)
    process.wait_for_everyone()
    return results


class _StageEndWriter(TrainerCallback):
    """Stores a stage's results through the run folder (`RunDirectory.save_result`: fingerprinted, atomic;
    after the last stage the module state first) when the stage-2/3 trainer evaluates at the end of the
    stage — before that epoch's checkpoint is saved, so a run resumed from that checkpoint finds them."""

    def __init__(self, trainer: CCAFLTrainer, run_dir: RunDirectory, last_stage: str):
        self.trainer, self.run_dir, self.last_stage = trainer, run_dir, last_stage

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        stage = self.trainer.objective.name
        if stage in self.trainer.stage_results:
            _store_stage_result(self.run_dir, stage, self.trainer.stage_results[stage],
                                self.trainer.training_module if stage == self.last_stage else None)
            kill_point(f"after-{stage}")


def _store_stage_result(run_dir: RunDirectory, stage: str, metrics: dict, module: CCAFLForTraining | None) -> None:
    """``checkpoints/<stage>/final``: the module state (when given) then the results marker, both atomic."""
    if not run_dir.is_main_process:
        return
    if module is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        write_atomically(run_dir.marker_path(stage).parent / STATE_FILE, lambda path: save_file(tensors, str(path)))
    run_dir.save_result(stage, metrics)  # written last: the stage's "finished" marker


def _run_image_stages(
    run_dir: RunDirectory, module: CCAFLForTraining, dataset, info, args: CCAFLTrainingArguments, stages: list[str],
    resuming: bool, explicit: tuple[str, str] | None, train_collator, eval_collator, previous: dict,
) -> dict[str, dict]:
    """Stages 2–3 as one `CCAFLTrainer` loop (checkpoints in ``checkpoints/icdl_ical``); returns the
    metrics after each stage (a stage without epochs keeps the previous stage's metrics).

    The loop is reused when its last stage's results carry this run's fingerprint (`RunDirectory.result`)
    and no ``--resume_from_checkpoint PATH`` points into it; otherwise it continues from its last
    complete checkpoint when the run directory's plan is a resume.
    """
    process = PartialState()
    last_state = run_dir.marker_path(stages[-1]).parent / STATE_FILE
    reuse = resuming and (explicit is None or explicit[0] != LOOP_CHECKPOINTS)
    trainer = None
    if reuse and run_dir.result(stages[-1]) is not None and last_state.is_file():
        logger.info("%s already finished with these settings: reusing its results", stages[-1].upper())
        module.load_state_dict(load_file(str(last_state), device=str(args.device)))
    else:
        loop_dir = args.stage_output_dir(LOOP_CHECKPOINTS)
        resume = None
        if resuming:
            resume = explicit[1] if explicit and explicit[0] == LOOP_CHECKPOINTS else last_complete_checkpoint(
                loop_dir, discard_incomplete=process.is_main_process)
            if resume is not None:
                logger.info(_loop_resume_message(resume, args, stages, run_dir.path))
            process.wait_for_everyone()
        trainer = CCAFLTrainer(
            module, dataclasses.replace(args, output_dir=loop_dir, push_to_hub=False), dataset["train"],
            train_collator, eval_collator, stages=stages, diagnostic_pids=info.identity_diagnostic_pids,
            eval_dataset={"query": dataset["query"], "gallery": dataset["gallery"]},
        )
        trainer.add_callback(_StageEndWriter(trainer, run_dir, stages[-1]))
        trainer.train(resume_from_checkpoint=resume)
    results: dict[str, dict] = {}
    prior = previous
    for stage in stages:  # stages without epochs or without a query/gallery split were not evaluated in the loop
        stored = run_dir.result(stage)
        if trainer is not None and (stored is None or (stage == stages[-1] and not last_state.is_file())):
            stored = trainer.stage_results.get(stage) or stored
            if stored is None:
                epochs = args.icdl_epochs if stage == "icdl" else args.ical_epochs
                if epochs and len(dataset["query"]) and len(dataset["gallery"]):
                    logger.warning("the stored results of %s are unreadable and the loop went past it: reporting "
                                   "the previous stage's results for it", stage.upper())
                stored = prior
            _store_stage_result(run_dir, stage, stored, module if stage == stages[-1] else None)
        elif stored is None:
            logger.warning("the stored results of %s are unreadable: reporting the previous stage's", stage.upper())
            stored = prior
        results[stage] = prior = stored
    process.wait_for_everyone()
    for stage in stages:
        kill_point(f"after-{stage}")
    return results


def _loop_resume_message(checkpoint: str, args: CCAFLTrainingArguments, stages: list[str], out: Path) -> str:
    """``resuming ICAL at epoch 7 (step 1400) from checkpoints/icdl_ical/checkpoint-1400``: the stage and
    the loop epoch (counted from the first ICDL epoch) where the stage-2/3 loop continues."""
    state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
    epoch = (0 if stages[0] == "icdl" else args.icdl_epochs) + state.get("epoch", 0)
    stage = "icdl" if epoch < args.icdl_epochs else "ical"
    stage = stage if stage in stages else stages[-1]
    return (f"resuming {stage.upper()} at epoch {epoch:g} (step {state.get('global_step', 0)}) from "
            f"{_relative(checkpoint, out)}")


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
    """Write the loadable model (+ custom code), processor, adapter, text features, results and card.

    Everything is written into a temporary folder inside the output folder first, then each file is
    renamed into place, ``eval_results.json`` last: a reader never sees a file cut off, and a run killed
    here leaves no ``eval_results.json`` of its own (it is rewritten on resume).
    """
    from .model_card import render_model_card

    kill_point("before-artifacts")
    out = Path(args.output_dir)
    staging = out / f".tmp-{os.getpid()}-artifacts"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        prompt_final = Path(args.stage_output_dir("prompt")) / "final"
        if (prompt_final / ADAPTER_DIR).is_dir():
            shutil.copytree(prompt_final / ADAPTER_DIR, staging / ADAPTER_DIR, dirs_exist_ok=True)
            shutil.copy2(prompt_final / TEXT_FEATURES_FILE, staging / TEXT_FEATURES_FILE)
        render_model_card(model, args, model_args, data_args, info, results).save(staging / "README.md")
        (staging / EVAL_FILE).write_text(json.dumps(results, indent=2))
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == EVAL_FILE)
        for path in files:
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    except (OSError, RuntimeError) as error:
        from .run_directory import describe_write_error

        line = describe_write_error(error, out)
        if line is None:
            raise
        raise OSError(errno.EIO, line) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def push_output_dir(args: CCAFLTrainingArguments) -> str:
    """Upload the output folder (model, custom code, processor, adapter, text features, card — not the
    checkpoints) to the Hub in one commit. Returns the repo id."""
    from huggingface_hub import CommitOperationAdd, HfApi

    out = Path(args.output_dir)
    repo_id = args.hub_model_id or out.name
    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True).repo_id
    # not the checkpoints, the run's state, its lock or temporary files (".tmp-*")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] != "checkpoints"
                   and p.name != RUN_FILE and not p.relative_to(out).parts[0].startswith("."))
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(out).as_posix(), path_or_fileobj=str(p)) for p in files]
    api.create_commit(repo_id, operations=operations, commit_message="Upload CCAFL model trained with ccafl-hf")
    logger.info("pushed %d files to https://huggingface.co/%s", len(operations), repo_id)
    return repo_id


__all__ = ["DataArguments", "ModelArguments", "RunError", "build_model", "push_output_dir", "run_training"]
