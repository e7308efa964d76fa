"""Stages 2–3 trainers on the synthetic data: ICDL raises within-camera mAP, ICAL raises
cross-camera mAP, memories and pseudo-labels live in the state dict and survive resume."""

import numpy as np
import pytest
import torch

from ccafl_hf import create_tiny_model
from ccafl_hf.data import ReIDCollator, build_eval_transform, build_train_transform
from ccafl_hf.inference import evaluate_reid_model, extract_features
from ccafl_hf.pipeline import _set_trainable_for_image_stages
from ccafl_hf.trainers import CCAFLForTraining, CCAFLTrainingArguments, ICALTrainer, ICDLTrainer


def _collators(model, processor):
    height, width = model.config.image_size
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    return (ReIDCollator(build_train_transform(height, width, mean, std)),
            ReIDCollator(build_eval_transform(height, width, mean, std)))


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path), num_identities_per_batch=8, num_instances=4, iters_per_epoch=8,
        icdl_epochs=2, ical_epochs=2, memory_instances=4, warmup_epochs=1, learning_rate=1e-3,
        ical_image_text_start_epoch=2, adversarial_start_epoch=3, adversarial_end_epoch=3,
        per_device_eval_batch_size=128, disable_tqdm=True, logging_strategy="no", save_strategy="no", seed=0,
    )
    values.update(overrides)
    return CCAFLTrainingArguments(**values)


def _within_camera_map(features: torch.Tensor, intra_ids: torch.Tensor, camids: torch.Tensor) -> float:
    """mAP of retrieving the same intra-camera identity among the other images of the same camera."""
    sims = features @ features.T
    n = len(features)
    aps = []
    for i in range(n):
        others = (camids == camids[i]) & (torch.arange(n) != i)
        order = torch.argsort(sims[i][others], descending=True)
        hits = (intra_ids[others] == intra_ids[i])[order].float()
        if hits.sum() == 0:
            continue
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return float(np.mean(aps))


@pytest.fixture
def training_setup(small_synthetic):
    dataset, info = small_synthetic
    model, processor = create_tiny_model(seed=0)
    _set_trainable_for_image_stages(model)
    train_collator, eval_collator = _collators(model, processor)
    return dataset, info, model, processor, train_collator, eval_collator


def test_icdl_raises_within_camera_map(training_setup, tmp_path):
    dataset, info, model, _, train_collator, eval_collator = training_setup
    args = _args(tmp_path, iters_per_epoch=15, icdl_epochs=3)
    module = CCAFLForTraining(model, torch.as_tensor(info.identity_camids), None, args)

    def within_map():
        extracted = extract_features(model, dataset["train"], eval_collator, progress=False)
        return _within_camera_map(extracted.reid_features, extracted.labels["intra_ids"], extracted.labels["camids"])

    before = within_map()
    trainer = ICDLTrainer(module, args.stage_arguments("icdl"), dataset["train"], train_collator, eval_collator)
    trainer.train()
    after = within_map()
    assert after > before + 0.05, (before, after)
    # memories were built and are part of the state dict
    state = module.state_dict()
    assert "camera_memory.centroids" in state and "camera_memory.instances" in state
    assert bool(module.camera_memory.initialized)


def test_batches_never_carry_cross_camera_identity(training_setup, tmp_path):
    dataset, info, model, _, train_collator, eval_collator = training_setup
    args = _args(tmp_path)
    module = CCAFLForTraining(model, torch.as_tensor(info.identity_camids), None, args)
    trainer = ICDLTrainer(module, args.stage_arguments("icdl"), dataset["train"], train_collator, eval_collator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) <= {"pixel_values", "camids", "intra_ids", "cam_pids", "indices"}
    assert not any(key == "pid" or "diagnostic" in key for key in batch)
    # P×K layout: P distinct identities, K images each
    ids = batch["intra_ids"]
    assert ids.numel() == args.pk_batch_size and ids.unique().numel() == args.num_identities_per_batch


def test_ical_raises_cross_camera_map_over_icdl(training_setup, tmp_path):
    dataset, info, model, _, train_collator, eval_collator = training_setup
    args = _args(tmp_path, icdl_epochs=3, ical_epochs=3, iters_per_epoch=10)
    module = CCAFLForTraining(model, torch.as_tensor(info.identity_camids), None, args)
    ICDLTrainer(module, args.stage_arguments("icdl"), dataset["train"], train_collator, eval_collator).train()
    icdl = evaluate_reid_model(model, dataset["query"], dataset["gallery"], eval_collator, progress=False)
    trainer = ICALTrainer(module, args.stage_arguments("ical"), dataset["train"], train_collator, eval_collator,
                          epoch_offset=args.icdl_epochs, diagnostic_pids=info.identity_diagnostic_pids)
    trainer.train()
    ical = evaluate_reid_model(model, dataset["query"], dataset["gallery"], eval_collator, progress=False)
    assert ical["mAP"] > icdl["mAP"], (icdl["mAP"], ical["mAP"])
    # one association per epoch, logged with diagnostics; pseudo-labels live in a buffer
    assert len(trainer.association_log) == args.ical_epochs
    assert {"cluster_purity", "num_accepted_pairs"} <= set(trainer.association_log[-1])
    assert (module.pseudo_labels >= 0).any()
    assert "pseudo_labels" in module.state_dict()


def test_icdl_and_ical_under_bf16_autocast(training_setup, tmp_path):
    """Accelerate mixed precision on the CPU (bf16): steps run, losses stay finite, fp32 memories."""
    dataset, info, model, _, train_collator, eval_collator = training_setup
    args = _args(tmp_path, bf16=True, iters_per_epoch=3, icdl_epochs=1, ical_epochs=1,
                 adversarial_start_epoch=1, adversarial_end_epoch=1, ical_image_text_start_epoch=1)
    module = CCAFLForTraining(model, torch.as_tensor(info.identity_camids), None, args)
    icdl = ICDLTrainer(module, args.stage_arguments("icdl"), dataset["train"], train_collator, eval_collator)
    assert icdl.args.bf16
    icdl.train()
    ical = ICALTrainer(module, args.stage_arguments("ical"), dataset["train"], train_collator, eval_collator,
                       epoch_offset=1)
    result = ical.train()
    assert np.isfinite(result.training_loss)
    assert module.camera_memory.centroids.dtype == torch.float32
    assert torch.isfinite(module.camera_memory.centroids).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
