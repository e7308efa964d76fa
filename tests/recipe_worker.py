"""Worker of test_multiprocess_recipe.py: short stage-2/3 loops of the tiny model, run by one process or by
several (gloo); each config writes, per rank, the final memories, classifier and model state, the optimiser
steps and every step's per-process batch (dataset indices), so the test can compare 1 and N processes.

Configs: ``nobn`` (ViT without BatchNorm: neck "none"), ``syncbn`` (BN neck, synchronised), ``nosync``
(BN neck, ``sync_batchnorm=False``), ``scaled`` (``scale_batch_with_processes``). The train collator has no
random augmentation, so one and N processes see the same pixels."""

import logging
import sys

import torch
from safetensors.torch import save_file
from transformers import set_seed

from ccafl_hf import create_tiny_model
from ccafl_hf.data import ReIDCollator, build_eval_transform, dataset_summary, load_reid_dataset
from ccafl_hf.trainers import CCAFLForTraining, CCAFLTrainer, CCAFLTrainingArguments
from ccafl_hf.trainers.distributed import SynchronisedBatchNorm

P, K, ITERS = 4, 2, 3


class RecordingTrainer(CCAFLTrainer):
    """Keeps the dataset rows of every step's per-process batch."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.rows.append(inputs["row"].cpu())
        return super().training_step(model, inputs, num_items_in_batch)


class IndexedCollator(ReIDCollator):
    def __call__(self, rows):
        batch = super().__call__(rows)
        batch["row"] = torch.as_tensor([row["row"] for row in rows])
        return batch


def run(config: str, data_dir: str, out_dir: str) -> None:
    dataset = load_reid_dataset("market1501", data_dir)
    train = dataset["train"].add_column("row", list(range(len(dataset["train"]))))
    info = dataset_summary(dataset)
    overrides = {"neck": "none", "reid_feature": "pooled"} if config == "nobn" else {}
    model, processor = create_tiny_model(seed=0, **overrides)
    collator = IndexedCollator(build_eval_transform(64, 32, processor.image_processor.image_mean,
                                                    processor.image_processor.image_std))
    args = CCAFLTrainingArguments(
        output_dir=f"{out_dir}/{config}", num_identities_per_batch=P, num_instances=K, iters_per_epoch=ITERS,
        icdl_epochs=1, ical_epochs=1, memory_instances=4, warmup_epochs=0, per_device_eval_batch_size=64,
        disable_tqdm=True, logging_strategy="no", save_strategy="no", seed=0, report_to="none",
        adversarial_start_epoch=1, adversarial_end_epoch=1, ical_image_text_start_epoch=1, random_erasing_prob=0.0,
        sync_batchnorm=config != "nosync", scale_batch_with_processes=config == "scaled",
        optimizer="sgd", learning_rate=1e-2,  # Adam would turn the float noise of mathematically zero gradients
        # (attention key biases, the bias before the BN neck) into steps of size lr: see docs/training.md
    )
    set_seed(0)  # as the pipeline does: the classifier's initialisation draws from the global generator
    module = CCAFLForTraining(model, torch.as_tensor(info.identity_camids), None, args)
    stages = [("icdl",), ("ical",)] if config in ("nobn", "syncbn") else [("icdl",)]
    state, rows, steps = {}, [], []
    for stage in stages:
        trainer = RecordingTrainer(module, args, train, collator, collator, stages=stage)
        trainer.rows = rows
        trainer.train()
        steps.append(trainer.state.global_step)
        state[f"{stage[0]}.per_device_batch"] = torch.tensor(trainer.args.per_device_train_batch_size)
    state |= {f"memory.{k}": v.detach().float().contiguous() for k, v in module.camera_memory.state_dict().items()}
    if len(stages) == 2:
        state["cluster.centroids"] = module.cluster_memory.centroids.detach().contiguous()
        state["classifier.weight"] = module.classifier.weight.detach().contiguous()
    state |= {f"model.{k}": v.detach().float().contiguous() for k, v in model.state_dict().items()}
    state |= {"steps": torch.tensor(steps), "rows": torch.stack(rows),
              "world_size": torch.tensor(trainer.args.world_size),
              "neck_synchronised": torch.tensor(isinstance(model.neck, SynchronisedBatchNorm))}
    save_file(state, f"{out_dir}/{config}.rank{trainer.args.process_index}.safetensors")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # the trainers' setup lines (batch split, SyncBatchNorm) reach stderr
    for name in sys.argv[3:]:
        run(name, sys.argv[1], sys.argv[2])
