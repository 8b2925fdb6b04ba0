"""What a request carries once the HTTP layer is peeled off: framework-free parsing."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, Field, ValidationError

from torchship.errors import InvalidInputError, UnsupportedMediaTypeError

NPY_MAGIC = b"\x93NUMPY"
IMAGE_FIELDS = ("image", "file", "data")


@dataclass(frozen=True)
class ImagePayload:
    """One encoded image (any format Pillow reads)."""

    data: bytes


@dataclass(frozen=True)
class TensorPayload:
    """One item or a batch of items as an array (JSON nested lists or ``.npy``)."""

    array: np.ndarray


Payload = ImagePayload | TensorPayload


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def from_bytes(body: bytes, content_type: str | None) -> Payload:
    """A raw request body: an image, or a ``.npy`` array."""
    kind = media_type(content_type)
    if not body:
        raise InvalidInputError("The request body is empty.", hint="Send an image or a tensor.")
    if body.startswith(NPY_MAGIC) or kind in ("application/x-npy", "application/npy"):
        return TensorPayload(load_npy(body))
    if kind.startswith("image/") or kind in ("application/octet-stream", ""):
        return ImagePayload(body)
    raise UnsupportedMediaTypeError(
        f"Unsupported content type {kind!r}.",
        hint="Send multipart/form-data with an 'image' or 'file' field, application/json, "
        "an image/* body or application/x-npy.",
    )


def load_npy(body: bytes) -> np.ndarray:
    if not body.startswith(b"\x93NUMPY"):  # else numpy reads it as a pickle, and refuses
        raise InvalidInputError(
            "The body is not a .npy file (it lacks numpy's magic string).",
            hint="Send the bytes numpy.save writes, with Content-Type application/x-npy.",
        )
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as exc:
        raise InvalidInputError(
            f"Not a valid .npy array (object arrays are refused): {exc}"
        ) from exc
    except Exception as exc:
        raise InvalidInputError(f"Cannot read the .npy body: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise InvalidInputError("The .npy body does not hold one array.")
    return array


def from_json(obj: Any) -> Payload:
    """``{"inputs": [...]}`` (also ``instances``/``data``) or ``{"image": "<base64>"}``."""
    if isinstance(obj, list):
        return TensorPayload(to_array(obj))
    if not isinstance(obj, dict):
        raise InvalidInputError('The JSON body must be an object, e.g. {"inputs": [[...]]}.')
    for key in ("image", "image_base64", "b64"):
        if key in obj:
            value = obj[key]
            if not isinstance(value, str):
                raise InvalidInputError(f"'{key}' must be a base64 string.")
            if value.startswith("data:") and "," in value:  # data URLs from a browser canvas
                value = value.split(",", 1)[1]
            try:
                return ImagePayload(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise InvalidInputError(f"'{key}' is not valid base64: {exc}") from exc
    for key in ("inputs", "instances", "data"):
        if key in obj:
            return TensorPayload(to_array(obj[key]))
    raise InvalidInputError(
        "The JSON body needs 'inputs' (nested arrays) or 'image' (base64).",
        hint='e.g. {"inputs": [[[0.0, ...]]]} shaped like the model input.',
    )


def load_json(body: bytes) -> Any:
    """``json.loads`` whose every failure (syntax, nesting bombs, huge integers) is a 400.

    orjson parses the common case several times faster; what it refuses (NaN literals,
    integers past 64 bits, deep nesting, bad syntax) goes to ``json.loads``, so those
    bodies get the same answers as before: NaN a clear 400 after parsing, and so on.
    """
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise InvalidInputError(f"The body is not valid JSON: {str(exc)[:200]}") from None


def to_array(value: Any) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise InvalidInputError(
            "'inputs' must be a (nested) list of numbers with a regular shape.",
            hint=f"numpy said: {exc}",
        ) from exc
    return array


class PredictJSON(BaseModel):
    """A JSON prediction request: nested arrays shaped like the model input, or an image."""

    inputs: list[Any] | None = Field(
        None, description="One item or a batch, nested lists of numbers shaped like the input."
    )
    image: str | None = Field(None, description="A base64-encoded image (data URLs accepted).")
    top_k: int | None = Field(None, ge=1, le=1000)


def parse_body(body: bytes, content_type: str | None) -> tuple[Payload, int | None]:
    """A non-multipart request body: JSON (validated), a raw image, or ``.npy``.

    Returns the payload and the ``top_k`` the body asked for, if any.
    """
    kind = media_type(content_type)
    if not (kind == "application/json" or kind.endswith("+json")):
        return from_bytes(body, kind), None
    obj = load_json(body)
    if obj is None:
        raise InvalidInputError("The JSON body is empty.")
    if not isinstance(obj, dict):
        return from_json(obj), None
    try:
        parsed = PredictJSON.model_validate(obj)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidInputError(f"Invalid JSON request: {details}") from None
    return from_json(obj), parsed.top_k


def parse_top_k(value: str | None, name: str = "top_k") -> int | None:
    """A ``top_k`` from a query string or form field."""
    if value is None or value == "":
        return None
    try:
        k = int(value)
    except ValueError:
        raise InvalidInputError(f"{name} must be an integer, got {value!r}.") from None
    if not 1 <= k <= 1000:
        raise InvalidInputError(f"{name} must be between 1 and 1000.")
    return k


def no_file_error() -> InvalidInputError:
    return InvalidInputError(
        "The multipart body has no file.",
        hint="Send the image as the 'image' or 'file' field, e.g. curl -F \"image=@sample.jpg\".",
    )
