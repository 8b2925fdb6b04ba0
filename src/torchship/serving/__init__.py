"""Online serving: one framework-free core (``InferenceService``), thin HTTP front ends.

Front ends are imported only when chosen: ``torchship.serving.fastapi_app.create_app``
and ``torchship.serving.flask_app.create_app``. The names below are imported on first
use, so ``torchship serve``'s supervisor (``torchship.serving.runner``) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchship.serving.handlers import ClassifierHandler, Handler, TensorHandler
    from torchship.serving.payloads import ImagePayload, TensorPayload
    from torchship.serving.service import InferenceService, LoadedModel, Prediction
    from torchship.serving.settings import ServeSettings

_LAZY = {
    "ClassifierHandler": "torchship.serving.handlers",
    "Handler": "torchship.serving.handlers",
    "TensorHandler": "torchship.serving.handlers",
    "ImagePayload": "torchship.serving.payloads",
    "TensorPayload": "torchship.serving.payloads",
    "InferenceService": "torchship.serving.service",
    "LoadedModel": "torchship.serving.service",
    "Prediction": "torchship.serving.service",
    "ServeSettings": "torchship.serving.settings",
}

__all__ = [
    "ClassifierHandler",
    "Handler",
    "ImagePayload",
    "InferenceService",
    "LoadedModel",
    "Prediction",
    "ServeSettings",
    "TensorHandler",
    "TensorPayload",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchship.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
