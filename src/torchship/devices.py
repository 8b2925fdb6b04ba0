"""Device choice: ``auto`` means CUDA when present, else CPU."""

from __future__ import annotations

import torch


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from torchship.errors import ConfigError

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{spec!r} is not a device torch knows.",
            hint="Use 'auto', 'cpu', 'cuda' or 'cuda:N'.",
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Device {spec!r} was asked for but CUDA is not available here.",
            hint="Use device='auto' or 'cpu'.",
        )
    return device
