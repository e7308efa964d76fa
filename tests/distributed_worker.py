"""Worker of test_distributed.py: a short ICDL + ICAL run under several processes; every rank
writes its memory buffers and pseudo-labels so the test can compare them."""

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
from ccafl_hf.pipeline import _set_trainable_for_image_stages
from ccafl_hf.trainers import CCAFLForTraining, CCAFLTrainingArguments, ICALTrainer, ICDLTrainer


def main(data_dir: str, out_dir: str) -> None:
    dataset = load_reid_dataset("market1501", data_dir)  # the synthetic data is a Market-1501 layout
    info = dataset_summary(dataset)
    model, processor = create_tiny_model(seed=0)
    _set_trainable_for_image_stages(model)
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    train_collator = ReIDCollator(build_train_transform(64, 32, mean, std))
    eval_collator = ReIDCollator(build_eval_transform(64, 32, mean, std))
    args = CCAFLTrainingArguments(
        output_dir=out_dir, num_identities_per_batch=4, num_instances=4, iters_per_epoch=3, icdl_epochs=1,
        ical_epochs=1, memory_instances=4, warmup_epochs=0, per_device_eval_batch_size=64, disable_tqdm=True,
        logging_strategy="no", save_strategy="no", seed=0, ddp_find_unused_parameters=True,
        adversarial_start_epoch=1, adversarial_end_epoch=1, ical_image_text_start_epoch=1,
    )
    module = CCAFLForTraining(model, torch.as_tensor(info.identity_camids), None, args)
    icdl = ICDLTrainer(module, args.stage_arguments("icdl"), dataset["train"], train_collator, eval_collator)
    icdl.train()
    rank = icdl.args.process_index
    camera_memory = {f"icdl.{k}": v.detach().cpu().contiguous().float() for k, v in module.camera_memory.state_dict().items()}
    ical = ICALTrainer(module, args.stage_arguments("ical"), dataset["train"], train_collator, eval_collator,
                       epoch_offset=1)
    ical.train()
    state = {**camera_memory,
             "ical.pseudo_labels": module.pseudo_labels.cpu().contiguous(),
             "ical.cluster_centroids": module.cluster_memory.centroids.detach().cpu().contiguous(),
             "world_size": torch.tensor(icdl.args.world_size)}
    save_file(state, f"{out_dir}/rank{rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
