"""TorchServe handler for tensor models: JSON arrays or ``.npy`` bodies in.

Shipped inside the archives ``torchship archive --handler tensor`` builds; it runs in
TorchServe and in torchship alike. A request holds one item or a batch: JSON
``{"inputs": [...]}`` (also ``instances``/``data``, or a bare list) or an ``.npy`` body,
checked against the model's input spec (``torchship.json``: shape, finite numbers).
Classifiers answer ``{label: probability}`` (top 5) per item, other models their raw
outputs; a request of several items gets a list. A bad request gets its own 400.
"""

from __future__ import annotations

from typing import Any

import torch

from torchship.torchserve.handlers.base import TorchshipHandler, body_of


class TensorHandler(TorchshipHandler):
    def preprocess_one(self, row: dict[str, Any]) -> torch.Tensor:
        return self.tensor_from(body_of(row))
