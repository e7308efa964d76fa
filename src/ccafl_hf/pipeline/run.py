"""The main job: `TrainingRun` owns a run from plan to finished folder (docs/training.md, "The run's lifecycle")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, set_seed

from ..data import ReIDCollator, build_eval_transform, build_train_transform
from ..data.transforms import image_normalization
from ..evaluation import evaluate_splits
from ..prompts import IdentityPromptLearner, save_text_features
from ..trainers import CCAFLForTraining, CCAFLTrainer, FeatureCache, PromptLearningTrainer
from ..trainers.arguments import CCAFLTrainingArguments
from ..trainers.base import CLASSIFIER_OPTIMIZER_NAME, IMAGE_STAGES, read_best_on_test
from ..trainers.configs import extraction_options
from ..trainers.validation import check_against_data
from .artifacts import push_output_dir, save_artifacts
from .checkpoints import CHECKPOINT_NAME, CheckpointSealer, check_resumable, required_files, resume_point
from .constants import ADAPTER_DIR, EVAL_FILE, LOOP_CHECKPOINTS, SETTINGS_FILE, STATE_FILE, TEXT_FEATURES_FILE
from .manifest import describe_write_error, ensure_space, json_digest, read_json, write_json
from .run_directory import RunDirectory, data_identity, model_identity, run_settings
from .setup import DataArguments, ModelArguments, RunError, _load_dataset, build_model, resolved_settings

logger = logging.getLogger(__name__)


def run_training(model_args: ModelArguments, data_args: DataArguments, args: CCAFLTrainingArguments) -> dict[str, Any]:
    """Run (or continue) the stages in ``args.output_dir``; returns ``eval_results.json`` (``already_finished``: nothing
    trained). Raises `RunError` (one line) for a bad input, an unusable folder or a failed write."""
    run = TrainingRun(model_args, data_args, args)
    with run.folder.lock():  # a second run into the folder fails here, at once
        try:
            if run.plan() != "finished":
                run.start()
                for stage in run.stage_names:
                    run.run_stage(stage)
            return run.finish()
        except Exception as error:
            if (line := describe_write_error(error, *run.writing)) is None:
                raise
            raise RunError(line) from None


class TrainingRun(TrainerCallback):
    """One run: ``folder`` (`RunDirectory`), ``manifests`` (of the verified stages), ``writing`` (path, bytes);
    the callback of its stage-2/3 loop (`on_evaluate`)."""

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, args: CCAFLTrainingArguments):
        _ = args.device  # sets up the (distributed) state of this process
        self.model_args, self.data_args, self.args = model_args, data_args, args
        self.process = PartialState()
        self.folder = RunDirectory(args.output_dir or "", is_main_process=self.process.is_main_process)
        self.explicit = _explicit_checkpoint(args)  # {group: path}; a bad checkpoint path fails before any work
        self.loop_stages = [s for s in args.stages if s in IMAGE_STAGES]  # trained by one loop
        self.manifests: dict[str, dict] = {}
        self.writing: tuple[Path, int] = (self.folder.path, 0)

    def plan(self) -> str:
        """Check and hash every input before the folder is touched, fingerprint the run, decide what it does."""
        self.dataset, self.info = _load_dataset(self.data_args)
        self.model, self.processor = build_model(self.model_args, seed=self.args.seed)
        if self.loop_stages:  # sizes against the data and the free memory
            check_against_data(self.args, self.info.num_train_identities, self.model.reid_feature_dim, self.args.device)
        with self.process.main_process_first():  # the main process hashes; the others read its hash cache
            data_files = data_identity(self.dataset)
            model_files = model_identity(self.model_args.model_name_or_path, self.model)
        self.folder.set_settings(run_settings(self.model_args, self.data_args, self.args, data_files, model_files,
                                              self.process.num_processes))
        plan = self.folder.plan(overwrite=self.args.overwrite_output_dir)
        n, extra = self.process.num_processes, (CLASSIFIER_OPTIMIZER_NAME,)  # the files a resume of each group reads
        self.required = {"prompt": required_files(n), LOOP_CHECKPOINTS: required_files(n, extra)}
        for group, path in self.explicit.items():  # the stages ending after it are recomputed from it
            manifest = check_resumable(path, self.folder.fingerprint, self.required[group])
            self.explicit_epoch = float(manifest.get("epoch") or 0)
        self.process.wait_for_everyone()
        return plan

    def start(self) -> None:
        """Take the folder (`RunDirectory.start`); prepare the stages (``stage_names``), model and collators."""
        self.folder.start()
        self.stage_names = ["untrained", "prompt"] + ([LOOP_CHECKPOINTS] if self.loop_stages else [])
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
        self.identity_camids = torch.as_tensor(self.info.identity_camids, dtype=torch.long)
        evaluated = len(self.dataset["query"]) and len(self.dataset["gallery"])  # else the data loader warned, once
        self.eval_splits = {s: self.dataset[s] for s in ("query", "gallery")} if evaluated else None

    def run_stage(self, name: str) -> None:
        """Reuse ``name``'s verified results, or compute them from the last verified point and seal them."""
        set_seed(self.args.seed)
        {"untrained": self._untrained, "prompt": self._prompt, LOOP_CHECKPOINTS: self._loop}[name]()

    def _untrained(self) -> None:
        if self._verified("untrained") is not None:
            return
        metrics = {}
        if self.eval_splits is not None:
            options = extraction_options(self.args, flip=self.args.eval_flip)
            metrics = evaluate_splits(self.model, self.eval_splits, self.eval_collator, options, rerank=self.args.eval_rerank)
            logger.info("evaluation before training: %s", {k: round(v, 4) for k, v in metrics.items()})
        self._seal("untrained", metrics)

    def _prompt(self) -> None:
        args, final, tokenizer = self.args, self.folder.stage_dir("prompt"), self.processor.tokenizer
        if "prompt" not in self.explicit and self._verified("prompt") is not None:
            learner = IdentityPromptLearner.from_pretrained(final / ADAPTER_DIR, self.model, tokenizer)
        else:
            self.model.requires_grad_(False)
            learner = IdentityPromptLearner(self.model, tokenizer, self.info.num_train_identities,
                                            init_std=args.prompt_init_std).to(args.device)
            cache = FeatureCache.build(self.model, self.dataset["train"], self.eval_collator, args)
            trainer = PromptLearningTrainer(learner, args.stage_arguments("prompt"), cache)
            self._train(trainer, "prompt", None, {"prompt": args.prompt_epochs})

            def write(folder: Path) -> None:
                learner.save_pretrained(folder / ADAPTER_DIR)
                save_text_features(learner.all_text_features(), self.identity_camids, folder / TEXT_FEATURES_FILE)

            # stage 1 trains only the prompts: the image tower, hence the retrieval metrics, are the untrained ones
            self._seal("prompt", dict(self.manifests["untrained"]["metrics"]), write)
        self.text_features = learner.all_text_features().to(args.device)

    def _loop(self) -> None:
        """Stages 2–3: one `CCAFLTrainer` loop; a stage is sealed when the loop evaluates at its end."""
        args = self.args
        module = CCAFLForTraining(self.model, self.identity_camids, self.text_features,
                                  memory_instances=args.memory_instances, memory_momentum=args.memory_momentum,
                                  memory_temperature=args.memory_temperature,
                                  classifier_scale=args.classifier_scale).to(args.device)
        epochs = {"icdl": args.icdl_epochs, "ical": args.icdl_epochs + args.ical_epochs}
        ends = {s: epochs[s] for s in self.loop_stages}  # the loop epoch ending each stage
        stages, explicit, prompt = list(ends), LOOP_CHECKPOINTS in self.explicit, self._previous("icdl")
        for stage in stages:  # a stage ending after --resume_from_checkpoint PATH is recomputed from there
            if (explicit and ends[stage] > self.explicit_epoch) or self._verified(stage) is None:
                break
        else:  # every stage verified: the last one's state is the model
            state = self.folder.stage_dir(stages[-1]) / STATE_FILE
            module.load_state_dict(load_file(str(state), device=str(args.device)))
            return
        trainer = CCAFLTrainer(module, args.loop_config(stages, output_dir=args.stage_output_dir(LOOP_CHECKPOINTS)),
                               self.dataset["train"], self.train_collator, self.eval_collator, stages=stages,
                               diagnostic_pids=self.info.identity_diagnostic_pids, eval_dataset=self.eval_splits)
        self.loop_trainer = trainer
        trainer.add_callback(self)
        if "icdl" in stages and args.icdl_epochs == 0 and "icdl" not in self.manifests:
            self._seal("icdl", dict(self.manifests["prompt"]["metrics"]))  # no ICDL epoch: stage 1's model
        self._train(trainer, LOOP_CHECKPOINTS, prompt, ends, before_epoch=ends[stage])
        for stage in stages:  # a stage the loop did not evaluate: only possible without a query/gallery split
            if stage not in self.manifests:
                if self.eval_splits is not None:
                    raise RunError(f"the stage-2/3 loop ended without evaluating {stage.upper()}")
                self._seal(stage, {}, _write_state(module) if stage == stages[-1] else None)

    def _train(self, trainer: Trainer, group: str, previous: str | None, ends: dict[str, float],
               before_epoch: float | None = None) -> None:
        """Train from `resume_point`, sealing each checkpoint; ``ends``: each stage's last epoch (for the log)."""
        folder = Path(trainer.args.output_dir)
        resume, manifest = resume_point(folder, self.folder.fingerprint, previous, self.required[group],
                                        before_epoch=before_epoch, explicit=self.explicit.get(group))
        if resume is not None:
            epoch = float(manifest["epoch"])
            stage = next((s for s, end in ends.items() if epoch < end), [*ends][-1])
            logger.info("resuming %s at epoch %g (step %d) from %s", stage.upper(), epoch, manifest["step"],
                        Path(resume).resolve().relative_to(self.folder.path.resolve()))
        size = 3 * _nbytes(trainer.model.parameters())
        self.writing = (folder, size)
        trainer.add_callback(CheckpointSealer(self.folder.fingerprint, previous, size))
        trainer.train(resume_from_checkpoint=resume)

    def finish(self) -> dict[str, Any]:
        """Write the model folder, then the run's manifest (a finished run: read its results); push if asked."""
        if self.folder.action == "finished":
            logger.info("every stage of this run already finished in %s with the same settings: nothing to train",
                        self.folder.path)
            results = {**read_json(self.folder.path / EVAL_FILE), "already_finished": True}
        else:
            names = ["untrained", *self.args.stages]
            results = {**self.manifests[names[-1]]["metrics"],
                       "stages": {s: self.manifests[s]["metrics"] for s in names}}
            loop_dir = Path(self.args.stage_output_dir(LOOP_CHECKPOINTS))
            best = read_best_on_test(loop_dir) if self.loop_stages else None
            if best is not None:  # --eval_every_epochs / --save_best_checkpoint: the best evaluation, on the test set
                if best.get("checkpoint"):
                    best["checkpoint"] = (loop_dir / best["checkpoint"]).relative_to(self.folder.path).as_posix()
                results["best_on_test"] = best
            if self.process.is_main_process:
                size = 2 * _nbytes(self.model.state_dict().values()) + (1 << 20)
                self.writing = (self.folder.path, size)
                ensure_space(self.folder.path, size, "the final model")
                files = save_artifacts(self.model, self.processor, self.args, self.model_args, self.data_args,
                                       self.info, results, prompt_dir=self.folder.stage_dir("prompt"))
                self.folder.finish([*files, SETTINGS_FILE])
        if self.process.is_main_process and self.args.push_to_hub:
            push_output_dir(self.args)
        self.process.wait_for_everyone()
        return results

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Seal a loop stage when the loop evaluates at its end, before that epoch's checkpoint is saved."""
        loop, stage = self.loop_trainer, self.loop_trainer.current_stage
        if stage in loop.stage_results and stage not in self.manifests:
            last = stage == loop.stages[-1]
            self._seal(stage, loop.stage_results[stage], _write_state(loop.training_module) if last else None)

    def _previous(self, stage: str) -> str | None:
        """The digest of the stage result ``stage`` is computed from: stage 1's for ICDL, ICDL's for ICAL."""
        before = {"icdl": "prompt", "ical": "icdl"}.get(stage)
        return json_digest(self.manifests[before]) if before else None

    def _verified(self, stage: str) -> dict | None:
        """``stage``'s verified manifest (kept in ``manifests``), or None: compute it."""
        manifest = self.folder.result(stage, self._previous(stage))
        if manifest is not None:
            self.manifests[stage] = manifest
            logger.info("%s already finished with these settings: reusing its verified results", stage.upper())
        return manifest

    def _seal(self, stage: str, metrics: dict, write: Callable[[Path], None] | None = None) -> None:
        """`RunDirectory.save_result`, then its verification by every process."""
        self.folder.save_result(stage, metrics, self._previous(stage), write)
        self.process.wait_for_everyone()
        self.manifests[stage] = self.folder.result(stage, self._previous(stage))
        if self.manifests[stage] is None:
            raise RunError(f"the results of {stage.upper()} in {self.folder.stage_dir(stage)} do not verify right "
                           "after being written (is the disk failing?)")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _write_state(module: CCAFLForTraining) -> Callable[[Path], None]:
    return lambda folder: save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                                    str(folder / STATE_FILE))


def _explicit_checkpoint(args: CCAFLTrainingArguments) -> dict[str, str]:
    """``{checkpoint group: path}`` of a ``--resume_from_checkpoint PATH`` (a checkpoint of this run), or ``{}``."""
    value = args.resume_from_checkpoint
    if not value or str(value).lower() == "true":
        return {}
    path, checkpoints = Path(value).resolve(), Path(args.output_dir).resolve() / "checkpoints"
    if not path.is_dir():
        raise RunError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if path.parent.parent != checkpoints or path.parent.name not in ("prompt", LOOP_CHECKPOINTS) \
            or not CHECKPOINT_NAME.fullmatch(path.name):
        raise RunError(f"--resume_from_checkpoint {value} is not a checkpoint of this run; expected "
                       f"{checkpoints}/<prompt|{LOOP_CHECKPOINTS}>/checkpoint-N (or --resume_from_checkpoint true)")
    return {path.parent.name: str(path)}
