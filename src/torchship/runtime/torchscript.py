"""TorchScript: a compiled module that runs without the model's Python class."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from torchship.errors import ModelLoadError
from torchship.runtime.base import RuntimeName, TorchPredictor

if TYPE_CHECKING:
    from pathlib import Path

    from torchship.store import ModelStore
    from torchship.store.manifest import Manifest


def load_torchscript(
    path: Path, device: torch.device, *, optimize: bool = False
) -> torch.jit.ScriptModule:
    """``torch.jit.load`` a file whose checksum the store has already verified.

    ``optimize`` applies ``torch.jit.optimize_for_inference`` for ``device`` now: its
    result is specific to the machine (oneDNN layouts on CPU) and cannot be saved, which
    is why exports store the frozen module and record ``optimize`` instead.
    """
    try:
        module = torch.jit.load(str(path), map_location=device).eval()
        if optimize:
            module = torch.jit.optimize_for_inference(module)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"Cannot load TorchScript from {path.name}: {exc}") from exc
    return module


class TorchScriptPredictor(TorchPredictor):
    runtime: RuntimeName = "torchscript"

    @classmethod
    def from_store(
        cls,
        store: ModelStore,
        manifest: Manifest,
        device: torch.device,
        *,
        examples: torch.Tensor | None = None,
        threads: int | None = None,
    ) -> TorchScriptPredictor:
        """Load the version's ``torchscript`` artifact (checksums already verified)."""
        path = store.artifact_path(manifest.ref, "torchscript")
        optimize = bool(manifest.artifacts["torchscript"].options.get("optimize", False))
        module = load_torchscript(path, device, optimize=optimize)
        return cls(module, manifest, device, examples=examples, threads=threads)
