"""TorchServe handler for image classifiers (the digits models, ResNet-18, ...).

Shipped inside the archives ``torchship archive --handler image`` builds; it runs in
TorchServe and in torchship alike. Each request is one image: the raw body, a
multipart file (``data``, ``file`` or ``image``), or JSON ``{"image": "<base64>"}``.
It is decoded and preprocessed exactly as the model's input spec (``torchship.json``)
says (JSON ``{"inputs": [...]}`` of already preprocessed numbers is taken too); the
answer is ``{label: probability}`` for the top 5 classes (``top_k`` as a
query or form parameter changes that). A bad image gets its own 400/413 answer; the
rest of the batch is served.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import torch

from torchship.errors import InvalidImageError, InvalidInputError
from torchship.preprocessing import preprocess_image
from torchship.torchserve.handlers.base import TorchshipHandler, body_of


class DigitsImageHandler(TorchshipHandler):
    def preprocess_one(self, row: dict[str, Any]) -> torch.Tensor:
        if self.spec is None or self.spec.kind != "image":
            raise InvalidInputError("This model takes tensors, not images.")
        body = body_of(row)
        if isinstance(body, list) or (isinstance(body, dict) and _tensor_json(body)):
            return self.tensor_from(body)  # already preprocessed numbers, as /predict takes
        if isinstance(body, dict):
            body = body.get("image") or body.get("b64") or body.get("data")
        if isinstance(body, str):  # base64, as TorchServe's vision handler accepts
            if body.startswith("data:") and "," in body:
                body = body.split(",", 1)[1]
            try:
                body = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InvalidImageError(f"The image is not valid base64: {exc}") from exc
        if not isinstance(body, (bytes, bytearray)):
            raise InvalidImageError(
                "Send an image: the raw body, a multipart file or JSON {'image': base64}."
            )
        return preprocess_image(bytes(body), self.spec, max_pixels=self.max_image_pixels)[None]


def _tensor_json(body: dict[str, Any]) -> bool:
    return any(k in body for k in ("inputs", "instances")) and not any(
        k in body for k in ("image", "b64")
    )
