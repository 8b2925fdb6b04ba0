"""``TorchshipHandler``: TorchServe's handler contract over torchship's preprocessing.

It implements ``initialize(context)``, ``preprocess(data)``, ``inference(batch)``,
``postprocess(outputs)`` and ``handle(data, context)`` as TorchServe calls them, with
two things TorchServe's ``BaseHandler`` does not do:

* one bad request does not fail its batch: ``handle`` preprocesses each request on its
  own, answers the bad one with its 4xx status and a JSON error (``context``'s
  per-request status), and runs the rest;
* the input spec (``torchship.json``) drives preprocessing, so an archive answers
  exactly what the same model answers from the store.

Subclasses override :meth:`preprocess_one` (one request -> ``(n, *input shape)``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchship.errors import InvalidInputError, ModelLoadError, TorchshipError
from torchship.postprocess import top_k as _top_k
from torchship.preprocessing import DEFAULT_MAX_PIXELS, validate_tensor
from torchship.serving.payloads import NPY_MAGIC, TensorPayload, from_json, load_npy
from torchship.store.manifest import InputSpec

BODY_KEYS = ("data", "body", "image", "file", "inputs")
DEFAULT_TOP_K = 5


class TorchshipHandler:
    """Base of the shipped handlers; see the module docstring."""

    def __init__(self) -> None:
        self.initialized = False
        self.model: Any = None
        self.device = torch.device("cpu")
        self.spec: InputSpec | None = None
        self.labels: list[str] | None = None
        self.mapping: dict[str, str] | None = None
        self.context: Any = None
        self.manifest: dict[str, Any] | None = None
        self.max_image_pixels = DEFAULT_MAX_PIXELS

    # --- TorchServe's contract --------------------------------------------------------

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.manifest = context.manifest
        model = context.manifest["model"]
        gpu = props.get("gpu_id")
        if gpu is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu}")
        serialized = model_dir / model["serializedFile"]
        if model.get("modelFile"):
            module = _module_from(model_dir / model["modelFile"])
            classes = [
                c
                for c in vars(module).values()
                if isinstance(c, type)
                and issubclass(c, torch.nn.Module)
                and c.__module__ == module.__name__
            ]
            if len(classes) != 1:
                raise ModelLoadError(f"{model['modelFile']} must define exactly one model class.")
            net = classes[0]()
            net.load_state_dict(torch.load(serialized, map_location="cpu", weights_only=True))
            self.model = net.to(self.device).eval()
        else:
            self.model = torch.jit.load(str(serialized), map_location=self.device).eval()
        spec_file = model_dir / "torchship.json"
        if spec_file.is_file():
            raw = json.loads(spec_file.read_text()).get("input")
            self.spec = InputSpec.model_validate(raw) if raw else None
        labels_file = model_dir / "index_to_name.json"
        if labels_file.is_file():
            self.mapping = {str(k): str(v) for k, v in json.loads(labels_file.read_text()).items()}
            self.labels = [self.mapping[k] for k in sorted(self.mapping, key=int)]
        if not props.get("limit_max_image_pixels", True):
            self.max_image_pixels = 1 << 62
        self.initialized = True

    def torchship_setup(self, predictor: Any) -> None:
        """Used instead of ``initialize`` when torchship serves a *store* model with this
        handler (``--handler NAME=file.py:Class``): the store already loaded the model."""
        self.spec = predictor.input_spec
        self.labels = predictor.labels
        self.initialized = True

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        """Every request's input, concatenated (the first bad request raises)."""
        return torch.cat([self.preprocess_one(row) for row in data])

    def preprocess_one(self, row: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def inference(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(batch.to(self.device), *args, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().cpu()

    def postprocess(self, outputs: torch.Tensor) -> list[Any]:
        """One answer per item: ``{label: probability}`` for the top 5 classes of a
        classifier (TorchServe's image classifier shape), else the raw outputs."""
        return self.answers(outputs, DEFAULT_TOP_K)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        self.context = context
        if not self.initialized:
            raise ModelLoadError("The handler was not initialised.")
        answers: list[Any] = [None] * len(data)
        tensors: list[torch.Tensor] = []
        owners: list[tuple[int, int, int]] = []  # (request, items, top_k)
        for i, row in enumerate(data):
            try:
                x = self.preprocess_one(row)
                k = _top_k_of(row)
            except TorchshipError as exc:  # this request only
                answers[i] = exc.to_dict()
                context.set_response_status(exc.status_code, exc.message, i)
                continue
            tensors.append(x)
            owners.append((i, len(x), k))
        if tensors:
            outputs = self.inference(torch.cat(tensors))
            start = 0
            for i, n, k in owners:
                items = self.answers(outputs[start : start + n], k)
                answers[i] = items[0] if n == 1 else items
                start += n
        return answers

    # --- helpers ----------------------------------------------------------------------

    def tensor_from(self, body: Any) -> torch.Tensor:
        """``(n, *input shape)`` from JSON (``{"inputs": ...}``, a list, or their bytes)
        or ``.npy`` bytes, checked against the input spec."""
        if isinstance(body, (bytes, bytearray)):
            raw = bytes(body)
            if raw.startswith(NPY_MAGIC):
                return self._checked(load_npy(raw))
            body = raw.decode("utf-8", errors="replace")
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except (ValueError, RecursionError):
                raise InvalidInputError(
                    "The body is neither JSON nor an .npy array.",
                    hint='Send {"inputs": [...]} as application/json, or an .npy file.',
                ) from None
        payload = from_json(body)
        if not isinstance(payload, TensorPayload):
            raise InvalidInputError("Send 'inputs' (nested arrays) to this model.")
        return self._checked(payload.array)

    def _checked(self, array: np.ndarray) -> torch.Tensor:
        if self.spec is not None:
            return validate_tensor(array, self.spec)
        batch = torch.as_tensor(array, dtype=torch.float32)
        if batch.ndim < 2 or not bool(torch.isfinite(batch).all()):
            raise InvalidInputError(
                "Send a batch (N, ...) of finite numbers.",
                hint="NaN and infinity are refused; wrap a single item in a list.",
            )
        return batch

    def answers(self, outputs: torch.Tensor, k: int) -> list[Any]:
        if self.labels:
            return [
                {r["label"]: r["probability"] for r in row}
                for row in _top_k(outputs, self.labels, k)
            ]
        return [row.tolist() for row in outputs]


def body_of(row: dict[str, Any]) -> Any:
    """The request's input: a raw body, a form file, or the value of a known field."""
    for key in BODY_KEYS:
        if row.get(key) is not None:
            return row[key]
    for value in row.values():
        if isinstance(value, (bytes, bytearray)):
            return value
    raise InvalidInputError(
        "The request carries no input.",
        hint="Send the image or tensor as the body, or as a multipart field 'data'.",
    )


def _top_k_of(row: dict[str, Any]) -> int:
    value = row.get("top_k")
    body = row.get("body")
    if value is None and isinstance(body, dict):
        value = body.get("top_k")
    if value is None:
        return DEFAULT_TOP_K
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"top_k must be an integer, got {value!r}.") from None
    if not 1 <= k <= 1000:
        raise InvalidInputError("top_k must be between 1 and 1000.")
    return k


def _module_from(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"torchship_archive_model_{id(path)}", path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"Cannot import {path.name}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
