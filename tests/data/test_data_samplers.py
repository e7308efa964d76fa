"""P×K identity sampler: batch structure, exact length, seeding, rank sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccafl_hf.data import RandomIdentityBatchSampler, RandomIdentitySampler, ReIDDatasetError


def _labels(counts, seed=0):
    """Identity labels with ``counts[i]`` images of identity i, in shuffled dataset order."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


UNEVEN = [1, 2, 3, 4, 5, 7, 8, 9, 12, 30, 4, 4, 6, 2, 11, 3]


def _batches(sampler):
    flat = np.asarray(list(sampler))
    assert flat.size == len(sampler)
    return flat.reshape(-1, sampler.batch_size)


@pytest.mark.parametrize("counts,k,batch", [(UNEVEN, 4, 16), (UNEVEN, 2, 12), ([4] * 10, 4, 8), ([200, 3, 3, 3], 2, 8)])
def test_every_batch_is_p_identities_times_k(counts, k, batch):
    labels = _labels(counts)
    sampler = RandomIdentitySampler(labels, num_instances=k, batch_size=batch, seed=3)
    p = batch // k
    batches = _batches(sampler)
    assert len(batches) == sampler.num_batches > 0
    for rows in batches:
        ids = labels[rows].reshape(p, k)
        assert (ids == ids[:, :1]).all()  # K consecutive images of one identity
        assert len(set(ids[:, 0].tolist())) == p  # P distinct identities
    # identities with >= K images never repeat an image inside a chunk
    for chunk in batches.reshape(-1, k):
        if counts[labels[chunk[0]]] >= k:
            assert len(set(chunk.tolist())) == k


def test_exact_length_matches_slow_reference():
    """B is the largest count with B = floor(sum(min(c_i, B)) / P), c_i = max(1, n_i // K)."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        counts = rng.integers(1, 25, size=rng.integers(4, 30))
        k, p = int(rng.integers(1, 5)), int(rng.integers(2, 5))
        chunks = np.maximum(1, counts // k)
        expected = max(b for b in range(0, int(chunks.sum()) + 1) if b <= np.minimum(chunks, b).sum() // p)
        if expected == 0:
            with pytest.raises(ReIDDatasetError, match="distinct identities"):
                RandomIdentitySampler(_labels(counts), num_instances=k, batch_size=p * k)
            continue
        sampler = RandomIdentitySampler(_labels(counts), num_instances=k, batch_size=p * k, seed=5)
        assert sampler.num_batches == expected
        for epoch in range(3):
            sampler.set_epoch(epoch)
            assert len(list(sampler)) == len(sampler) == expected * p * k


def test_reproducible_per_seed_and_epoch_without_global_rng():
    labels = _labels(UNEVEN)
    state = torch.random.get_rng_state()
    a = RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=7)
    b = RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=7)
    first = list(a)
    assert first == list(b) == list(a)  # same epoch -> same order
    a.set_epoch(1)
    assert list(a) != first  # another epoch -> another order
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=8)) != first
    assert torch.equal(torch.random.get_rng_state(), state)


def test_with_replacement_for_small_identities():
    labels = _labels([1, 2, 3, 1, 2, 3])
    sampler = RandomIdentitySampler(labels, num_instances=4, batch_size=8)
    for chunk in _batches(sampler).reshape(-1, 4):
        assert len(set(labels[chunk].tolist())) == 1  # drawn from the identity's own images


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_disjoint_whole_batches(drop_last):
    labels = _labels(UNEVEN * 3 + [16], seed=2)  # 21 batches: an odd count
    full = RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=11)
    full.set_epoch(4)
    all_batches = [tuple(b) for b in _batches(full).tolist()]
    shares = []
    for rank in range(2):
        sampler = RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=11, num_replicas=2, rank=rank,
                                        drop_last=drop_last)
        sampler.set_epoch(4)
        shares.append([tuple(b) for b in _batches(sampler).tolist()])
    assert len(shares[0]) == len(shares[1])
    total = len(all_batches)
    union = set(shares[0]) | set(shares[1])
    assert union <= set(all_batches)  # whole P×K blocks of the same epoch
    if drop_last:
        assert set(shares[0]).isdisjoint(shares[1])  # no duplicated batch across ranks
        assert len(shares[0]) == total // 2 and len(union) == 2 * (total // 2)
    else:  # every batch is used; an odd count repeats one batch on the last rank
        assert len(shares[0]) == -(-total // 2) and len(union) == total


def test_batch_sampler_form_and_dataset_column():
    from datasets import Dataset

    labels = _labels(UNEVEN)
    column = Dataset.from_dict({"intra_id": labels.tolist()})["intra_id"]
    batch_sampler = RandomIdentityBatchSampler(column, num_instances=4, batch_size=16, seed=1)
    batch_sampler.set_epoch(2)
    sampler = RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=1)
    sampler.set_epoch(2)
    batches = list(batch_sampler)
    assert len(batches) == len(batch_sampler) and all(len(b) == 16 for b in batches)
    assert [i for b in batches for i in b] == list(sampler)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler([0, 1], num_instances=4, batch_size=6)
    with pytest.raises(ReIDDatasetError, match="needs P=4 distinct identities but the data has 3"):
        RandomIdentitySampler([0, 1, 2] * 10, num_instances=2, batch_size=8)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        RandomIdentitySampler(list(range(40)), num_instances=1, batch_size=4, num_replicas=2, rank=2)
