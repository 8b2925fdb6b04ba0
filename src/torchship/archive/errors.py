"""Errors of archive building and loading; each says what to do about it."""

from __future__ import annotations

from torchship.errors import TorchshipError


class ArchiveError(TorchshipError):
    """A ``.mar`` that cannot be built or used: not a zip, no manifest, a missing file."""

    status_code = 422
    code = "archive_error"


class UnsafeArchiveError(ArchiveError):
    """An entry that would write outside the extraction folder, a link, an odd file type."""

    code = "unsafe_archive"


class ArchiveTooLargeError(ArchiveError):
    """Too many entries, too many bytes once unpacked, or a suspicious compression ratio."""

    status_code = 413
    code = "archive_too_large"
