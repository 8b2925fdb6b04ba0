"""Eager PyTorch: the reference every other runtime is verified against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from torchship.runtime.base import RuntimeName, TorchPredictor

if TYPE_CHECKING:
    from torchship.store import ModelStore
    from torchship.store.manifest import Manifest


class EagerPredictor(TorchPredictor):
    runtime: RuntimeName = "eager"

    @classmethod
    def from_store(
        cls,
        store: ModelStore,
        manifest: Manifest,
        device: torch.device,
        *,
        trust_pickle: bool = False,
        examples: torch.Tensor | None = None,
        threads: int | None = None,
    ) -> EagerPredictor:
        """Load a version whose checksums the caller has just verified."""
        module = store.load(manifest.ref, device=device, trust_pickle=trust_pickle, verify=False)
        return cls(module, manifest, device, examples=examples, threads=threads)
