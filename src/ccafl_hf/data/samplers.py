"""P×K sampling over intra-camera identities (docs/method.md §4): every batch holds P distinct
intra-camera identities with K images each, laid out identity by identity (K consecutive indices).

**One pass** (all vectorised, from a private `torch.Generator` seeded by ``(seed, pass)``), by ``sampling``:

- ``"identity"`` (default; the authors' rule): identities in random order, every identity gives
  **one** chunk of K images per pass, whatever its image count — its images shuffled, the first K
  taken; an identity with ``n < K`` images gives K draws without replacement from K copies of its
  list (each image at most K times; a chunk of one repeated image has probability ``n / C(nK, K)``,
  2/70 for ``n = 2, K = 4``). Consecutive P identities make a
  batch: ``B = N // P`` batches. The ``N mod P`` identities left at the end of a pass (different
  ones every pass) sit that pass out; the authors' code trains them as one shorter batch, ours keeps
  every step at P×K so a batch splits evenly over processes.
- ``"image"``: every identity gives ``c_i = max(1, n_i // K)`` chunks (its shuffled images cut in K,
  leftovers dropped; fewer than K images: K draws with replacement), so nearly every image is seen
  once per pass and identities with many images are drawn more often (torchreid's rule). Identities
  in random order, chunks end to end, chunk ``t`` to batch ``t mod B``; an identity's chunks are
  consecutive and at most ``B``, so a batch has P distinct identities; batches are then shuffled.
  ``B`` is the largest value with ``B = floor(sum_i min(c_i, B) / P)``.

**Epochs.** `RandomIdentitySampler` alone yields pass ``e`` at epoch ``e``. `FixedLengthSampler`
chains passes as the authors' ``IterLoader`` does (pass 0, pass 1, … end to end) and cuts the chain
into epochs of a fixed number of batches (their 200 iterations); epoch ``e`` is a pure function of
``(seed, e)``, so a resumed run draws the same batches.

**Processes.** ``batch_size`` is the *global* P×K batch. With ``num_replicas = R``, rank ``r`` yields
the ``r``-th of R equal slices of every global batch — ``P / R`` whole identities × K images — so the
union (concatenation in rank order) of the R per-process batches at step ``i`` is the batch one
process draws at step ``i`` for the same seed, and every rank runs the same number of steps.
Under 🤗 Trainer/Accelerate leave ``num_replicas`` unset and give the DataLoader a per-device batch of
``P·K / R``: Accelerate's `BatchSamplerShard` hands process ``r`` the per-device batches
``r, r + R, …`` of the stream, which are exactly those slices.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from .errors import ReIDDatasetError

logger = logging.getLogger(__name__)

#: ``sampling`` rules of a pass (see the module docstring)
SAMPLING_RULES = ("identity", "image")


def _as_label_array(labels) -> np.ndarray:
    """``[M]`` int64 from a list, array, tensor or a `datasets` column."""
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if not isinstance(labels, (np.ndarray, list, tuple)) and hasattr(labels, "__getitem__"):
        labels = labels[:]  # datasets.Column: one Arrow conversion instead of a Python loop
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(1)[0])


def identities_per_process(num_identities_per_batch: int, num_processes: int) -> int:
    """``P / N``: the identities each of ``num_processes`` processes draws from a global P×K batch.

    Raises:
        ValueError: P is not a multiple of N; the message names P, N and the nearest valid P.
    """
    p, n = int(num_identities_per_batch), max(1, int(num_processes))
    if p % n == 0:
        return p // n
    lower, upper = max(n, (p // n) * n), (p // n + 1) * n
    nearest = [v for v in (lower, upper) if abs(v - p) == min(abs(lower - p), abs(upper - p))]
    choice = " or ".join(str(v) for v in dict.fromkeys(nearest))
    raise ValueError(
        f"--num_identities_per_batch P={p} cannot be split over N={n} processes (each process takes P/N identities "
        f"of the global P×K batch): use --num_identities_per_batch {choice}, the nearest multiple of {n}, or "
        "--scale_batch_with_processes to give every process a whole P×K batch (another recipe)"
    )


def describe_pk_batch(num_identities: int, num_instances: int, num_processes: int, scale_with_processes: bool) -> str:
    """One line: the global and the per-process batch of stages 2–3 on ``num_processes`` processes
    (P already checked with `identities_per_process` unless ``scale_with_processes``)."""
    p, k, n = int(num_identities), int(num_instances), max(1, int(num_processes))
    if scale_with_processes:
        return (f"stage-2/3 batch: global {n}×{p}×{k} = {n * p * k} images per step, per process P×K = {p}×{k} = "
                f"{p * k} on {n} process(es) (--scale_batch_with_processes: not the preset's recipe)")
    return (f"stage-2/3 batch: global P×K = {p}×{k} = {p * k} images per step, per process {p // n}×{k} = "
            f"{p * k // n} on {n} process(es)")


class RandomIdentitySampler(Sampler[int]):
    """Indices in P×K blocks over intra-camera identities (see the module docstring).

    Args:
        intra_ids: ``[M]`` intra-camera identity of every training image (e.g. ``train["intra_id"]``).
        num_instances: K, images per identity in a batch.
        batch_size: P×K, images per **global** batch; ``P = batch_size // K`` distinct identities.
        seed: base seed; pass ``q`` is a function of ``(seed, q)`` only.
        num_replicas / rank: rank ``rank`` of ``num_replicas`` yields its ``P / num_replicas`` identities of
            every global batch (the union over ranks at step ``i`` is the one-process batch at step ``i``).
            Leave ``None`` under 🤗 Trainer/Accelerate (which shard per-device batches of ``P·K / R``);
            pass them for a plain `DistributedDataParallel` loop.
        sampling: ``"identity"`` (one chunk per identity per pass, the authors' rule) or ``"image"``
            (``max(1, n_i // K)`` chunks per identity).
    Yields:
        ``len(self)`` dataset indices; consecutive groups of ``batch_size / num_replicas`` form this rank's
        share of one P×K batch.
    """

    def __init__(
        self,
        intra_ids: Sequence[int] | np.ndarray | torch.Tensor,
        num_instances: int = 4,
        batch_size: int = 64,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        sampling: str = "identity",
    ) -> None:
        labels = _as_label_array(intra_ids)
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})"
            )
        if sampling not in SAMPLING_RULES:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_RULES)}, got {sampling!r}")
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
        identities_per_process(self.num_identities_per_batch, self.num_replicas)
        self.replica_batch_size = self.batch_size // self.num_replicas
        self.sampling = sampling
        self.seed = int(seed)
        self.epoch = 0

        # images grouped by identity (stable: dataset order within an identity)
        order = np.argsort(labels, kind="stable")
        identities, counts = np.unique(labels[order], return_counts=True)
        self._order = torch.from_numpy(order)
        self._counts = torch.from_numpy(counts)
        self._starts = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self._sorted_identity = torch.repeat_interleave(torch.arange(len(identities)), self._counts)
        if sampling == "identity":
            self._chunks = torch.ones(len(identities), dtype=torch.long)
            self.num_batches = len(identities) // self.num_identities_per_batch
        else:
            self._chunks = torch.from_numpy(np.maximum(1, counts // self.num_instances))
            self.num_batches = self._count_batches(self._chunks.numpy(), self.num_identities_per_batch)
        if self.num_batches == 0:
            raise ReIDDatasetError(
                f"RandomIdentitySampler: a batch needs P={self.num_identities_per_batch} distinct identities but the "
                f"data has {len(identities)} intra-camera identities; lower batch_size or raise num_instances"
            )

    @property
    def num_batches_total(self) -> int:
        """Global P×K batches per pass (every rank takes its slice of each: the same as ``num_batches``)."""
        return self.num_batches

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
        """Choose the epoch (= the pass); its order is a pure function of ``(seed, epoch)``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches * self.replica_batch_size

    def _shuffled_within_identity(self, generator: torch.Generator) -> torch.Tensor:
        """``[M]`` positions into ``self._order``, grouped by identity, in a random order inside each identity."""
        keys = torch.rand(self._order.numel(), generator=generator)
        by_key = torch.argsort(keys)
        return by_key[torch.argsort(self._sorted_identity[by_key], stable=True)]

    def _identity_pass(self, generator: torch.Generator) -> torch.Tensor:
        """``[B, P*K]`` global batches of one pass under the one-chunk-per-identity rule."""
        k, p = self.num_instances, self.num_identities_per_batch
        counts, starts = self._counts, self._starts
        shuffled = self._shuffled_within_identity(generator)
        # n >= K: the first K of the identity's shuffled images (a random K-subset, in random order)
        members = self._order[shuffled[(starts[:, None] + torch.arange(k)).clamp(max=self._order.numel() - 1)]]
        small = torch.nonzero(counts < k).flatten()
        if small.numel():
            # n < K: K draws without replacement from the n·K items of K copies of the list; item j is image j // K
            items = torch.arange(k * k)
            keys = torch.rand(small.numel(), k * k, generator=generator)
            keys = keys.masked_fill(items >= counts[small, None] * k, 2.0)  # only the n·K real items
            picked = torch.argsort(keys, dim=1)[:, :k] // k
            members[small] = self._order[starts[small, None] + picked]
        used = torch.randperm(counts.numel(), generator=generator)[: self.num_batches * p]
        return members[used].reshape(self.num_batches, p * k)

    def _image_pass(self, generator: torch.Generator) -> torch.Tensor:
        """``[B, P*K]`` global batches of one pass under the ``max(1, n_i // K)``-chunks rule."""
        k, p, total = self.num_instances, self.num_identities_per_batch, self.num_batches
        num_ids = self._counts.numel()
        shuffled = self._shuffled_within_identity(generator)
        chunks = torch.clamp(self._chunks, max=total)  # identity i contributes min(c_i, B) chunks
        chunk_identity = torch.repeat_interleave(torch.arange(num_ids), chunks)
        chunk_rank = torch.arange(chunk_identity.numel()) - torch.repeat_interleave(torch.cumsum(chunks, 0) - chunks, chunks)
        count = self._counts[chunk_identity, None]
        within = chunk_rank[:, None] * k + torch.arange(k)  # positions in the identity's shuffled images
        resampled = torch.floor(torch.rand(within.shape, generator=generator) * count).long()
        within = torch.where(count < k, resampled, within)  # too few images: draw K with replacement
        members = self._order[shuffled[self._starts[chunk_identity, None] + within]]  # [C, K]
        identity_rank = torch.empty(num_ids, dtype=torch.long)
        identity_rank[torch.randperm(num_ids, generator=generator)] = torch.arange(num_ids)
        chunk_order = torch.argsort(identity_rank[chunk_identity] * (total + 1) + chunk_rank)
        members = members[chunk_order[: total * p]]
        batches = members.view(p, total, k).transpose(0, 1).reshape(total, p * k)  # chunk t -> batch t mod B
        return batches[torch.randperm(total, generator=generator)]

    def pass_batches(self, index: int) -> torch.Tensor:
        """``[B, P*K/R]`` dataset indices of this rank's share of every global batch of pass ``index``."""
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, index))
        batches = self._identity_pass(generator) if self.sampling == "identity" else self._image_pass(generator)
        share = self.replica_batch_size
        return batches[:, self.rank * share : (self.rank + 1) * share]

    def batches(self) -> torch.Tensor:
        """``[num_batches, P*K/R]`` this rank's batches of the current epoch (= pass ``epoch``)."""
        return self.pass_batches(self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.batches().reshape(-1).tolist())


class FixedLengthSampler(Sampler[int]):
    """Epochs of exactly ``num_samples`` indices cut from the endless chain of a `RandomIdentitySampler`'s
    passes (pass 0, pass 1, … end to end, as the authors' ``IterLoader`` chains them across epochs):
    epoch ``e`` is positions ``[e·num_samples, (e+1)·num_samples)`` of the chain, a pure function of
    ``(seed, e)``. With ``num_samples = iters × P·K`` an epoch is ``iters`` whole global batches.
    ``first_epoch`` shifts the epochs (``set_epoch(e)`` yields epoch ``first_epoch + e``): a loop that
    starts later in the schedule (ICAL alone) draws the batches of those epochs."""

    def __init__(self, sampler: RandomIdentitySampler, num_samples: int, first_epoch: int = 0):
        self.sampler = sampler
        self.num_samples = int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.first_epoch = int(first_epoch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch: which stretch of the chain of passes it yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        per_pass = len(self.sampler)
        start = (self.first_epoch + self.epoch) * self.num_samples
        end = start + self.num_samples
        first, last = start // per_pass, (end - 1) // per_pass
        chain = torch.cat([self.sampler.pass_batches(q).reshape(-1) for q in range(first, last + 1)])
        offset = start - first * per_pass
        return iter(chain[offset : offset + self.num_samples].tolist())


class RandomIdentityBatchSampler(Sampler[list[int]]):
    """The same P×K batches as lists (a ``batch_sampler`` for `torch.utils.data.DataLoader`).

    Takes the arguments of `RandomIdentitySampler`; ``len()`` is the number of batches.
    """

    def __init__(self, intra_ids, num_instances: int = 4, batch_size: int = 64, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, sampling: str = "identity") -> None:
        self.sampler = RandomIdentitySampler(intra_ids, num_instances, batch_size, seed, num_replicas, rank, sampling)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (see `RandomIdentitySampler.set_epoch`)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.sampler.batches().tolist())
