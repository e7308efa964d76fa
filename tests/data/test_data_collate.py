"""Transforms and collation: shapes, named keys, no cross-camera ground truth in train batches,
lazy handling of corrupt images, and a DataLoader pass with the P×K sampler."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader

from ccafl_hf.data import (
    RandomIdentitySampler,
    ReIDCollator,
    ReIDDatasetError,
    build_eval_transform,
    build_train_transform,
    load_reid_dataset,
)

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture
def market(market_root):
    return load_reid_dataset("market1501", market_root)


def test_transforms_shapes_and_determinism(market):
    from ccafl_hf.data import load_image

    image = load_image(market["train"][0]["image_path"])
    eval_t = build_eval_transform(32, 16, MEAN, STD)
    out = eval_t(image)
    assert out.shape == (3, 32, 16) and out.dtype == torch.float32
    assert torch.equal(out, eval_t(image))
    train_t = build_train_transform(32, 16, MEAN, STD, padding=2)
    assert train_t(image).shape == (3, 32, 16)
    no_aug = build_train_transform(32, 16, MEAN, STD, flip_p=0, padding=0, erasing_p=0)
    assert torch.allclose(no_aug(image), out)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        build_eval_transform(32, 16, (0.5,), STD)


def test_train_batches_never_carry_cross_camera_identity(market):
    collate = ReIDCollator(build_train_transform(32, 16, MEAN, STD))
    rows = [market["train"][i] for i in range(4)]
    assert "diagnostic_pid" in rows[0]  # the column exists in the split ...
    batch = collate(rows)
    assert set(batch) == {"pixel_values", "camids", "intra_ids", "cam_pids"}  # ... but never in a batch
    assert not set(batch) & {"diagnostic_pid", "pid", "pids", "diagnostic_pids"}  # the cross-camera truth never
    assert batch["pixel_values"].shape == (4, 3, 32, 16)
    assert batch["intra_ids"].tolist() == [r["intra_id"] for r in rows] and batch["intra_ids"].dtype == torch.long

    test_batch = ReIDCollator(build_eval_transform(32, 16, MEAN, STD))([market["gallery"][i] for i in range(3)])
    assert set(test_batch) == {"pixel_values", "pids", "camids"}


def test_dataloader_with_identity_sampler(market):
    train = market["train"]
    sampler = RandomIdentitySampler(train["intra_id"], num_instances=2, batch_size=4, seed=0)
    loader = DataLoader(train, batch_size=4, sampler=sampler, collate_fn=ReIDCollator(build_train_transform(32, 16, MEAN, STD)),
                        drop_last=True)
    batches = list(loader)
    assert len(batches) == len(sampler) // 4
    for batch in batches:
        assert batch["pixel_values"].shape == (4, 3, 32, 16)
        ids = batch["intra_ids"].view(2, 2)
        assert (ids[:, 0] == ids[:, 1]).all() and ids[0, 0] != ids[1, 0]
        assert "diagnostic_pids" not in batch


def test_corrupt_image_in_a_batch(market, caplog):
    rows = [market["train"][i] for i in range(3)]
    with open(rows[1]["image_path"], "r+b") as handle:
        handle.truncate(30)
    with pytest.raises(ReIDDatasetError, match=rows[1]["image_path"].rsplit("/", 1)[-1] + ": corrupt or unreadable"):
        ReIDCollator(build_eval_transform(32, 16, MEAN, STD))(rows)
    with caplog.at_level(logging.WARNING, logger="ccafl_hf.data"):
        batch = ReIDCollator(build_eval_transform(32, 16, MEAN, STD), on_corrupt="skip")(rows)
    assert batch["pixel_values"].shape[0] == 2 and "skipping an unreadable image" in caplog.text
    assert batch["intra_ids"].tolist() == [rows[0]["intra_id"], rows[2]["intra_id"]]


def test_crop_padding_scales_with_the_input_height():
    """The reference pads 10 px at 256×128; smaller inputs keep the same geometry (a bug fix)."""
    from torchvision.transforms import v2

    from ccafl_hf.data import build_train_transform

    def padding(height, width):
        steps = build_train_transform(height, width, [0.5] * 3, [0.5] * 3).transforms
        return next(step.padding for step in steps if isinstance(step, v2.Pad))

    assert padding(256, 128) in (10, [10], [10, 10, 10, 10])
    small = padding(64, 32)
    assert (small if isinstance(small, int) else small[0]) == 2
