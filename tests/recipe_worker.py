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
    module = CCAFLForTraining(model, torch.as_tensor(info.identity_camids), None, memory_instances=args.memory_instances,
                              memory_momentum=args.memory_momentum, memory_temperature=args.memory_temperature,
                              classifier_scale=args.classifier_scale)
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


def layers(out_dir: str) -> None:
    """``layers``: a BatchNorm2d (the RN50 tower's kind) and a BatchNorm1d with a frozen bias buffer (the BN
    neck's kind) on this process's slice of one fixed global batch, synchronised when there are several
    processes; writes outputs, input and weight gradients (the latter summed over processes) and running
    statistics."""
    from accelerate import PartialState

    from ccafl_hf.trainers.distributed import convert_sync_batchnorm

    state = PartialState(cpu=True)  # as `accelerate launch` on a machine without CUDA: gloo processes
    n, rank = state.num_processes, state.process_index
    saved = {}
    for name, shape, layer in (("bn2d", (8, 6, 3, 2), torch.nn.BatchNorm2d(6)), ("bn1d", (8, 6), torch.nn.BatchNorm1d(6))):
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(shape, generator=generator) * 3 + 1, torch.randn(shape, generator=generator)
        layer.weight.data.uniform_(0.5, 1.5, generator=generator)
        if name == "bn1d":
            bias = layer.bias.detach() + 0.3
            del layer.bias
            layer.register_buffer("bias", bias)
        if n > 1:
            assert convert_sync_batchnorm(layer) == 1
        part = slice(rank * 8 // n, (rank + 1) * 8 // n)
        inputs = x[part].clone().requires_grad_(True)
        for _ in range(2):  # two steps: the running statistics follow the global batch
            out = layer(inputs)
        (out * w[part]).sum().backward()
        weight_grad = layer.weight.grad.clone()
        if n > 1:
            torch.distributed.all_reduce(weight_grad)
        saved |= {f"{name}.out": out.detach(), f"{name}.input_grad": inputs.grad, f"{name}.weight_grad": weight_grad,
                  f"{name}.running_mean": layer.running_mean, f"{name}.running_var": layer.running_var}
    save_file(saved, f"{out_dir}/layers.rank{rank}.safetensors")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # the trainers' setup lines (batch split, SyncBatchNorm) reach stderr
    for name in sys.argv[3:]:
        layers(sys.argv[2]) if name == "layers" else run(name, sys.argv[1], sys.argv[2])
