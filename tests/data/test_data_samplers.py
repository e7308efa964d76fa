"""P×K identity sampler: the authors' one-chunk-per-identity rule (against a slow port of it), the
``max(1, n // K)`` option, batch structure, chained epochs, and the global batch split over processes."""

from __future__ import annotations

import random
from collections import Counter
from math import comb

import numpy as np
import pytest

from ccafl_hf.data import (
    FixedLengthSampler,
    RandomIdentityBatchSampler,
    RandomIdentitySampler,
    ReIDDatasetError,
)
from ccafl_hf.data.samplers import identities_per_process


def _labels(counts, seed=0):
    """Identity labels with ``counts[i]`` images of identity i, in shuffled dataset order."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


UNEVEN = [1, 2, 3, 4, 5, 7, 8, 9, 12, 30, 4, 4, 6, 2, 11, 3]


def _batches(sampler):
    flat = np.asarray(list(sampler))
    assert flat.size == len(sampler)
    return flat.reshape(-1, sampler.batch_size)


def reference_pass(images_of: dict[int, list[int]], k: int, p: int, rng: random.Random) -> list[list[int]]:
    """Slow port of the authors' pass (METHOD §9a): identities shuffled, each gives ONE chunk — its list (K
    copies of it when shorter than K) shuffled, the first K taken; consecutive P chunks make a batch."""
    stream = []
    keys = list(images_of)
    rng.shuffle(keys)
    for key in keys:
        values = list(images_of[key])
        values = values * k if len(values) < k else values
        rng.shuffle(values)
        stream.extend(values[:k])
    return [stream[i : i + p * k] for i in range(0, len(stream), p * k)]


@pytest.mark.parametrize("sampling", ["identity", "image"])
@pytest.mark.parametrize("counts,k,batch", [(UNEVEN, 4, 16), (UNEVEN, 2, 12), ([4] * 10, 4, 8), ([200, 3, 3, 3], 2, 8)])
def test_every_batch_is_p_identities_times_k(counts, k, batch, sampling):
    labels = _labels(counts)
    sampler = RandomIdentitySampler(labels, num_instances=k, batch_size=batch, seed=3, sampling=sampling)
    p = batch // k
    batches = _batches(sampler)
    assert len(batches) == sampler.num_batches > 0
    for rows in batches:
        ids = labels[rows].reshape(p, k)
        assert (ids == ids[:, :1]).all()  # K consecutive images of one identity
        assert len(set(ids[:, 0].tolist())) == p  # P distinct identities
    for chunk in batches.reshape(-1, k):
        n = counts[labels[chunk[0]]]
        multiplicity = max(Counter(chunk.tolist()).values())
        assert multiplicity == 1 if n >= k else multiplicity <= k  # no image twice unless n < K


def test_identity_rule_gives_every_identity_one_chunk_per_pass():
    """The authors' rule: N // P batches, each identity at most once per pass, exactly N - (N mod P) of them;
    the ``image`` rule draws an identity with 30 images far more often."""
    counts = UNEVEN * 3 + [1, 2, 50]  # 51 identities, P = 4: 12 batches, 3 sit out each pass
    labels = _labels(counts)
    sampler = RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=0)
    assert sampler.num_batches == len(counts) // 4 == 12
    seen_by_pass = []
    for epoch in range(30):
        sampler.set_epoch(epoch)
        ids = labels[_batches(sampler)].reshape(-1, 4)[:, 0]
        assert len(ids) == len(set(ids.tolist())) == 48
        seen_by_pass.append(set(ids.tolist()))
    assert len(set.union(*seen_by_pass)) == len(counts)  # the ones left out change from pass to pass
    frequency = Counter(i for seen in seen_by_pass for i in seen)
    assert frequency[len(counts) - 1] <= 30 and frequency[len(counts) - 3] >= 20  # 50 images ~ 1 image: uniform
    image_rule = RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=0, sampling="image")
    chunks = Counter(labels[_batches(image_rule)].reshape(-1, 4)[:, 0].tolist())
    assert chunks[len(counts) - 1] >= 5  # proportional to the image count


def test_identity_rule_matches_slow_reference_port_in_distribution():
    """Chunks of the vectorised rule and of the slow port of the authors' code have the same distribution:
    n < K — the multiset of images in a chunk (n=2, K=4: one repeated image with p = 2/70); n >= K — K
    distinct images, each with probability K / n; identities in a uniformly random order."""
    k, passes = 4, 1500
    counts = [2, 3, 1, 6, 4, 9]
    labels = _labels(counts, seed=4)
    images_of = {i: np.flatnonzero(labels == i).tolist() for i in range(len(counts))}
    sampler = RandomIdentitySampler(labels, num_instances=k, batch_size=2 * k, seed=9)
    ours = {i: Counter() for i in images_of}
    theirs = {i: Counter() for i in images_of}
    first_ours, first_theirs, inclusion = Counter(), Counter(), Counter()
    rng = random.Random(0)
    for epoch in range(passes):
        sampler.set_epoch(epoch)
        batches = sampler.batches().numpy()
        inclusion.update(batches.ravel()[np.isin(batches.ravel(), images_of[5])].tolist())
        reference = np.asarray(reference_pass(images_of, k, 2, rng))
        for table, first, rows in ((ours, first_ours, batches), (theirs, first_theirs, reference)):
            chunks = rows.reshape(-1, k)
            first[int(labels[chunks[0, 0]])] += 1
            for chunk in chunks:
                table[int(labels[chunk[0]])][tuple(sorted(Counter(chunk.tolist()).values()))] += 1
    for identity in images_of:
        patterns = set(ours[identity]) | set(theirs[identity])
        total_ours, total_theirs = sum(ours[identity].values()), sum(theirs[identity].values())
        distance = sum(abs(ours[identity][q] / total_ours - theirs[identity][q] / total_theirs) for q in patterns) / 2
        assert distance < 0.04, (identity, ours[identity], theirs[identity])
    single = ours[0][(4,)] / sum(ours[0].values())  # n = 2: the chunk is one image 4 times
    assert abs(single - 2 / comb(8, 4)) < 0.015  # i.i.d. draws would give 2 / 2**4 = 0.125
    for table in (first_ours, first_theirs):  # every identity leads a pass equally often
        assert max(table.values()) - min(table.values()) < 0.08 * passes
    # n >= K: every image of the 9-image identity is in the chunk with probability K / n
    drawn = np.asarray([inclusion[i] for i in images_of[5]]) / passes
    assert np.abs(drawn - k / 9).max() < 0.05


def test_image_rule_length_matches_slow_reference():
    """``sampling="image"``: B is the largest count with B = floor(sum(min(c_i, B)) / P), c_i = max(1, n_i // K)."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        counts = rng.integers(1, 25, size=rng.integers(4, 30))
        k, p = int(rng.integers(1, 5)), int(rng.integers(2, 5))
        chunks = np.maximum(1, counts // k)
        expected = max(b for b in range(0, int(chunks.sum()) + 1) if b <= np.minimum(chunks, b).sum() // p)
        if expected == 0:
            with pytest.raises(ReIDDatasetError, match="distinct identities"):
                RandomIdentitySampler(_labels(counts), num_instances=k, batch_size=p * k, sampling="image")
            continue
        sampler = RandomIdentitySampler(_labels(counts), num_instances=k, batch_size=p * k, seed=5, sampling="image")
        assert sampler.num_batches == expected
        for epoch in range(3):
            sampler.set_epoch(epoch)
            assert len(list(sampler)) == len(sampler) == expected * p * k


def test_seeded_and_epoch_dependent():
    labels = _labels(UNEVEN)
    a = RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=7)
    b = RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=7)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=8)) != first


def test_fixed_length_epochs_chain_the_passes():
    """Epochs of a fixed number of batches are consecutive stretches of pass 0, pass 1, … (the authors'
    IterLoader carries on where the last epoch stopped), each a function of (seed, epoch)."""
    labels = _labels(UNEVEN * 2)  # 32 identities, P = 4: 8 batches per pass
    sampler = RandomIdentitySampler(labels, num_instances=4, batch_size=16, seed=2)
    chain = []
    for q in range(4):
        sampler.set_epoch(q)
        chain += list(sampler)
    fixed = FixedLengthSampler(sampler, 5 * 16)  # 5 batches per epoch
    epochs = []
    for epoch in range(6):
        fixed.set_epoch(epoch)
        epochs.append(list(fixed))
        assert len(epochs[-1]) == len(fixed) == 80
    assert sum(epochs, []) == chain[: 6 * 80]
    fixed.set_epoch(3)
    assert list(fixed) == epochs[3]
    later = FixedLengthSampler(sampler, 5 * 16, first_epoch=2)  # a loop that starts at epoch 2 (ICAL alone)
    later.set_epoch(1)
    assert list(later) == epochs[3]


def _accelerate_shards(sampler, num_processes, per_device):
    """What 🤗 Trainer does with the sampler on ``num_processes`` processes: a DataLoader of per-device batches,
    sharded by Accelerate's `prepare_data_loader` (as `Trainer.get_train_dataloader` calls it)."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    shards = []
    for rank in range(num_processes):
        loader = DataLoader(list(range(10_000)), sampler=sampler, batch_size=per_device, drop_last=True)
        shards.append(prepare_data_loader(loader, num_processes=num_processes, process_index=rank,
                                          put_on_device=False))
    return shards


@pytest.mark.parametrize("sampling", ["identity", "image"])
@pytest.mark.parametrize("num_processes", [1, 2, 4])
def test_union_of_process_batches_is_the_single_process_batch(num_processes, sampling):
    """The global-batch property, over two chained epochs with identities of fewer than K images: at every step
    the N per-process batches (P/N whole identities × K each), in rank order, are the one-process batch — both
    with ``num_replicas/rank`` and through Accelerate's sharding of the Trainer's sampler; same step count."""
    counts = UNEVEN * 2 + [1, 1, 2, 3]  # 36 identities, 8 of them with fewer than K = 4 images
    labels = _labels(counts, seed=6)
    k, p, steps = 4, 8, 7  # 4 batches per pass: the 2 epochs of 7 steps chain 4 passes
    single = FixedLengthSampler(RandomIdentitySampler(labels, k, p * k, seed=3, sampling=sampling), steps * p * k)
    per_process = [FixedLengthSampler(RandomIdentitySampler(labels, k, p * k, seed=3, num_replicas=num_processes,
                                                            rank=rank, sampling=sampling), steps * p * k // num_processes)
                   for rank in range(num_processes)]
    trainer_sampler = FixedLengthSampler(RandomIdentitySampler(labels, k, p * k, seed=3, sampling=sampling),
                                         steps * p * k)
    shards = _accelerate_shards(trainer_sampler, num_processes, p * k // num_processes)
    small_seen = 0
    for epoch in range(2):
        for s in (single, *per_process):
            s.set_epoch(epoch)
        for shard in shards:
            shard.set_epoch(epoch)
        reference = np.asarray(list(single)).reshape(steps, p * k)
        own = [np.asarray(list(s)).reshape(steps, p * k // num_processes) for s in per_process]
        accelerated = [[batch.tolist() for batch in shard] for shard in shards]
        assert all(len(batches) == steps for batches in accelerated)
        for step in range(steps):
            np.testing.assert_array_equal(np.concatenate([o[step] for o in own]), reference[step])
            np.testing.assert_array_equal(np.concatenate([a[step] for a in accelerated]), reference[step])
            for part in own:
                ids = labels[part[step]].reshape(-1, k)
                assert (ids == ids[:, :1]).all() and len(ids) == p // num_processes  # whole identities
            small_seen += int(sum(counts[i] < k for i in labels[reference[step]].reshape(-1, k)[:, 0]))
    assert small_seen > 0


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
    with pytest.raises(ValueError, match="sampling must be one of identity, image"):
        RandomIdentitySampler(list(range(40)), num_instances=1, batch_size=4, sampling="uniform")
    with pytest.raises(ValueError, match=r"P=6 cannot be split over N=4 processes.*--num_identities_per_batch 4 or 8"):
        RandomIdentitySampler(list(range(40)), num_instances=1, batch_size=6, num_replicas=4, rank=0)


@pytest.mark.parametrize("p,n,nearest", [(16, 3, "15"), (6, 4, "4 or 8"), (2, 4, "4"), (17, 2, "16 or 18"), (7, 8, "8")])
def test_nearest_valid_p_is_named(p, n, nearest):
    with pytest.raises(ValueError) as error:
        identities_per_process(p, n)
    assert f"P={p}" in str(error.value) and f"N={n}" in str(error.value)
    assert f"--num_identities_per_batch {nearest}," in str(error.value)
    assert identities_per_process(8, 4) == 2 and identities_per_process(16, 1) == 16
