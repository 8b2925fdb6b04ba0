"""Versioned, checksummed, atomically written model storage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    # checkpoints import torch; reading the store does not
    if name == "CheckpointManager":
        from torchship.store.checkpoint import CheckpointManager

        return CheckpointManager
    raise AttributeError(f"module 'torchship.store' has no attribute {name!r}")
