"""The main job: `TrainingRun` owns one run from the plan to the finished folder (docs/training.md,
"The run's lifecycle"). `scripts/train.py` only parses arguments and calls `run_training`.

    fresh ──plan──▶ running ──run_stage──▶ stage verified ──…──▶ finished
                       ▲                         │
                       └──── kill / failure: the next run resumes from the last verified point

Every decision has one place: `plan` (validate every input, fingerprint, fresh / resume / finished /
replace / refuse), `run_stage` (reuse a verified stage, or train it from its last verified checkpoint
and seal its results), `finish` (artifacts, then the run's manifest, written last).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, set_seed

from ..data import ReIDCollator, build_eval_transform, build_train_transform
from ..data.transforms import image_normalization
from ..evaluation import evaluate_splits
from ..prompts import IdentityPromptLearner, save_text_features
from ..trainers import (
    CCAFLForTraining,
    CCAFLTrainer,
    CCAFLTrainingArguments,
    FeatureCache,
    PromptLearningTrainer,
)
from ..trainers.base import CLASSIFIER_OPTIMIZER_NAME, IMAGE_STAGES, read_best_on_test
from ..trainers.configs import extraction_options
from ..trainers.validation import check_against_data
from .artifacts import push_output_dir, save_artifacts
from .checkpoints import CheckpointSealer, check_resumable, required_files, resume_point
from .constants import ADAPTER_DIR, EVAL_FILE, LOOP_CHECKPOINTS, SETTINGS_FILE, STATE_FILE, TEXT_FEATURES_FILE
from .manifest import describe_write_failure, ensure_space, is_write_failure, write_json
from .run_directory import RunDirectory, RunPlan, data_identity, digest, model_identity, run_settings
from .setup import DataArguments, ModelArguments, RunError, _load_dataset, build_model, resolved_settings

logger = logging.getLogger(__name__)


def run_training(model_args: ModelArguments, data_args: DataArguments, args: CCAFLTrainingArguments) -> dict[str, Any]:
    """Run the requested stages (continuing what a run of the same settings left in ``args.output_dir``)
    and write the model, processor, prompt adapter, text features, ``eval_results.json`` and card.

    Returns the content of ``eval_results.json`` (with ``already_finished`` when nothing was trained).
    Raises `RunError` (one line) for bad inputs, an unusable folder or a failed write (full disk).
    """
    run = TrainingRun(model_args, data_args, args)
    with run.folder.lock():  # a second run into the folder fails here, at once
        try:
            if run.plan().action == "finished":
                return run.finished_results()
            run.start()
            for stage in run.stage_names():
                run.run_stage(stage)
            return run.finish()
        except Exception as error:
            if not is_write_failure(error):
                raise
            raise RunError(describe_write_failure(error, *run.writing)) from None


class TrainingRun:
    """One training run of the three stages in ``args.output_dir``.

    Attributes:
        folder: the `RunDirectory` (lock, plan, stage results, run manifest).
        manifests: the verified manifest of each finished stage (``untrained``, ``prompt``, ``icdl``, ``ical``).
        writing: ``(path, bytes)`` of the write in progress, for the one-line disk-full error.
    """

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, args: CCAFLTrainingArguments):
        _ = args.device  # sets up the (distributed) state of this process
        self.model_args, self.data_args, self.args = model_args, data_args, args
        self.process = PartialState()
        self.folder = RunDirectory(args.output_dir or "", is_main_process=self.process.is_main_process)
        self.explicit = _explicit_checkpoint(args)  # a bad checkpoint path fails before any work
        self.manifests: dict[str, dict] = {}
        self.writing: tuple[Path, int] = (self.folder.path, 0)

    # ------------------------------------------------------------------------------------- plan
    def plan(self) -> RunPlan:
        """Validate every input before the folder is touched (data: content hashes and image headers;
        model: built and hashed), fingerprint the run and decide what it does with the folder."""
        self.dataset, self.info = _load_dataset(self.data_args)
        self.model, self.processor = build_model(self.model_args, seed=self.args.seed)
        if any(s in IMAGE_STAGES for s in self.args.stages):  # sizes against the data and the free memory
            check_against_data(self.args, self.info.num_train_identities, self.model.reid_feature_dim, self.args.device)
        with self.process.main_process_first():  # the main process hashes; the others read its hash cache
            data_files = data_identity(self.dataset)
            model_files = model_identity(self.model_args.model_name_or_path, self.model)
        settings = run_settings(self.model_args, self.data_args, self.args, data_files, model_files,
                                self.process.num_processes)
        self.folder.set_settings(settings)
        plan = self.folder.plan(overwrite=self.args.overwrite_output_dir)
        if self.explicit is not None:
            check_resumable(self.explicit[1], self.folder.fingerprint, self._required(self.explicit[0]))
        self.process.wait_for_everyone()
        return plan

    def finished_results(self) -> dict[str, Any]:
        """A finished run's results (its manifest verified): nothing to train; the Hub push when asked."""
        results = json.loads((self.folder.path / EVAL_FILE).read_text())
        logger.info("every stage of this run already finished in %s with the same settings: nothing to train",
                    self.folder.path)
        if self.process.is_main_process and self.args.push_to_hub:
            push_output_dir(self.args)
        return {**results, "already_finished": True}

    def start(self) -> None:
        """Take the folder (an overwritten run is moved aside, then deleted) and prepare the model and data."""
        self.folder.start()
        if self.process.is_main_process:
            write_json(self.folder.path / SETTINGS_FILE, resolved_settings(self.model_args, self.data_args, self.args))
        self.process.wait_for_everyone()
        self.model.to(self.args.device)
        image_processor = self.processor.image_processor
        mean, std = image_normalization(self.args.image_normalization, image_processor.image_mean,
                                        image_processor.image_std)
        image_processor.image_mean, image_processor.image_std = mean, std  # saved with the trained model
        height, width = self.model.config.image_size
        self.train_collator = ReIDCollator(build_train_transform(
            height, width, mean, std, erasing_p=self.args.random_erasing_prob,
            erasing_style=self.args.random_erasing_style, color_jitter=self.args.color_jitter))
        self.eval_collator = ReIDCollator(build_eval_transform(height, width, mean, std))
        self.has_eval_split = len(self.dataset["query"]) > 0 and len(self.dataset["gallery"]) > 0

    def stage_names(self) -> list[str]:
        """``untrained`` (the evaluation before training), then ``prompt`` and the stage-2/3 ``loop`` as asked."""
        loop = [LOOP_CHECKPOINTS] if any(s in IMAGE_STAGES for s in self.args.stages) else []
        return ["untrained", *[s for s in self.args.stages if s not in IMAGE_STAGES], *loop]

    # ---------------------------------------------------------------------------------- stages
    def run_stage(self, name: str) -> None:
        """Reuse ``name``'s verified results, or compute them from the last verified point and seal them.
        Every stage starts from the same random state, so a resumed run continues bit for bit."""
        set_seed(self.args.seed)
        {"untrained": self._untrained, "prompt": self._prompt, LOOP_CHECKPOINTS: self._loop}[name]()

    def _untrained(self) -> None:
        if self._verified("untrained", None) is None:
            metrics = self._evaluate("untrained")
            self._seal("untrained", metrics, previous=None)

    def _prompt(self) -> None:
        args, final = self.args, self.folder.stage_dir("prompt")
        tokenizer = self.processor.tokenizer
        if self._verified("prompt", None, recompute=self._explicit("prompt") is not None) is not None:
            learner = IdentityPromptLearner.from_pretrained(final / ADAPTER_DIR, self.model, tokenizer)
        else:
            self.model.requires_grad_(False)
            learner = IdentityPromptLearner(self.model, tokenizer, self.info.num_train_identities,
                                            init_std=args.prompt_init_std).to(args.device)
            stage_args = args.stage_arguments("prompt")
            resume, _ = resume_point(stage_args.output_dir, self.folder.fingerprint, None, self._required("prompt"),
                                     explicit=self._explicit("prompt"))
            _log_resume("PROMPT", resume, self.folder.path)
            size = 3 * _nbytes(learner.parameters())
            self.writing = (Path(stage_args.output_dir), size)
            cache = FeatureCache.build(self.model, self.dataset["train"], self.eval_collator, args)
            trainer = PromptLearningTrainer(learner, stage_args, cache)
            trainer.add_callback(CheckpointSealer(self.folder.fingerprint, None, size))
            trainer.train(resume_from_checkpoint=resume)
            if self.process.is_main_process:
                shutil.rmtree(final, ignore_errors=True)
                learner.save_pretrained(final / ADAPTER_DIR)
                save_text_features(learner.all_text_features(), self._identity_camids(), final / TEXT_FEATURES_FILE)
            # stage 1 trains only the prompts: the image tower, hence the retrieval metrics, are the untrained ones
            self._seal("prompt", dict(self.manifests["untrained"]["metrics"]), previous=None)
        self.text_features = learner.all_text_features().to(args.device)

    def _loop(self) -> None:
        """Stages 2–3 as one `CCAFLTrainer` loop (checkpoints in ``checkpoints/icdl_ical``)."""
        args = self.args
        stages = [s for s in args.stages if s in IMAGE_STAGES]
        module = CCAFLForTraining(
            self.model, self._identity_camids(), self.text_features, memory_instances=args.memory_instances,
            memory_momentum=args.memory_momentum, memory_temperature=args.memory_temperature,
            classifier_scale=args.classifier_scale,
        ).to(args.device)
        ends = {"icdl": args.icdl_epochs, "ical": args.icdl_epochs + args.ical_epochs}  # loop epoch ending each
        explicit = self._explicit(LOOP_CHECKPOINTS)
        explicit_epoch = float((_read(Path(explicit) / "trainer_state.json") or {}).get("epoch", 0)) if explicit else None
        previous = digest(self.manifests["prompt"])
        missing = None
        for stage in stages:  # a stage ending after --resume_from_checkpoint PATH is recomputed from there
            recompute = explicit_epoch is not None and ends[stage] > explicit_epoch
            manifest = self._verified(stage, previous, recompute=recompute)
            if manifest is None:
                missing = stage
                break
            previous = digest(manifest)
        if missing is None:  # every stage verified: the last one's state is the model
            state = self.folder.stage_dir(stages[-1]) / STATE_FILE
            module.load_state_dict(load_file(str(state), device=str(args.device)))
            return
        loop_dir, prompt = args.stage_output_dir(LOOP_CHECKPOINTS), digest(self.manifests["prompt"])
        resume, manifest = resume_point(loop_dir, self.folder.fingerprint, prompt, self._required(LOOP_CHECKPOINTS),
                                        before_epoch=ends[missing], explicit=explicit)
        _log_resume(_loop_stage(manifest, ends, stages), resume, self.folder.path)
        size = 3 * _nbytes(module.parameters())
        self.writing = (Path(loop_dir), size)
        trainer = CCAFLTrainer(
            module, args.loop_config(stages, output_dir=loop_dir), self.dataset["train"],
            self.train_collator, self.eval_collator, stages=stages, diagnostic_pids=self.info.identity_diagnostic_pids,
            eval_dataset={"query": self.dataset["query"], "gallery": self.dataset["gallery"]},
        )
        trainer.add_callback(_StageEnd(self, trainer, stages))
        trainer.add_callback(CheckpointSealer(self.folder.fingerprint, prompt, size))
        if "icdl" in stages and args.icdl_epochs == 0 and "icdl" not in self.manifests:
            self._seal("icdl", dict(self.manifests["prompt"]["metrics"]), prompt)  # no ICDL epoch: stage 1's model
        trainer.train(resume_from_checkpoint=resume)
        for stage in stages:  # a stage the loop did not evaluate: only possible without a query/gallery split
            if stage not in self.manifests:
                if self.has_eval_split:
                    raise RunError(f"the stage-2/3 loop ended without evaluating {stage.upper()}")
                self._seal_loop_stage(stage, {}, module if stage == stages[-1] else None)

    def _seal_loop_stage(self, stage: str, metrics: dict, module: CCAFLForTraining | None) -> None:
        """A loop stage's results: the module state too when it is the loop's last stage."""
        folder = self.folder.stage_dir(stage)
        if self.process.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            if module is not None:
                tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                save_file(tensors, str(folder / STATE_FILE))
        self._seal(stage, metrics, digest(self.manifests["prompt" if stage == "icdl" else "icdl"]))

    # ---------------------------------------------------------------------------------- finish
    def finish(self) -> dict[str, Any]:
        """Write the model folder and card, then the run's manifest (last): the run is finished."""
        names = ["untrained", *self.args.stages]
        results = {**self.manifests[names[-1]]["metrics"],
                   "stages": {s: self.manifests[s]["metrics"] for s in names}}
        best = self._best_on_test()
        if best is not None:  # --eval_every_epochs / --save_best_checkpoint: the best evaluation, chosen on the test set
            results["best_on_test"] = best
        if self.process.is_main_process:
            out = self.folder.path
            size = 2 * _nbytes(self.model.state_dict().values()) + (1 << 20)
            self.writing = (out, size)
            ensure_space(out, size, "the final model")
            files = save_artifacts(self.model, self.processor, self.args, self.model_args, self.data_args, self.info,
                                   results, prompt_dir=self.folder.stage_dir("prompt"))
            self.folder.finish([*files, SETTINGS_FILE])
            if self.args.push_to_hub:
                push_output_dir(self.args)
        self.process.wait_for_everyone()
        return results

    # --------------------------------------------------------------------------------- helpers
    def _verified(self, stage: str, previous: str | None, recompute: bool = False) -> dict | None:
        """``stage``'s verified manifest (kept in ``manifests``), or None: recompute it (``recompute``: a
        ``--resume_from_checkpoint PATH`` before the stage's end)."""
        if recompute:
            return None
        manifest = self.folder.result(stage, previous)
        if manifest is not None:
            self.manifests[stage] = manifest
            logger.info("%s already finished with these settings: reusing its verified results", stage.upper())
        return manifest

    def _seal(self, stage: str, metrics: dict, previous: str | None) -> None:
        self.folder.save_result(stage, metrics, previous)
        self.process.wait_for_everyone()
        self.manifests[stage] = self.folder.result(stage, previous)
        if self.manifests[stage] is None:
            raise RunError(f"the results of {stage.upper()} in {self.folder.stage_dir(stage)} do not verify right "
                           "after being written (is the disk failing?)")

    def _required(self, group: str) -> tuple[str, ...]:
        extra = (CLASSIFIER_OPTIMIZER_NAME,) if group == LOOP_CHECKPOINTS else ()
        return required_files(self.process.num_processes, extra)

    def _explicit(self, group: str) -> str | None:
        return self.explicit[1] if self.explicit is not None and self.explicit[0] == group else None

    def _best_on_test(self) -> dict | None:
        """The loop trainer's ``best_on_test`` record (its checkpoint relative to the run folder), or None."""
        if not any(s in IMAGE_STAGES for s in self.args.stages):
            return None
        loop_dir = Path(self.args.stage_output_dir(LOOP_CHECKPOINTS))
        best = read_best_on_test(loop_dir)
        if best is not None and best.get("checkpoint"):
            best["checkpoint"] = (loop_dir / best["checkpoint"]).relative_to(self.folder.path).as_posix()
        return best

    def _identity_camids(self) -> torch.Tensor:
        return torch.as_tensor(self.info.identity_camids, dtype=torch.long)

    def _evaluate(self, stage: str) -> dict:
        summary = evaluate_splits(self.model, self.dataset, self.eval_collator,
                                  extraction_options(self.args, flip=self.args.eval_flip), rerank=self.args.eval_rerank,
                                  stage=stage)
        if summary:
            logger.info("evaluation after %s: %s", stage, {k: round(v, 4) for k, v in summary.items()})
        return summary


class _StageEnd(TrainerCallback):
    """Seals a loop stage's results when the trainer evaluates at its end (before that epoch's checkpoint
    is saved, so a run resumed from that checkpoint finds them); the last stage with the module state."""

    def __init__(self, run: TrainingRun, trainer: CCAFLTrainer, stages: list[str]):
        self.run, self.trainer, self.stages = run, trainer, stages

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        trainer = self.trainer
        stage = getattr(trainer, "current_stage", None) or trainer.objective.name
        if stage in trainer.stage_results and stage not in self.run.manifests:
            module = trainer.training_module if stage == self.stages[-1] else None
            self.run._seal_loop_stage(stage, trainer.stage_results[stage], module)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _loop_stage(manifest: dict | None, ends: dict[str, int], stages: list[str]) -> str:
    epoch = float((manifest or {}).get("epoch") or 0)
    return next((s for s in stages if epoch < ends[s]), stages[-1]).upper()


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _log_resume(stage: str, checkpoint: str | None, out: Path) -> None:
    if checkpoint is not None:
        state = _read(Path(checkpoint) / "trainer_state.json") or {}
        where = Path(checkpoint).resolve().relative_to(out.resolve())
        logger.info("resuming %s at epoch %g (step %d) from %s", stage, state.get("epoch", 0),
                    state.get("global_step", 0), where)


def _explicit_checkpoint(args: CCAFLTrainingArguments) -> tuple[str, str] | None:
    """``(stage folder, path)`` of an explicit ``--resume_from_checkpoint PATH`` inside this run's folder."""
    value = args.resume_from_checkpoint
    if not value or str(value).lower() == "true":
        return None
    path = Path(value).resolve()
    if not path.is_dir():
        raise RunError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    checkpoints = Path(args.output_dir).resolve() / "checkpoints"
    if path.parent.parent != checkpoints or path.parent.name not in ("prompt", LOOP_CHECKPOINTS):
        raise RunError(f"--resume_from_checkpoint {value} is not a checkpoint of this run; expected "
                       f"{checkpoints}/<prompt|{LOOP_CHECKPOINTS}>/checkpoint-N (or --resume_from_checkpoint true)")
    return path.parent.name, str(path)

