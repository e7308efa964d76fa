"""Reaching the Hugging Face Hub: offline mode, and a quick reachability probe.

When the Hub cannot be reached, huggingface_hub retries every metadata request with back-off
(about 25 s per file), so loading a checkpoint that is not cached takes close to a minute before it
fails. `hub_local_files_only` answers once, within seconds, whether a load must stay in the local
cache; pass it as ``local_files_only`` to ``from_pretrained``.
"""

from __future__ import annotations

import functools
import os

from huggingface_hub import constants

#: Seconds the reachability probe waits for the Hub's answer.
PROBE_TIMEOUT = 3.0


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, as huggingface_hub reads it."""
    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=4)
def hub_reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when ``endpoint`` (default: the configured Hub, ``HF_ENDPOINT``) answers one request
    within ``timeout`` seconds (no retries; answered once per process)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint or constants.ENDPOINT, timeout=timeout)
    except Exception:  # any failure (refused, DNS, timeout, proxy, TLS) means "not reachable now"
        return False
    return True


def hub_local_files_only(name_or_path: str | os.PathLike) -> bool:
    """True when loading ``name_or_path`` must not ask the Hub: offline mode, or a Hub id while the
    Hub does not answer (a local folder never asks the Hub and gives False)."""
    if os.path.isdir(name_or_path):
        return False
    return hub_offline() or not hub_reachable()


__all__ = ["PROBE_TIMEOUT", "hub_local_files_only", "hub_offline", "hub_reachable"]
