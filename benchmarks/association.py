"""Benchmark of scalable cross-camera association (issue 7 targets).

(a) N ~ 50,000 identities, 10 cameras, 512-d, M = 1.5 N: time of ``associate_across_cameras`` versus
    one pass of row-chunked all-pairs similarities ``x @ x.T`` (torch and numpy, the faster one is
    the reference), measured in the same run; extra peak memory (RSS high-water mark) of the association.
    Targets: <= 1.5x the time, <= 4 GB extra.
(b) N ~ 9,000: time versus a dense method written as the reference code does it (full N x N distance
    matrix, mask same camera, M smallest, greedy walk, components) and the same partition.
    Target: <= 0.5x the time.

Usage: ``PYTHONPATH=src python benchmarks/association.py [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ccafl_hf.association import associate_across_cameras, association_diagnostics


def clustered_identities(num_ids: int, num_cams: int, dim: int, seed: int = 0):
    """Intra-camera identities as noisy views of ~num_ids/2.5 persons, each seen by 1-5+ cameras.

    Returns L2-normalised float32 features [N, dim], camera ids [N] and true person ids [N].
    """
    rng = np.random.default_rng(seed)
    num_persons = int(num_ids / 2.5)
    cams_per_person = np.minimum(1 + rng.binomial(num_cams - 1, 1.5 / (num_cams - 1), num_persons), num_cams)
    rank = np.argsort(rng.random((num_persons, num_cams)), axis=1)  # random camera order per person
    pid, slot = np.nonzero(np.arange(num_cams)[None, :] < cams_per_person[:, None])
    cam = rank[pid, slot]
    keep = rng.permutation(len(pid))[:num_ids]
    pid, cam = pid[keep], cam[keep]
    persons = rng.standard_normal((num_persons, dim), dtype=np.float32) / math.sqrt(dim)
    bias = 0.4 * rng.standard_normal((num_cams, dim), dtype=np.float32) / math.sqrt(dim)
    x = (
        persons[pid]
        + bias[cam]
        + 0.45 * rng.standard_normal((len(pid), dim), dtype=np.float32) / math.sqrt(dim)
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), cam.astype(np.int64), pid


def all_pairs_pass_torch(x: np.ndarray, chunk: int = 512) -> float:
    """One pass of row-chunked ``x @ x.T`` (the similarities any exact search must compute); seconds.

    Writes into a preallocated chunk buffer: a fresh output per chunk costs page faults that would
    make the reference pass (and so the ratio) look better than it is.
    """
    xt = torch.from_numpy(x)
    out = torch.empty(chunk, len(xt))
    t0 = time.perf_counter()
    for s in range(0, len(xt), chunk):
        rows = xt[s : s + chunk]
        torch.matmul(rows, xt.T, out=out[: len(rows)])
    return time.perf_counter() - t0


def all_pairs_pass_numpy(x: np.ndarray, chunk: int = 512) -> float:
    """Same pass as :func:`all_pairs_pass_torch` with numpy's BLAS; seconds."""
    out = np.empty((chunk, len(x)), np.float32)
    t0 = time.perf_counter()
    for s in range(0, len(x), chunk):
        rows = x[s : s + chunk]
        np.matmul(rows, x.T, out=out[: len(rows)])
    return time.perf_counter() - t0


def dense_association(x: np.ndarray, cams: np.ndarray, num_pairs: int) -> np.ndarray:
    """The reference approach: full distance matrix, same-camera and lower triangle masked, M smallest."""
    n = len(x)
    xt = torch.from_numpy(x)
    sq = (xt * xt).sum(1)
    dist = sq[:, None] + sq[None, :] - 2.0 * (xt @ xt.T)
    ct = torch.from_numpy(cams)
    dist.masked_fill_(ct[:, None] == ct[None, :], float("inf"))
    dist.masked_fill_(torch.ones(n, n, dtype=torch.bool).tril_(), float("inf"))
    _, flat = torch.topk(dist.view(-1), num_pairs, largest=False, sorted=True)
    del dist
    ii, jj = (flat // n).tolist(), (flat % n).tolist()
    cam_list = cams.tolist()
    has_partner = set()
    acc_i, acc_j = [], []
    for i, j in zip(ii, jj):
        if (i, cam_list[j]) not in has_partner and (j, cam_list[i]) not in has_partner:
            has_partner.add((i, cam_list[j]))
            has_partner.add((j, cam_list[i]))
            acc_i.append(i)
            acc_j.append(j)
    graph = coo_matrix((np.ones(len(acc_i)), (acc_i, acc_j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    labels = np.full(n, -1, np.int64)
    associated = np.zeros(n, bool)
    associated[acc_i] = True
    associated[acc_j] = True
    mapping = {}
    for u in np.flatnonzero(associated):  # number clusters by smallest member
        labels[u] = mapping.setdefault(comp[u], len(mapping))
    return labels


class PeakRSS:
    """Extra peak resident memory over a block (Linux): resets the high-water mark via clear_refs,
    falling back to a sampling thread where that is not allowed."""

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    def __enter__(self):
        self.base = self._status("VmRSS:")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.sampler = None
        except OSError:
            self.peak, self.stop = self.base, threading.Event()

            def sample():
                while not self.stop.wait(0.01):
                    self.peak = max(self.peak, self._status("VmRSS:"))

            self.sampler = threading.Thread(target=sample, daemon=True)
            self.sampler.start()
        return self

    def __exit__(self, *exc):
        if self.sampler is None:
            self.peak = self._status("VmHWM:")
        else:
            self.stop.set()
            self.sampler.join()
        self.extra = self.peak - self.base


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds) for development")
    parser.add_argument("--large", type=int, default=50_000, help="N for part (a)")
    parser.add_argument("--medium", type=int, default=9_000, help="N for part (b)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--cameras", type=int, default=10)
    parser.add_argument("--rate", type=float, default=1.5, help="M = rate * N")
    args = parser.parse_args()
    if args.quick:
        args.large, args.medium = 6_000, 2_000
    print(f"threads: torch {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")

    warm_x, warm_c, _ = clustered_identities(500, args.cameras, args.dim, seed=9)
    associate_across_cameras(warm_x, warm_c, 750)
    all_pairs_pass_torch(warm_x)

    # (a) large N: association vs one all-pairs similarity pass.
    x, cams, pids = clustered_identities(args.large, args.cameras, args.dim, seed=0)
    n, m = len(x), int(args.rate * len(x))
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        labels, pairs = associate_across_cameras(x, cams, m, return_pairs=True)
        t_assoc = time.perf_counter() - t0
    t_torch = all_pairs_pass_torch(x)
    t_numpy = all_pairs_pass_numpy(x)
    t_ref = min(t_torch, t_numpy)
    diag = association_diagnostics(labels, pids, cams, pairs)
    print(f"(a) N={n}, cameras={args.cameras}, D={args.dim}, M={m}")
    print(f"    association {t_assoc:.2f}s | x @ x.T pass: torch {t_torch:.2f}s, numpy {t_numpy:.2f}s")
    print(f"    time ratio vs fastest pass {t_assoc / t_ref:.2f}x (target <= 1.5x)")
    print(
        f"    extra peak memory {mem.extra / 2**30:.3f} GiB (target <= 4 GB); dense matrix would be "
        f"{n * n * 4 / 2**30:.1f} GiB"
    )
    print(
        f"    accepted pairs {diag['num_accepted_pairs']}, clusters {diag['num_clusters']}, pair precision "
        f"{diag['pair_precision']:.3f}, purity {diag['cluster_purity']:.3f}"
    )

    # (b) medium N: association vs dense method, same partition.
    x, cams, _ = clustered_identities(args.medium, args.cameras, args.dim, seed=1)
    n, m = len(x), int(args.rate * len(x))
    t0 = time.perf_counter()
    labels = associate_across_cameras(x, cams, m)
    t_assoc = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense_labels = dense_association(x, cams, m)
    t_dense = time.perf_counter() - t0
    same = bool(np.array_equal(labels, dense_labels))
    print(
        f"(b) N={n}, M={m}: association {t_assoc:.2f}s, dense {t_dense:.2f}s, ratio {t_assoc / t_dense:.2f}x "
        f"(target <= 0.5x); same partition: {same}"
        + ("" if same else f" ({int((labels != dense_labels).sum())} labels differ)")
    )


if __name__ == "__main__":
    main()
