"""Worker of test_distributed.py: a short ICDL → ICAL loop under several processes; every rank
writes its memory buffers, pseudo-labels, classifier and model weights so the test can compare them.
With ``extract`` as third argument, every rank writes the features of the first ``EXTRACT_ROWS`` query
images instead (sharded extraction, gathered back in dataset order)."""

import sys

import torch
from safetensors.torch import save_file

from ccafl_hf import create_tiny_model
from ccafl_hf.data import (
    ReIDCollator,
    build_eval_transform,
    build_train_transform,
    dataset_summary,
    load_reid_dataset,
)
from ccafl_hf.evaluation import extract_features
from ccafl_hf.trainers import CCAFLForTraining, CCAFLTrainer, CCAFLTrainingArguments
from ccafl_hf.utils.processes import close_process_group

#: rows and batch size of the extraction check: 4 batches, the last one short (uneven shares)
EXTRACT_ROWS, EXTRACT_BATCH = 7, 2


def extract(data_dir: str, out_dir: str) -> None:
    from accelerate import Accelerator, PartialState

    accelerator = Accelerator(cpu=True)  # as `accelerate launch` on a machine without CUDA: gloo processes
    assert PartialState().num_processes == 2
    dataset = load_reid_dataset("market1501", data_dir)
    model, processor = create_tiny_model(seed=0)
    collator = ReIDCollator(build_eval_transform(64, 32, processor.image_processor.image_mean,
                                                 processor.image_processor.image_std))
    rows = dataset["query"].select(range(EXTRACT_ROWS))
    embedded = []  # images this process embeds
    forward = model.get_reid_outputs
    model.get_reid_outputs = lambda pixels: embedded.append(len(pixels)) or forward(pixels)
    state = {}
    for name, given in (("state", None), ("accelerator", accelerator)):
        out = extract_features(model, rows, collator, batch_size=EXTRACT_BATCH, accelerator=given,
                               with_alignment=True, progress=False)
        state |= {f"{name}.reid": out.reid_features.contiguous(), f"{name}.align": out.alignment_features.contiguous(),
                  f"{name}.pids": out.labels["pids"].contiguous(), f"{name}.embedded": torch.tensor(sum(embedded))}
        embedded.clear()
    save_file(state, f"{out_dir}/extract{PartialState().process_index}.safetensors")
    close_process_group()


def main(data_dir: str, out_dir: str) -> None:
    dataset = load_reid_dataset("market1501", data_dir)  # the synthetic data is a Market-1501 layout
    info = dataset_summary(dataset)
    model, processor = create_tiny_model(seed=0)
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    train_collator = ReIDCollator(build_train_transform(64, 32, mean, std))
    eval_collator = ReIDCollator(build_eval_transform(64, 32, mean, std))
    args = CCAFLTrainingArguments(
        output_dir=out_dir, num_identities_per_batch=4, num_instances=4, iters_per_epoch=3, icdl_epochs=1,
        ical_epochs=1, memory_instances=4, warmup_epochs=0, per_device_eval_batch_size=64, disable_tqdm=True,
        logging_strategy="no", save_strategy="no", seed=0, report_to="none",
        adversarial_start_epoch=1, adversarial_end_epoch=1, ical_image_text_start_epoch=1,
    )
    module = CCAFLForTraining(model, torch.as_tensor(info.identity_camids), None, memory_instances=args.memory_instances)
    trainer = CCAFLTrainer(module, args, dataset["train"], train_collator, eval_collator, stages=("icdl",))
    trainer.train()
    rank = trainer.args.process_index
    ddp = trainer.model_wrapped
    ignored = getattr(ddp, "parameters_to_ignore", set())
    camera_memory = {f"icdl.{k}": v.detach().cpu().contiguous().float()
                     for k, v in module.camera_memory.state_dict().items()}
    trainer = CCAFLTrainer(module, args, dataset["train"], train_collator, eval_collator, stages=("ical",))
    trainer.train()
    state = {**camera_memory,
             "ical.pseudo_labels": module.pseudo_labels.cpu().contiguous(),
             "ical.cluster_centroids": module.cluster_memory.centroids.detach().cpu().contiguous(),
             "classifier.weight": module.classifier.weight.detach().cpu().contiguous(),
             **{f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
             "world_size": torch.tensor(trainer.args.world_size),
             "memories_out_of_ddp_sync": torch.tensor(all(
                 name in ignored for name in ("camera_memory.instances", "camera_memory.centroids",
                                              "cluster_memory.centroids", "classifier.weight")))}
    save_file(state, f"{out_dir}/rank{rank}.safetensors")
    close_process_group()


if __name__ == "__main__":
    (extract if sys.argv[3:] == ["extract"] else main)(sys.argv[1], sys.argv[2])
