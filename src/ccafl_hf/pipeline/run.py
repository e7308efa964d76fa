"""The main job: the three CCAFL stages end to end, with evaluation, artifacts, resume and Hub push.

`scripts/train.py` only parses arguments (presets + flags) and calls `run_training`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from transformers import CLIPProcessor, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME

from ..data import (
    ReIDCollator,
    build_eval_transform,
    build_train_transform,
)
from ..data.transforms import image_normalization
from ..evaluation import METRIC_KEYS, evaluate_reid_model
from ..modeling_ccafl import CCAFLModel
from ..prompts import IdentityPromptLearner, load_text_features, save_text_features
from ..trainers import (
    CCAFLForTraining,
    CCAFLTrainer,
    CCAFLTrainingArguments,
    FeatureCache,
    PromptLearningTrainer,
)
from ..trainers.base import IMAGE_STAGES, read_best_on_test
from .artifacts import push_output_dir, save_artifacts
from .checkpoints import _explicit_checkpoint, _relative, _resume_message, last_complete_checkpoint
from .constants import ADAPTER_DIR, EVAL_FILE, LOOP_CHECKPOINTS, SETTINGS_FILE, STATE_FILE, TEXT_FEATURES_FILE
from .run_directory import (
    RunDirectory,
    dataset_identity,
    kill_point,
    run_settings,
    write_atomically,
    write_json,
)
from .setup import DataArguments, ModelArguments, _load_dataset, build_model, resolved_settings

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- training
def run_training(
    model_args: ModelArguments, data_args: DataArguments, args: CCAFLTrainingArguments
) -> dict[str, Any]:
    """Run the requested stages (resuming what a previous run of the same settings left) and write
    the model, processor, prompt adapter, text features, ``eval_results.json`` and model card.

    Returns the content of ``eval_results.json``.
    """
    return _run_stages(model_args, data_args, args)


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
    mean, std = image_normalization(args.image_normalization, processor.image_processor.image_mean,
                                    processor.image_processor.image_std)
    processor.image_processor.image_mean, processor.image_processor.image_std = mean, std  # saved with the model
    height, width = model.config.image_size
    train_collator = ReIDCollator(build_train_transform(
        height, width, mean, std, erasing_p=args.random_erasing_prob, erasing_style=args.random_erasing_style,
        color_jitter=args.color_jitter,
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

    for stage in [s for s in args.stages if s not in IMAGE_STAGES]:  # stage 1
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

    image_stages = [s for s in args.stages if s in IMAGE_STAGES]
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

    last = args.stages[-1] if args.stages else "untrained"
    results = {**stage_results[last], "stages": stage_results}
    best = read_best_on_test(args.stage_output_dir(LOOP_CHECKPOINTS)) if image_stages else None
    if best is not None:  # --eval_every_epochs / --save_best_checkpoint: the best evaluation, chosen on the test set
        if best.get("checkpoint"):
            best["checkpoint"] = str(_relative(Path(args.stage_output_dir(LOOP_CHECKPOINTS)) / best["checkpoint"], out))
        results["best_on_test"] = best
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


