"""Batches to run a model on when the caller gave none: stored examples, else the spec."""

from __future__ import annotations

import torch

from torchship.errors import InvalidInputError
from torchship.store.manifest import InputSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def fill_batch(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """The first ``size`` items of ``inputs``, cycling through them when there are fewer."""
    if size < 1:
        raise InvalidInputError(f"Batch size must be at least 1, got {size}.")
    if inputs.ndim == 0 or len(inputs) == 0:
        raise InvalidInputError("Need at least one input item to build a batch from.")
    if len(inputs) >= size:
        return inputs[:size]
    repeats = -(-size // len(inputs))  # ceil division
    return inputs.repeat(repeats, *([1] * (inputs.ndim - 1)))[:size]


def spec_dtype(spec: InputSpec | None) -> torch.dtype:
    return _DTYPES.get(spec.dtype if spec else "float32", torch.float32)


def sample_batch(
    spec: InputSpec | None,
    examples: torch.Tensor | None,
    size: int,
    *,
    random: bool = False,
    seed: int = 0,
) -> torch.Tensor | None:
    """A batch of ``size`` items: real examples when stored, else zeros/random of the spec.

    Returns ``None`` when neither examples nor a spec say what an input looks like.
    """
    if examples is not None and len(examples) > 0:
        return fill_batch(examples, size)
    if spec is None:
        return None
    shape = (size, *spec.shape)
    if random:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator).to(spec_dtype(spec))
    return torch.zeros(shape, dtype=spec_dtype(spec))
