"""Online serving: one framework-free core (``InferenceService``), thin HTTP front ends.

Front ends are imported only when chosen: ``torchship.serving.fastapi_app.create_app``
and ``torchship.serving.flask_app.create_app``. The names below are imported on first
use, so ``torchship serve``'s supervisor (``torchship.serving.runner``) needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchship._lazy import lazy_names

if TYPE_CHECKING:
    from torchship.serving.handlers import ClassifierHandler, Handler, TensorHandler
    from torchship.serving.payloads import ImagePayload, TensorPayload
    from torchship.serving.service import InferenceService, LoadedModel, Prediction
    from torchship.serving.settings import ServeSettings

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

__getattr__ = lazy_names(
    globals(),
    {
        "ClassifierHandler": "torchship.serving.handlers",
        "Handler": "torchship.serving.handlers",
        "TensorHandler": "torchship.serving.handlers",
        "ImagePayload": "torchship.serving.payloads",
        "TensorPayload": "torchship.serving.payloads",
        "InferenceService": "torchship.serving.service",
        "LoadedModel": "torchship.serving.service",
        "Prediction": "torchship.serving.service",
        "ServeSettings": "torchship.serving.settings",
    },
)
