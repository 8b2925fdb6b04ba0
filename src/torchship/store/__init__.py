"""Versioned, checksummed, atomically written model storage."""

from torchship.store._names import parse_ref, validate_name
from torchship.store.checkpoint import CheckpointManager
from torchship.store.manifest import Architecture, Artifact, InputSpec, Manifest, Verification
from torchship.store.store import ModelStore, TorchVersionWarning

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
