"""torchship: take a trained PyTorch model to a monitored production service."""

from __future__ import annotations

__version__ = "0.1.0"

from torchship._startup import gc_paused

# Importing torch is most of a start-up; the collector would walk the heap it builds
# again and again for nothing (see torchship._startup).
with gc_paused():
    from torchship.errors import TorchshipError
    from torchship.store import CheckpointManager, InputSpec, Manifest, ModelStore

__all__ = [
    "CheckpointManager",
    "InputSpec",
    "Manifest",
    "ModelStore",
    "TorchshipError",
    "__version__",
]
