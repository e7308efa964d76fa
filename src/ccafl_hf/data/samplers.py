"""P×K sampling over intra-camera identities (docs/method.md §4): every batch holds P distinct
intra-camera identities with K images each.

How an epoch is built (all vectorised, from a private `torch.Generator` seeded by ``(seed, epoch)``):

1. every identity's images are shuffled and cut into ``c_i = max(1, n_i // K)`` chunks of K
   (an identity with fewer than K images gives one chunk drawn with replacement; leftovers
   ``n_i mod K`` are dropped this epoch, different ones next epoch);
2. identities are put in random order and their chunks laid end to end; with ``B`` batches, chunk
   ``t`` goes to batch ``t mod B``. An identity's chunks are consecutive and at most ``B``, so they
   land in different batches: each batch has P *distinct* identities;
3. batches are shuffled; with several processes rank ``r`` takes batches ``r, r + R, ...``
   (whole, disjoint P×K blocks).

``B`` depends only on the image counts, so ``len()`` is exact before iterating:
``B = floor(sum_i min(c_i, B) / P)`` (the largest such value; identities with more than ``B``
chunks contribute ``B``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from .errors import ReIDDatasetError

logger = logging.getLogger(__name__)


def _as_label_array(labels) -> np.ndarray:
    """``[M]`` int64 from a list, array, tensor or a `datasets` column."""
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if not isinstance(labels, (np.ndarray, list, tuple)) and hasattr(labels, "__getitem__"):
        labels = labels[:]  # datasets.Column: one Arrow conversion instead of a Python loop
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(1)[0])


class RandomIdentitySampler(Sampler[int]):
    """Indices in P×K blocks over intra-camera identities (see the module docstring).

    Args:
        intra_ids: ``[M]`` intra-camera identity of every training image (e.g. ``train["intra_id"]``).
        num_instances: K, images per identity in a batch.
        batch_size: P×K, images per batch (per process); ``P = batch_size // K`` distinct identities.
        seed: base seed; the epoch's order is a function of ``(seed, epoch)`` only.
        num_replicas / rank: split whole batches across processes. Leave ``None`` (one replica)
            under 🤗 Trainer/Accelerate, which already shard the batches of a sampler; pass them for a
            plain `DistributedDataParallel` loop.
        drop_last: with several replicas, drop the batches that do not divide evenly (``True``), or
            wrap around and repeat the first ones so every rank gets the same count (``False``).
    Yields:
        ``len(self)`` dataset indices; consecutive groups of ``batch_size`` form one P×K batch.
    """

    def __init__(
        self,
        intra_ids: Sequence[int] | np.ndarray | torch.Tensor,
        num_instances: int = 4,
        batch_size: int = 64,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = True,
    ) -> None:
        labels = _as_label_array(intra_ids)
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})"
            )
        if labels.size == 0:
            raise ReIDDatasetError("RandomIdentitySampler: no training images")
        if labels.min() < 0:
            raise ReIDDatasetError("RandomIdentitySampler: intra-camera identities must be >= 0")
        self.num_replicas = 1 if num_replicas is None else int(num_replicas)
        self.rank = 0 if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside [0, {self.num_replicas})")
        self.num_instances = int(num_instances)
        self.batch_size = int(batch_size)
        self.num_identities_per_batch = self.batch_size // self.num_instances
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

        # images grouped by identity (stable: dataset order within an identity)
        order = np.argsort(labels, kind="stable")
        identities, counts = np.unique(labels[order], return_counts=True)
        self._order = torch.from_numpy(order)
        self._counts = torch.from_numpy(counts)
        self._starts = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self._sorted_identity = torch.repeat_interleave(torch.arange(len(identities)), self._counts)
        self._chunks = torch.from_numpy(np.maximum(1, counts // self.num_instances))
        self.num_batches_total = self._count_batches(self._chunks.numpy(), self.num_identities_per_batch)
        if self.num_batches_total == 0:
            raise ReIDDatasetError(
                f"RandomIdentitySampler: a batch needs P={self.num_identities_per_batch} distinct identities but the "
                f"data has {len(identities)} intra-camera identities; lower batch_size or raise num_instances"
            )
        if self.num_batches_total < self.num_replicas:
            raise ReIDDatasetError(
                f"RandomIdentitySampler: {self.num_batches_total} batches per epoch cannot feed {self.num_replicas} ranks"
            )
        per_rank = self.num_batches_total // self.num_replicas
        if not self.drop_last and self.num_batches_total % self.num_replicas:
            per_rank += 1
        self.num_batches = per_rank

    @staticmethod
    def _count_batches(chunks: np.ndarray, p: int) -> int:
        """Largest ``B`` with ``B = floor(sum(min(chunks, B)) / p)`` (decreasing fixed-point iteration)."""
        batches = int(chunks.sum()) // p
        while batches > 0:
            fitted = int(np.minimum(chunks, batches).sum()) // p
            if fitted == batches:
                break
            batches = fitted
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch; its order is a pure function of ``(seed, epoch)``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def batches(self) -> torch.Tensor:
        """``[num_batches, P*K]`` dataset indices of this rank's batches for the current epoch."""
        k, p, total = self.num_instances, self.num_identities_per_batch, self.num_batches_total
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        num_ids = self._counts.numel()

        # 1. a random order of images inside each identity
        keys = torch.rand(self._order.numel(), generator=generator)
        by_key = torch.argsort(keys)
        shuffled = by_key[torch.argsort(self._sorted_identity[by_key], stable=True)]  # grouped by identity
        # 2. chunks of K: identity i contributes min(c_i, B) chunks
        chunks = torch.clamp(self._chunks, max=total)
        chunk_identity = torch.repeat_interleave(torch.arange(num_ids), chunks)
        chunk_rank = torch.arange(chunk_identity.numel()) - torch.repeat_interleave(torch.cumsum(chunks, 0) - chunks, chunks)
        slot = torch.arange(k)
        count = self._counts[chunk_identity, None]
        within = chunk_rank[:, None] * k + slot  # positions in the identity's shuffled images
        resampled = torch.floor(torch.rand(within.shape, generator=generator) * count).long()
        within = torch.where(count < k, resampled, within)  # too few images: draw K with replacement
        members = self._order[shuffled[self._starts[chunk_identity, None] + within]]  # [C, K]
        # 3. identities in random order, chunk t -> batch t mod B
        identity_rank = torch.empty(num_ids, dtype=torch.long)
        identity_rank[torch.randperm(num_ids, generator=generator)] = torch.arange(num_ids)
        chunk_order = torch.argsort(identity_rank[chunk_identity] * (total + 1) + chunk_rank)
        members = members[chunk_order[: total * p]]
        batches = members.view(p, total, k).transpose(0, 1).reshape(total, p * k)
        batches = batches[torch.randperm(total, generator=generator)]
        # 4. this rank's share of whole batches
        if self.num_replicas > 1:
            needed = self.num_batches * self.num_replicas
            if needed > total:
                batches = torch.cat([batches, batches[: needed - total]])
            batches = batches[self.rank : needed : self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[int]:
        return iter(self.batches().reshape(-1).tolist())


class RandomIdentityBatchSampler(Sampler[list[int]]):
    """The same P×K batches as lists (a ``batch_sampler`` for `torch.utils.data.DataLoader`).

    Takes the arguments of `RandomIdentitySampler`; ``len()`` is the number of batches.
    """

    def __init__(self, intra_ids, num_instances: int = 4, batch_size: int = 64, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, drop_last: bool = True) -> None:
        self.sampler = RandomIdentitySampler(intra_ids, num_instances, batch_size, seed, num_replicas, rank, drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (see `RandomIdentitySampler.set_epoch`)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.sampler.batches().tolist())
