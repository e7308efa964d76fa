"""The one base of the package's errors.

Every error raised for an input that cannot be used as asked (a flag, a data folder, a model folder, a
run folder, a retrieval file) or for a run that must stop (a non-finite loss) is a `CCAFLError`; the
commands print it as one ``error: ...`` line and exit with code 2. It stays a `ValueError` so code that
caught the older, separate error classes as `ValueError` keeps working.
"""

from __future__ import annotations


class CCAFLError(ValueError):
    """Base of the package's errors; the message names the problem (file, flag, expected form)."""


class ArgumentError(CCAFLError):
    """A flag or setting out of range, unknown or contradicting another one."""


class NonFiniteError(CCAFLError):
    """A loss, gradient norm, prompt or feature became NaN or infinite: the run stops, naming the stage and
    step, instead of training on (or silently dropping) the value."""


__all__ = ["ArgumentError", "CCAFLError", "NonFiniteError"]
