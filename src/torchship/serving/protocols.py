"""Wire protocols over the core, shared by the FastAPI and Flask adapters.

* torchship's own ``/predict`` (see :mod:`torchship.serving.payloads`);
* the Open Inference Protocol (KServe V2 / Triton) with the binary tensor extension;
* TorchServe's inference API shape (``/predictions/{name}``, ``/ping``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torchship import __version__
from torchship.errors import InferenceError, InvalidInputError, ModelNotReadyError
from torchship.preprocessing import each_image
from torchship.serving import v2
from torchship.serving.payloads import ImagePayload, TensorPayload
from torchship.serving.service import InferenceService, LoadedModel, Prediction

V2_EXTENSIONS = ["binary_tensor_data"]
# The protocol's health answers are the status alone: 200 is true, a 4xx false (Triton
# answers 400), so "not ready" is not the 503 of torchship's own /health/ready.
V2_NOT_READY = 400
PLATFORMS = {
    "eager": "pytorch",
    "torchscript": "pytorch_libtorch",
    "onnxruntime": "onnxruntime_onnx",
}


# --- TorchServe -------------------------------------------------------------------


def torchserve_body(prediction: Prediction) -> Any:
    """TorchServe's image classifier answer: ``{label: probability}`` for the top k."""
    bodies = []
    for item in prediction.predictions:
        if "top_k" in item:
            bodies.append({r["label"]: r["probability"] for r in item["top_k"]})
        else:
            bodies.append(item)
    return bodies[0] if len(bodies) == 1 else bodies


# --- Open Inference Protocol (V2) -----------------------------------------------------


def v2_server_metadata() -> dict[str, Any]:
    return v2.server_metadata("torchship", __version__, V2_EXTENSIONS)


V2_INPUT = "input"  # the one input every model takes over the V2 protocol


def v2_model_metadata(service: InferenceService, loaded: LoadedModel) -> dict[str, Any]:
    spec = loaded.predictor.input_spec
    shape = [-1, *spec.shape] if spec else [-1]
    outputs = loaded.predictor.manifest.output_names
    n_out = [-1, len(loaded.predictor.labels)] if loaded.predictor.labels else [-1]
    return v2.model_metadata(
        loaded.name,
        service.versions(loaded.name),
        PLATFORMS.get(loaded.predictor.runtime, "pytorch"),
        [(V2_INPUT, "FP32", shape)],
        [(name, "FP32", n_out) for name in outputs[:1]],
    )


def v2_model_ready(
    service: InferenceService, name: str, version: str | None
) -> tuple[dict[str, Any], int]:
    """The body and status of ``.../ready``: 200 when ready, 400 while loading or
    draining (as ``/v2/health/ready``); an unknown model or version stays a 404."""
    try:
        loaded = service.get(name, version)
    except ModelNotReadyError:
        return {"name": name, "ready": False}, V2_NOT_READY
    if service.draining:
        return {"name": loaded.name, "ready": False}, V2_NOT_READY
    return {"name": loaded.name, "ready": True}, 200


def v2_decode(
    loaded: LoadedModel, body: bytes, headers: dict[str, str], *, max_items: int = 256
) -> tuple[v2.V2Request, torch.Tensor]:
    """Parse a V2 infer request into the request and one model-input batch.

    The single input is either numeric, shaped ``[N, *input shape]`` (or one item), or
    ``BYTES`` holding encoded images, which go through the model's preprocessing.
    """
    header_length = headers.get("inference-header-content-length")
    try:
        length = int(header_length) if header_length is not None else None
    except ValueError:
        raise InvalidInputError("Inference-Header-Content-Length must be an integer.") from None
    request = v2.parse_infer_request(
        body, header_length=length, content_encoding=headers.get("content-encoding")
    )
    if len(request.inputs) != 1:
        raise InvalidInputError(
            f"{loaded.name} takes exactly one input tensor, got {len(request.inputs)}.",
            hint="Send one input named 'input'.",
        )
    tensor = request.inputs[0]
    if tensor.name != V2_INPUT:  # as Triton does: a misnamed input is a client error
        raise InvalidInputError(
            f"{loaded.name} has no input named {tensor.name!r}; its input is {V2_INPUT!r}.",
            hint=f"GET /v2/models/{loaded.name} lists the inputs.",
        )
    # Through the model's handler, as /predict goes: a custom preprocess applies here too.
    handler = loaded.handler
    if tensor.datatype == "BYTES":
        spec = loaded.predictor.input_spec
        if spec is not None and spec.kind != "image":
            raise InvalidInputError(
                f"{loaded.name} takes numbers, not BYTES.",
                hint=f"GET /v2/models/{loaded.name} gives the input's datatype and shape.",
            )
        items = [bytes(x) for x in np.asarray(tensor.data, dtype=object).reshape(-1)]
        if len(items) > max_items:  # before decoding any of them
            raise InvalidInputError(f"{len(items)} images in one request; at most {max_items}.")
        batches = each_image(items, lambda item: handler.preprocess(ImagePayload(item)))
        shape = tuple(spec.shape) if spec is not None else tuple(batches[0].shape[1:])
        if any(b.ndim < 2 or tuple(b.shape[1:]) != shape for b in batches):
            raise InferenceError(
                f"{type(handler).__name__}.preprocess returned tensors of shapes "
                f"{sorted({tuple(b.shape) for b in batches})}: not batches of one shape.",
                hint="preprocess must return a batch (N, ...), as for /predict.",
            )
        return request, torch.cat(batches)
    return request, handler.preprocess(TensorPayload(np.asarray(tensor.data)))


def v2_encode(
    loaded: LoadedModel, request: v2.V2Request, outputs: torch.Tensor
) -> tuple[bytes, dict[str, str]]:
    array = outputs.detach().cpu().numpy()
    name = loaded.predictor.manifest.output_names[0]
    tensor = v2.V2Tensor(
        name=name, datatype=v2.v2_datatype(array.dtype), shape=list(array.shape), data=array
    )
    return v2.encode_infer_response(
        model_name=loaded.name, model_version=loaded.version, request=request, outputs=[tensor]
    )
