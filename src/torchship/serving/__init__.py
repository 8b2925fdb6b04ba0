"""Online serving: one framework-free core (``InferenceService``), thin HTTP front ends.

Front ends are imported only when chosen: ``torchship.serving.fastapi_app.create_app``
and ``torchship.serving.flask_app.create_app``.
"""

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
