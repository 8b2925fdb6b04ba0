"""Device choice: ``auto`` means CUDA when present, else CPU."""

from __future__ import annotations

import torch


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        from torchship.errors import ConfigError

        raise ConfigError(
            f"Device {spec!r} was asked for but CUDA is not available here.",
            hint="Use device='auto' or 'cpu'.",
        )
    return device
