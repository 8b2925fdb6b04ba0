"""Versioned, checksummed, atomically written model storage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchship._lazy import lazy_names
from torchship.store._names import parse_ref, validate_name
from torchship.store.manifest import Architecture, Artifact, InputSpec, Manifest, Verification
from torchship.store.store import ModelStore, TorchVersionWarning

if TYPE_CHECKING:
    from torchship.store.checkpoint import CheckpointManager

__all__ = [
    "Architecture",
    "Artifact",
    "CheckpointManager",
    "InputSpec",
    "Manifest",
    "ModelStore",
    "TorchVersionWarning",
    "Verification",
    "parse_ref",
    "validate_name",
]

# checkpoints import torch; reading the store does not
__getattr__ = lazy_names(globals(), {"CheckpointManager": "torchship.store.checkpoint"})
