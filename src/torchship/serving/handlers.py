"""Handlers: turn one request's payload into model input, and outputs into answers.

The hooks mirror TorchServe's handler contract (``initialize``/``preprocess``/
``inference``/``postprocess``) so the same class can back a ``.mar`` archive:

* ``setup(predictor, settings)`` once per loaded model;
* ``preprocess(payload) -> Tensor (n, *input shape)`` per request, in the request's
  thread (so decoding runs in parallel across requests);
* ``inference(batch) -> Tensor`` per *dynamic batch* on the batcher's thread;
* ``postprocess(outputs, top_k) -> list[dict]`` per request, one dict per item.

Subclass :class:`ClassifierHandler` or :class:`TensorHandler` and override what differs.
"""

from __future__ import annotations

from typing import Any

import torch

from torchship.errors import InvalidInputError
from torchship.postprocess import non_finite_outputs
from torchship.postprocess import top_k as _top_k
from torchship.preprocessing import preprocess_image, validate_tensor
from torchship.runtime import Predictor
from torchship.serving.payloads import ImagePayload, Payload, TensorPayload


class Handler:
    """Base handler: tensors in, raw outputs out."""

    predictor: Predictor
    max_image_pixels: int = 4096 * 4096
    #: Tensor payloads up to this many numbers are preprocessed on the event loop
    #: (FastAPI): checking a small array costs less than a hop to a worker thread.
    inline_max_elements: int = 16384

    def setup(self, predictor: Predictor, *, max_image_pixels: int | None = None) -> None:
        self.predictor = predictor
        if max_image_pixels is not None:
            self.max_image_pixels = max_image_pixels

    def preprocess(self, payload: Payload) -> torch.Tensor:
        spec = self.predictor.input_spec
        if isinstance(payload, TensorPayload):
            if spec is None:  # no spec to check the shape against: at least sane numbers
                batch = torch.as_tensor(payload.array, dtype=torch.float32)
                if batch.ndim < 2 or not bool(torch.isfinite(batch).all()):
                    raise InvalidInputError(
                        "Send a batch (N, ...) of finite numbers.",
                        hint="NaN and infinity are refused; wrap a single item in a list.",
                    )
                return batch
            return validate_tensor(payload.array, spec)
        if isinstance(payload, ImagePayload):
            if spec is None or spec.kind != "image":
                raise InvalidInputError(
                    f"{self.predictor.manifest.ref} takes tensors, not images.",
                    hint="Send JSON {'inputs': [...]} or an .npy body.",
                )
            return preprocess_image(payload.data, spec, max_pixels=self.max_image_pixels)[None]
        raise InvalidInputError(f"Unsupported payload {type(payload).__name__}.")

    def cheap(self, payload: Payload) -> bool:
        """True when ``preprocess(payload)`` is quick enough to run on the event loop.

        A subclass that overrides ``preprocess`` always gets a worker thread unless it
        overrides this too: its preprocessing may block.
        """
        if type(self).preprocess is not Handler.preprocess:
            return False
        return isinstance(payload, TensorPayload) and payload.array.size <= self.inline_max_elements

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        return self.predictor.predict(batch)

    def postprocess(self, outputs: torch.Tensor, *, top_k: int) -> list[dict[str, Any]]:
        if outputs.is_floating_point() and not bool(torch.isfinite(outputs).all()):
            raise non_finite_outputs()
        return [{"output": row.tolist()} for row in outputs]


class ClassifierHandler(Handler):
    """Classification: top-k labels with softmax probabilities."""

    def postprocess(self, outputs: torch.Tensor, *, top_k: int) -> list[dict[str, Any]]:
        ranked = _top_k(outputs, self.predictor.labels, top_k)
        return [
            {
                "label": r[0]["label"],
                "index": r[0]["index"],
                "probability": r[0]["probability"],
                "top_k": r,
            }
            for r in ranked
        ]


class TensorHandler(Handler):
    """Raw outputs as nested lists (regression, embeddings, ...)."""


def default_handler(predictor: Predictor) -> Handler:
    return ClassifierHandler() if predictor.labels else TensorHandler()


def load_handler(spec: str) -> Handler:
    """Instantiate a custom handler from ``"package.module:Class"`` or ``"file.py:Class"``.

    The class must subclass :class:`Handler`. This imports (runs) the named code, so it
    comes from the server's configuration, never from a request.
    """
    import importlib
    import importlib.util
    from pathlib import Path

    from torchship.errors import ConfigError

    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(
            f"Handler {spec!r} must look like 'package.module:Class' or 'file.py:Class'."
        )
    try:
        if target.endswith(".py"):
            path = Path(target)
            module_spec = importlib.util.spec_from_file_location(
                f"torchship_handler_{path.stem}", path
            )
            if module_spec is None or module_spec.loader is None or not path.is_file():
                raise ConfigError(f"Handler file {target} does not exist.")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        cls = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"Cannot load handler {spec!r}: {exc}") from exc
    if isinstance(cls, type) and not issubclass(cls, Handler) and _torchserve_contract(cls):
        from torchship.torchserve.contract import ContractHandler

        return ContractHandler(cls())  # a TorchServe handler class, over the store's model
    if not (isinstance(cls, type) and issubclass(cls, Handler)):
        raise ConfigError(
            f"{spec!r} is not a Handler subclass (nor a TorchServe handler class).",
            hint="Subclass torchship.serving.ClassifierHandler (or Handler) and override its "
            "hooks, or give a class with TorchServe's preprocess/inference/postprocess/handle.",
        )
    return cls()


def _torchserve_contract(cls: type) -> bool:
    """TorchServe's handler contract: handle(data, context) and its three stages."""
    hooks = ("handle", "preprocess", "inference", "postprocess")
    return all(callable(getattr(cls, h, None)) for h in hooks)
