"""torchship: take a trained PyTorch model to a monitored production service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
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

_LAZY = {
    "TorchshipError": "torchship.errors",
    "CheckpointManager": "torchship.store",
    "InputSpec": "torchship.store",
    "Manifest": "torchship.store",
    "ModelStore": "torchship.store",
}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use: a process that only supervises server
    workers never needs torch, which is most of a start-up."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchship' has no attribute {name!r}")
    import importlib

    from torchship._startup import gc_paused

    # Importing torch is most of a start-up; the collector would walk the heap it builds
    # again and again for nothing (see torchship._startup).
    with gc_paused():
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
