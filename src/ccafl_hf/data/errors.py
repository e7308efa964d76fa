"""The error raised for ReID data that cannot be used as asked."""

from ..errors import CCAFLError


class ReIDDatasetError(CCAFLError):
    """ReID data that cannot be used as asked: a missing folder, a badly named or unreadable file,
    a malformed manifest, or a split that makes the task impossible. The message names the file,
    folder or field and the expected form."""
