"""TorchServe model archives (``.mar``): build them from the store, read them safely.

>>> from torchship.archive import build_archive, inspect_archive
>>> built = build_archive("models", "digits", handler="image", export_path="model_store")  # doctest: +SKIP
>>> inspect_archive(built.path).manifest.model.model_name  # doctest: +SKIP
'digits'
"""

from torchship.archive.build import BuiltArchive, ModelConfig, build_archive
from torchship.archive.errors import ArchiveError, ArchiveTooLargeError, UnsafeArchiveError
from torchship.archive.manifest import MANIFEST_PATH, MarManifest, MarModel
from torchship.archive.reader import (
    ArchiveLimits,
    MarInfo,
    extract_archive,
    inspect_archive,
    safe_entry_name,
)

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
