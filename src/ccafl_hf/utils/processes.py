"""Ending a multi-process run (``accelerate launch``, ``torchrun``) cleanly."""

from __future__ import annotations


def close_process_group() -> None:
    """Wait for every process, then destroy the default process group (a no-op in a single process).

    Call it once, at the very end of a multi-process program, and only when every process succeeded (a
    process that failed may leave its peers inside a collective, where the barrier would wait forever).
    Left to the interpreter's exit, the group is destroyed during finalization: gloo's C++ worker threads
    still hold the last collectives' work objects, whose tensors keep Python references, and releasing
    them once the interpreter is being torn down aborts the process (``terminate called without an active
    exception``, SIGABRT) after all its work succeeded. Whether it happens depends on thread timing, so it
    shows up on a loaded machine.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody tears down while a peer still uses the group
        dist.destroy_process_group()


__all__ = ["close_process_group"]
