"""torchship: take a trained PyTorch model to a monitored production service.

Its public names are imported on first use: a process that only supervises server
workers never needs torch, which is most of a start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchship._lazy import lazy_names

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

__getattr__ = lazy_names(
    globals(),
    {
        "TorchshipError": "torchship.errors",
        "CheckpointManager": "torchship.store",
        "InputSpec": "torchship.store",
        "Manifest": "torchship.store",
        "ModelStore": "torchship.store",
    },
)
