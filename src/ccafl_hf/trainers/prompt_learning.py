"""Stage 1 — identity prompt learning on cached image features (docs/method.md §3)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback

from ..errors import NonFiniteError
from ..evaluation import extract_features
from ..losses import prompt_contrastive_loss
from ..modeling_ccafl import CCAFLModel
from ..prompts import IdentityPromptLearner
from .arguments import CCAFLTrainingArguments
from .base import LabelledProgressCallback
from .configs import PromptLearningConfig, extraction_options
from .schedules import prompt_epoch_lr_factor

logger = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """Alignment features of every training image, computed once (test transform, no grad).

    Attributes:
        features: ``[M, P]`` CLIP-projected image features (fp32, on the training device).
        intra_ids: ``[M]`` intra-camera identity of each image.
        camids: ``[M]`` camera of each image.
    """

    features: torch.Tensor
    intra_ids: torch.Tensor
    camids: torch.Tensor

    @classmethod
    def build(cls, model: CCAFLModel, train_dataset, eval_collator, args: PromptLearningConfig, accelerator=None):
        """Run the image tower once over ``train_dataset`` under the mixed precision of ``args`` (its eval batch
        size and workers); a non-finite feature is a `NonFiniteError`."""
        extracted = extract_features(model, train_dataset, eval_collator, extraction_options(args), with_alignment=True,
                                     accelerator=accelerator, desc="Stage 1: caching image features")
        if not bool(torch.isfinite(extracted.alignment_features).all()):
            raise NonFiniteError("the image features cached for the prompt stage hold NaN or infinite values: the "
                                 "start model's image tower gives non-finite features (check its weights)")
        return cls(extracted.alignment_features, extracted.labels["intra_ids"], extracted.labels["camids"])

    def __len__(self) -> int:
        return self.features.shape[0]


class _IndexDataset(Dataset):
    """Indices into the feature cache; batches are gathered on the device in `compute_loss`."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def _collate_indices(indices: list[int]) -> dict[str, torch.Tensor]:
    return {"indices": torch.tensor(indices, dtype=torch.long)}


class PromptLearningTrainer(Trainer):
    """Trains only the identity prompt vectors (CLIP frozen, asserted) with the per-camera
    image→text and text→image supervised contrastive losses, on cached features.

    Args:
        model: the [`IdentityPromptLearner`] (its CCAFL model must be frozen).
        args: the [`PromptLearningConfig`] (a [`CCAFLTrainingArguments`] is turned into one with its
            `prompt_config`).
        feature_cache: the cached alignment features and labels.
    """

    def __init__(self, model: IdentityPromptLearner, args: PromptLearningConfig, feature_cache: FeatureCache, **kwargs):
        if isinstance(args, CCAFLTrainingArguments):
            args = args.prompt_config()
        trainable = [n for n, p in model.model.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"stage 1 trains only the prompts; freeze the CLIP model first (trainable: {trainable[:3]}...)")
        super().__init__(
            model=model, args=args, train_dataset=_IndexDataset(len(feature_cache)), data_collator=_collate_indices,
            **kwargs,
        )
        self.feature_cache = feature_cache
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(LabelledProgressCallback(lambda: "Prompt learning"))

    def create_optimizer(self, model=None):
        """Adam with L2 weight decay on the prompt vectors (the reference optimiser)."""
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.Adam(params, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """``--prompt_lr_schedule epoch_cosine``: the reference's per-epoch warm-up and cosine
        (`ccafl_hf.trainers.schedules.prompt_epoch_lr`); ``cosine``: the Trainer's per-step cosine with warm-up."""
        args = self.args
        if self.lr_scheduler is None and args.prompt_lr_schedule == "epoch_cosine":
            steps_per_epoch = max(1, len(self.get_train_dataloader()) // args.gradient_accumulation_steps)
            schedule = dict(base_lr=args.learning_rate, epochs=args.num_train_epochs,
                            warmup_epochs=args.prompt_warmup_epochs, warmup_lr=args.prompt_warmup_lr,
                            min_lr=args.prompt_min_lr)
            self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer,
                                         lambda step: prompt_epoch_lr_factor(step, steps_per_epoch, **schedule))
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cache = self.feature_cache
        indices = inputs["indices"].to(cache.features.device)
        intra_ids, camids = cache.intra_ids[indices], cache.camids[indices]
        text_features = model(intra_ids)
        loss = prompt_contrastive_loss(cache.features[indices], text_features, intra_ids, camids)
        self._check_finite(loss)
        return (loss, {"text_features": text_features}) if return_outputs else loss

    def _check_finite(self, loss: torch.Tensor) -> None:
        """A NaN or infinite loss on any process stops stage 1 with a `NonFiniteError` naming the step."""
        bad = self.accelerator.gather((~torch.isfinite(loss.detach().float())).reshape(1))
        if bool(bad.any()):
            raise NonFiniteError(
                f"non-finite loss at step {self.state.global_step + 1} (PROMPT, epoch {int(self.state.epoch or 0)}): "
                "the prompts diverged; lower --prompt_learning_rate or --prompt_init_std")

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Checkpoints hold the prompt adapter only (PEFT files), never a copy of CLIP."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        torch.save(self.args, f"{output_dir}/training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        from ..prompts import ADAPTER_WEIGHTS_NAME, PROMPT_WEIGHTS_KEY

        learner = self.accelerator.unwrap_model(model if model is not None else self.model)
        weights = load_file(f"{resume_from_checkpoint}/{ADAPTER_WEIGHTS_NAME}")[PROMPT_WEIGHTS_KEY]
        learner.prompt_embedding.embedding.weight.data.copy_(weights)


__all__ = ["FeatureCache", "PromptLearningTrainer"]
