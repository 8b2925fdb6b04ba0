"""TorchServe model archives (``.mar``): build them from the store, read them safely.

>>> from torchship.archive import build_archive, inspect_archive
>>> built = build_archive("models", "digits", handler="image", export_path="model_store")  # doctest: +SKIP
>>> inspect_archive(built.path).manifest.model.model_name  # doctest: +SKIP
'digits'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchship._lazy import lazy_names
from torchship.archive.errors import ArchiveError, ArchiveTooLargeError, UnsafeArchiveError
from torchship.archive.manifest import MANIFEST_PATH, MarManifest, MarModel
from torchship.archive.reader import (
    ArchiveLimits,
    MarInfo,
    extract_archive,
    inspect_archive,
    safe_entry_name,
)

if TYPE_CHECKING:
    from torchship.archive.build import BuiltArchive, ModelConfig, build_archive

__all__ = [
    "MANIFEST_PATH",
    "ArchiveError",
    "ArchiveLimits",
    "ArchiveTooLargeError",
    "BuiltArchive",
    "MarInfo",
    "MarManifest",
    "MarModel",
    "ModelConfig",
    "UnsafeArchiveError",
    "build_archive",
    "extract_archive",
    "inspect_archive",
    "safe_entry_name",
]

# building imports torch; reading archives (what a server's settings check) does not
__getattr__ = lazy_names(
    globals(),
    {name: "torchship.archive.build" for name in ("BuiltArchive", "ModelConfig", "build_archive")},
)
