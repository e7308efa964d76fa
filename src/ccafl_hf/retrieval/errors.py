"""The error of the retrieval tools: an input that cannot be used as asked."""

from __future__ import annotations

from ..errors import CCAFLError


class RetrievalError(CCAFLError):
    """Retrieval inputs that cannot be used as asked (missing or malformed file, mismatched sizes).

    The message names the file or argument and the expected form.
    """


__all__ = ["RetrievalError"]
