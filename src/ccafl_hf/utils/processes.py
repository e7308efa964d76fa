"""Ending a multi-process run (``accelerate launch``, ``torchrun``) cleanly."""

from __future__ import annotations


def close_process_group() -> None:
    """Wait for every process, then destroy the default process group (a no-op in a single process).

    Call it once, at the very end of a multi-process program. Left to the interpreter's exit, the process
    group's C++ threads (gloo's worker and transport threads) are torn down during finalization, while the
    peer (rank 0 hosts the rendezvous store) may already be gone: on a loaded machine a process then dies
    with ``terminate called without an active exception`` (SIGABRT) after all its work succeeded.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody tears down while a peer still uses the group
        dist.destroy_process_group()


__all__ = ["close_process_group"]
