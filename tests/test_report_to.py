"""Stage evaluations and association diagnostics reach `report_to` (here TensorBoard event files)."""

import pytest
import torch

from ccafl_hf import create_tiny_model
from ccafl_hf.data import ReIDCollator, build_eval_transform, build_train_transform
from ccafl_hf.trainers import CCAFLForTraining, CCAFLTrainer, CCAFLTrainingArguments

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_eval_metrics_and_association_reach_tensorboard(small_synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    dataset, info = small_synthetic
    model, processor = create_tiny_model(seed=0)
    height, width = model.config.image_size
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    args = CCAFLTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to=["tensorboard"],
        num_identities_per_batch=8, num_instances=4, iters_per_epoch=3, icdl_epochs=1, ical_epochs=2,
        memory_instances=4, warmup_epochs=1, per_device_eval_batch_size=128, disable_tqdm=True,
        save_strategy="no", seed=0,
    )
    module = CCAFLForTraining(model, torch.as_tensor(info.identity_camids), None, memory_instances=args.memory_instances)
    trainer = CCAFLTrainer(
        module, args, dataset["train"], ReIDCollator(build_train_transform(height, width, mean, std)),
        ReIDCollator(build_eval_transform(height, width, mean, std)),
        eval_dataset={"query": dataset["query"], "gallery": dataset["gallery"]},
        diagnostic_pids=info.identity_diagnostic_pids,
    )
    trainer.train()

    events = sorted((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file was written"
    tags = set()
    scalars = {}
    for path in events:
        accumulator = event_accumulator.EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            tags.add(tag)
            scalars[tag] = [event.value for event in accumulator.Scalars(tag)]
    for metric in ("mAP", "rank1", "mINP"):
        assert f"eval/{metric}" in tags, sorted(tags)
    # one evaluation at the end of each stage (ICDL, ICAL), equal to the trainer's stage results
    assert scalars["eval/mAP"][-1] == pytest.approx(trainer.stage_results["ical"]["mAP"], abs=1e-4)
    assert len(scalars["eval/mAP"]) == 2
    # one association per ICAL epoch, with its diagnostics
    assert len(scalars["train/assoc_num_clusters"]) == 2, sorted(tags)
    assert "train/assoc_cluster_purity" in tags
