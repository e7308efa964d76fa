"""ReID data on 🤗 datasets: readers (Market-1501, DukeMTMC-reID, MSMT17, custom cameras, any 🤗 datasets
dataset, the embedded synthetic dataset), P×K identity sampling, transforms and collation.

Typical use::

    dataset = load_reid_dataset("synthetic")                  # DatasetDict: train / query / gallery
    info = dataset_summary(dataset)                           # N identities, cameras, identity -> camera
    sampler = RandomIdentitySampler(dataset["train"]["intra_id"], num_instances=4, batch_size=32)
    collate = ReIDCollator(build_train_transform(256, 128, mean, std))
    loader = DataLoader(dataset["train"], batch_size=32, sampler=sampler, collate_fn=collate)
    batch = next(iter(loader))   # pixel_values [32, 3, 256, 128], camids, intra_ids, cam_pids

The train split's ``diagnostic_pid`` (cross-camera ground truth) is for diagnostics only: the
collator never puts it in a batch.
"""

from .collate import LABEL_KEYS, ReIDCollator
from .datasets import (
    ReIDDatasetInfo,
    ReIDSource,
    SplitRecords,
    available_datasets,
    dataset_summary,
    intra_camera_index,
    load_reid_dataset,
    register_reader,
)
from .errors import ReIDDatasetError
from .images import find_corrupt_images, load_image
from .samplers import SAMPLING_RULES, FixedLengthSampler, RandomIdentityBatchSampler, RandomIdentitySampler
from .synthetic import (
    SyntheticReIDConfig,
    camera_styles,
    default_synthetic_root,
    describe_look,
    generate_synthetic_reid,
    identity_caption,
    identity_look,
    render_image,
)
from .transforms import build_eval_transform, build_train_transform

__all__ = [
    "LABEL_KEYS",
    "SAMPLING_RULES",
    "FixedLengthSampler",
    "RandomIdentityBatchSampler",
    "RandomIdentitySampler",
    "ReIDCollator",
    "ReIDDatasetError",
    "ReIDDatasetInfo",
    "ReIDSource",
    "SplitRecords",
    "SyntheticReIDConfig",
    "available_datasets",
    "build_eval_transform",
    "build_train_transform",
    "camera_styles",
    "dataset_summary",
    "default_synthetic_root",
    "describe_look",
    "find_corrupt_images",
    "generate_synthetic_reid",
    "identity_caption",
    "identity_look",
    "intra_camera_index",
    "load_image",
    "load_reid_dataset",
    "register_reader",
    "render_image",
]
