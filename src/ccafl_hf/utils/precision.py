"""Mixed precision, in one place: which precision a run uses, and the autocast context that applies it.

Training runs under the Trainer's `accelerate.Accelerator`, whose ``autocast()`` is the one context
of every forward pass (feature extraction included, see `ccafl_hf.evaluation.extract_features`). Code
that runs without an Accelerator (the evaluate/retrieval commands, a notebook) uses `autocast_context`,
built from the same resolved name.
"""

from __future__ import annotations

import contextlib

import torch

#: Choices of ``--mixed_precision``.
MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")


def resolve_mixed_precision(
    choice: str | None = "no", *, bf16: bool = False, fp16: bool = False, device: torch.device | str | None = None
) -> str:
    """The concrete precision (``"no"``, ``"fp16"`` or ``"bf16"``) of a ``choice`` in `MIXED_PRECISIONS` and
    the ``--bf16``/``--fp16`` switches.

    ``auto`` is bf16 on a CUDA device that supports it, fp16 (with a loss scaler) on other CUDA devices, and
    fp32 (``"no"``) elsewhere; ``device`` defaults to CUDA when one is visible. Contradictions (``--bf16``
    with ``--fp16``, ``--mixed_precision fp16`` with ``--bf16``) raise `ValueError` naming the flags.
    """
    choice = "no" if choice in (None, "fp32") else choice
    if choice not in MIXED_PRECISIONS:
        raise ValueError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {choice!r}")
    if bf16 and fp16:
        raise ValueError("--bf16 and --fp16 exclude each other")
    explicit = "bf16" if bf16 else "fp16" if fp16 else None
    if explicit is not None:
        if choice in ("bf16", "fp16") and choice != explicit:
            raise ValueError(f"--mixed_precision {choice} contradicts --{explicit}")
        return explicit
    if choice != "auto":
        return choice
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_context(device: torch.device | str, mixed_precision: str | None):
    """`torch.autocast` of a resolved ``mixed_precision`` (``"bf16"``, ``"fp16"``, ``"no"``/None) on ``device``
    (fp16 on a CPU becomes bf16: CPU fp16 autocast is slow and poorly supported)."""
    if mixed_precision in (None, "no", "fp32"):
        return contextlib.nullcontext()
    if mixed_precision not in ("bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    device = torch.device(device)
    dtype = torch.bfloat16 if mixed_precision == "bf16" or device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["MIXED_PRECISIONS", "autocast_context", "resolve_mixed_precision"]
