"""Saving and loading weights without ever unpickling what the user did not trust.

Two ways, as the module teaches them:

* **state_dict** (default): tensors only, in safetensors; rebuilding the module needs its
  class, recorded as an import path in the manifest.
* **whole model**: ``torch.save(model)``, a pickle. Convenient, but loading a pickle runs
  whatever code it names, so it needs ``trust_pickle=True``.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model
from torch import nn

from torchship.errors import ModelLoadError, UntrustedPickleError
from torchship.store.manifest import Architecture

PICKLE_HINT = (
    "Only load pickles you made or fully trust: pass trust_pickle=True (CLI: --trust-pickle). "
    "Better: save a state_dict (safetensors), which cannot run code."
)


def save_state_dict(model: nn.Module, path: Path) -> None:
    # save_model (not save_file) copes with tied/shared weights.
    _st_save_model(model, str(path))


def load_state_dict_into(model: nn.Module, path: Path, device: torch.device | str = "cpu") -> None:
    try:
        missing, unexpected = _st_load_model(model, str(path), strict=False, device=str(device))
    except Exception as exc:  # safetensors raises plain Exceptions on bad headers
        raise ModelLoadError(f"Cannot read weights from {path.name}: {exc}") from exc
    if missing or unexpected:
        raise ModelLoadError(
            f"Weights in {path.name} do not fit the architecture: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.",
            hint="Was the model saved with different constructor arguments?",
        )


def save_whole_model(model: nn.Module, path: Path) -> None:
    torch.save(model, path)


def safe_torch_load(path: Path | str, map_location: Any = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UntrustedPickleError(
            f"{Path(path).name} contains Python objects beyond tensors and plain containers; "
            "loading it would execute code from the file, so it was refused.",
            hint=PICKLE_HINT,
        ) from exc


def load_pickle(path: Path | str, *, trust_pickle: bool, map_location: Any = "cpu") -> Any:
    """Load an arbitrary ``torch.save`` pickle, only with the caller's explicit consent."""
    if not trust_pickle:
        raise UntrustedPickleError(
            f"{Path(path).name} is a pickled object; unpickling it can run arbitrary code.",
            hint=PICKLE_HINT,
        )
    return torch.load(path, map_location=map_location, weights_only=False)


def architecture_of(model: nn.Module) -> Architecture:
    """Record how to rebuild ``model``: its class's import path and constructor kwargs.

    Models declare their kwargs in an ``init_kwargs`` dict attribute (the zoo models do);
    otherwise the class must be constructible without arguments.
    """
    cls = type(model)
    kwargs = dict(getattr(model, "init_kwargs", {}) or {})
    return Architecture(target=f"{cls.__module__}:{cls.__qualname__}", kwargs=kwargs)


def build_architecture(arch: Architecture) -> nn.Module:
    """Import and construct the recorded class; refuse anything that is not an nn.Module."""
    module_name, _, qualname = arch.target.partition(":")
    if not module_name or not qualname:
        raise ModelLoadError(f"Malformed architecture target {arch.target!r}.")
    if module_name == "__main__":
        raise ModelLoadError(
            f"The architecture {arch.target!r} was defined in a script's __main__, "
            "which cannot be imported from here.",
            hint="Move the class into an importable module, or pass model=YourClass(...) to load.",
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(
            f"Cannot import the architecture {arch.target!r}: {exc}",
            hint="Install the package that defines it, or pass model=... to load.",
        ) from exc
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise ModelLoadError(f"{arch.target!r} is not an nn.Module class; refusing to call it.")
    try:
        return obj(**arch.kwargs)
    except TypeError as exc:
        raise ModelLoadError(
            f"Cannot construct {arch.target} with {arch.kwargs}: {exc}",
            hint="Give the model an init_kwargs dict of its constructor arguments before saving.",
        ) from exc


class ArchitectureWarning(UserWarning):
    """A saved state_dict cannot be loaded back without passing ``model=``."""


def check_rebuildable(model: nn.Module, arch: Architecture) -> None:
    """Warn at save time when the recorded architecture would not rebuild ``model``."""
    import warnings

    try:
        with torch.device("meta"):  # shapes only: no memory for a second copy of the weights
            rebuilt = build_architecture(arch)
    except ModelLoadError as exc:
        problem = exc.message
    else:
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        if want == got:
            return
        problem = f"{arch.target}({arch.kwargs}) builds a module with different weights"
    warnings.warn(
        f"{problem}; loading this version will need model=... . Give the class an "
        "init_kwargs dict of its constructor arguments, or pass architecture=.",
        ArchitectureWarning,
        stacklevel=3,
    )
