"""What the optimized variants share: a wrapper module that rebuilds from plain kwargs.

An optimized version must load back through the ordinary store path (safetensors
weights + an architecture recorded as an import path and JSON kwargs), never through a
pickle. Each method therefore has a small ``nn.Module`` class in this package whose
constructor takes the parent's architecture (``base``, a dict) plus the method's
options, rebuilds the parent's structure and applies the same transformation to it
(quantize, shrink, wrap in autocast, ...); the stored tensors are then loaded into it.
Wrappers nest, so a pruned model can be quantized in turn.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchship.store.manifest import Architecture
from torchship.store.serialization import build_architecture


def arch_spec(arch: Architecture) -> dict[str, Any]:
    """An architecture as the JSON dict wrappers record in their kwargs."""
    return arch.model_dump(mode="json")


def build_base(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a recorded architecture (safely: an ``nn.Module`` class, by import path)."""
    return build_architecture(Architecture.model_validate(spec))


class WrapperModule(nn.Module):
    """Base of the wrappers: ``self.model`` is the transformed parent.

    ``load_state_dict`` supplies the per-module version metadata that safetensors does
    not store: quantized modules read their state differently without it.
    """

    model: nn.Module

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        if getattr(state_dict, "_metadata", None) is None:
            with_meta: Any = OrderedDict(state_dict)
            with_meta._metadata = getattr(self.state_dict(), "_metadata", None)
            state_dict = with_meta
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def wrapper_arch(module: nn.Module) -> Architecture:
    cls = type(module)
    kwargs = dict(getattr(module, "init_kwargs", {}))
    return Architecture(target=f"{cls.__module__}:{cls.__qualname__}", kwargs=kwargs)


def first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and out and isinstance(next(iter(out.values())), torch.Tensor):
        return next(iter(out.values()))
    raise TypeError(f"the model returned {type(out).__name__}, not a tensor")
