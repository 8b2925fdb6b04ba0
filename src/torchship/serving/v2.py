"""Open Inference Protocol (KServe V2) REST codec, with Triton's binary tensor extension.

Framework-free: a route hands over the raw body and the ``Inference-Header-Content-Length``
and ``Content-Encoding`` headers, gets a :class:`V2Request` back, runs the model, and
turns the output tensors into a body plus headers with :func:`encode_infer_response`.
Every malformed request raises :class:`~torchship.errors.InvalidInputError` naming the
tensor and what is wrong, so one handler renders it as ``{"error": ...}``.

Wire format (as ``tritonclient.http`` speaks it, binary in both directions by default):

* the body is a UTF-8 JSON object, optionally followed by raw tensor bytes; the header
  ``Inference-Header-Content-Length`` gives the JSON's byte length, and each tensor
  stored after it carries ``parameters.binary_data_size``, in the order of the tensors;
* binary tensors are little-endian, row-major; BOOL is one byte per element; BYTES is,
  per element, a 4-byte little-endian length followed by that many bytes;
* ``parameters.binary_data_output`` on the request sets the default for outputs, and
  ``parameters.binary_data`` on one requested output overrides it;
* ``Content-Encoding: gzip`` / ``deflate`` (zlib) compresses the whole body; the header
  length counts the decompressed JSON.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from torchship.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
DATATYPES = (*_DTYPES, "BF16")  # BF16 through ml_dtypes, where installed
_LEN = struct.Struct("<I")


@dataclass
class V2Tensor:
    """One named tensor; ``data`` holds ``shape`` (BYTES: an object array of ``bytes``)."""

    name: str
    datatype: str
    shape: list[int]
    data: npt.NDArray[Any]
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_numpy(cls, name: str, array: npt.ArrayLike) -> V2Tensor:
        data = np.asarray(array)
        return cls(name, v2_datatype(data.dtype), list(data.shape), data)


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    parameters: dict[str, Any]


@dataclass
class V2Request:
    id: str | None
    inputs: list[V2Tensor]
    outputs: list[RequestedOutput]  # empty: every output the model has
    parameters: dict[str, Any]
    binary_output: bool  # for outputs when none are listed (``binary_data_output``)


# --- datatypes -----------------------------------------------------------------------


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype for a V2 datatype string (little-endian where it matters)."""
    if datatype == "BF16":
        try:
            import ml_dtypes
        except ImportError as exc:
            raise InvalidInputError(
                "BF16 needs the 'ml_dtypes' package on the server.", hint="Send FP32 instead."
            ) from exc
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return _DTYPES[datatype]
    except (KeyError, TypeError):
        raise InvalidInputError(
            f"Unknown datatype {datatype!r}.", hint=f"Use one of {', '.join(DATATYPES)}."
        ) from None


def v2_datatype(dtype: np.dtype[Any]) -> str:
    """The V2 datatype string for a numpy dtype; text and object arrays are BYTES."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    if dtype.name == "bfloat16":
        return "BF16"
    for name, candidate in _DTYPES.items():
        if (
            name != "BYTES"
            and dtype.kind == candidate.kind
            and dtype.itemsize == candidate.itemsize
        ):
            return name
    raise TypeError(f"numpy dtype {dtype} has no Open Inference Protocol datatype.")


# --- small helpers for routes --------------------------------------------------------


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


def server_metadata(name: str, version: str, extensions: list[str]) -> dict[str, Any]:
    return {"name": name, "version": version, "extensions": list(extensions)}


def model_metadata(
    name: str,
    versions: list[str],
    platform: str,
    inputs: list[tuple[str, str, list[int]]],
    outputs: list[tuple[str, str, list[int]]],
) -> dict[str, Any]:
    """``shape`` may hold -1 for a dimension of any size (e.g. the batch)."""

    def specs(tensors: list[tuple[str, str, list[int]]]) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in tensors]

    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": specs(inputs),
        "outputs": specs(outputs),
    }


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int (None when absent)."""
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise InvalidInputError(f"{HEADER_LENGTH} must be an integer, got {value!r}.") from None
    if length < 0:
        raise InvalidInputError(f"{HEADER_LENGTH} must not be negative, got {length}.")
    return length


def decompress(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate, identity), never producing over ``max_bytes``."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):  # listed in the order they were applied
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, coding, max_bytes)
        elif coding == "deflate":
            try:  # HTTP's "deflate" is zlib-wrapped; some clients send it raw
                body = _inflate(body, zlib.MAX_WBITS, coding, max_bytes)
            except InvalidInputError:
                body = _inflate(body, -zlib.MAX_WBITS, coding, max_bytes)
        else:
            raise UnsupportedMediaTypeError(
                f"Unsupported Content-Encoding {coding!r}.", hint="Use gzip, deflate or none."
            )
    return body


def _inflate(data: bytes, wbits: int, coding: str, max_bytes: int) -> bytes:
    out: list[bytes] = []
    size = 0
    while True:  # gzip bodies may hold several members back to back
        inflater = zlib.decompressobj(wbits)
        try:
            chunk = inflater.decompress(data, max_bytes - size + 1)
        except zlib.error as exc:
            raise InvalidInputError(f"The {coding} request body is corrupt: {exc}.") from None
        size += len(chunk)
        if size > max_bytes or inflater.unconsumed_tail:
            raise PayloadTooLargeError(
                f"The request body decompresses to more than {max_bytes} bytes."
            )
        out.append(chunk)
        if not inflater.eof:
            raise InvalidInputError(f"The {coding} request body is truncated.")
        data = inflater.unused_data
        if not data or wbits < 16:
            if data:
                raise InvalidInputError(f"The {coding} request body has trailing bytes.")
            return b"".join(out)


def compress_body(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """Compress a response as the client's ``Accept-Encoding`` allows; returns the coding."""
    for part in (accept_encoding or "").split(","):
        coding, _, params = part.partition(";")
        coding = coding.strip().lower()
        if params.replace(" ", "").lower() in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            continue
        if coding in ("gzip", "x-gzip"):
            zipper = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            return zipper.compress(body) + zipper.flush(), "gzip"
        if coding == "deflate":
            return zlib.compress(body), "deflate"
    return body, None


# --- requests ------------------------------------------------------------------------


def parse_infer_request(
    body: bytes,
    *,
    header_length: int | None,
    content_encoding: str | None = None,
    max_decompressed_bytes: int = 64 << 20,
) -> V2Request:
    """Decode an inference request body (JSON, then the binary tensors if any)."""
    body = decompress(body, content_encoding, max_decompressed_bytes)
    if header_length is None:
        header, binary = body, memoryview(b"")
    elif header_length < 0 or header_length > len(body):
        raise InvalidInputError(
            f"{HEADER_LENGTH} is {header_length} but the body has only {len(body)} bytes."
        )
    else:
        view = memoryview(body)
        header, binary = bytes(view[:header_length]), view[header_length:]
    obj = _load_json(header)

    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError(f"'id' must be a string, got {_kind(request_id)}.")
    parameters = _parameters(obj, "the request")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidInputError("Request parameter 'binary_data_output' must be true or false.")

    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError(
            "The request needs a non-empty 'inputs' list.",
            hint='Send {"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]}.',
        )
    inputs: list[V2Tensor] = []
    offset = 0
    for index, raw in enumerate(raw_inputs):
        tensor, offset = _parse_input(raw, index, binary, offset, header_length is not None)
        if any(t.name == tensor.name for t in inputs):
            raise InvalidInputError(f"Input {tensor.name!r} is given more than once.")
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidInputError(
            f"The body has {len(binary) - offset} bytes after the binary tensor data that no "
            "input's 'binary_data_size' accounts for.",
            hint=f"Check {HEADER_LENGTH} and each input's 'binary_data_size'.",
        )
    outputs = _parse_outputs(obj.get("outputs"), binary_output)
    return V2Request(request_id, inputs, outputs, parameters, binary_output)


def _load_json(header: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(header.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"The request JSON is not valid UTF-8: {exc}.",
            hint=f"If the body carries binary tensors, set {HEADER_LENGTH} to the JSON's length.",
        ) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(
            f"The request body is not valid JSON: {exc}.",
            hint=f"If the body carries binary tensors, set {HEADER_LENGTH} to the JSON's length.",
        ) from None
    if not isinstance(obj, dict):
        raise InvalidInputError(f"The request JSON must be an object, got {_kind(obj)}.")
    return obj


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = obj.get("parameters", {})
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidInputError(f"'parameters' of {where} must be an object.")
    if "shared_memory_region" in parameters:
        raise InvalidInputError(
            f"Shared memory ({where}) is not supported by this server.",
            hint="Send the tensor data in the request body instead.",
        )
    return parameters


def _parse_input(
    raw: Any, index: int, binary: memoryview, offset: int, has_binary: bool
) -> tuple[V2Tensor, int]:
    if not isinstance(raw, dict):
        raise InvalidInputError(f"inputs[{index}] must be an object, got {_kind(raw)}.")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"inputs[{index}] needs a non-empty string 'name'.")
    where = f"input {name!r}"
    for key in ("shape", "datatype"):
        if key not in raw:
            raise InvalidInputError(f"Input {name!r} has no {key!r}.")
    datatype = raw["datatype"]
    if not isinstance(datatype, str):
        raise InvalidInputError(f"Input {name!r}: 'datatype' must be a string.")
    try:
        dtype = numpy_dtype(datatype)
    except InvalidInputError as exc:
        raise InvalidInputError(f"Input {name!r}: {exc.message}", hint=exc.hint) from None
    shape = raw["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInputError(
            f"Input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}."
        )
    count = math.prod(shape)
    parameters = _parameters(raw, where)
    size = parameters.get("binary_data_size")

    if size is None:
        if "data" not in raw:
            raise InvalidInputError(
                f"Input {name!r} has neither 'data' nor a 'binary_data_size' parameter."
            )
        data = _from_json(raw["data"], name, datatype, dtype, count)
        return V2Tensor(name, datatype, shape, data.reshape(shape), parameters), offset

    if "data" in raw:
        raise InvalidInputError(f"Input {name!r} has both 'data' and 'binary_data_size'.")
    if type(size) is not int or size < 0:
        raise InvalidInputError(
            f"Input {name!r}: 'binary_data_size' must be a non-negative integer."
        )
    if not has_binary:
        raise InvalidInputError(
            f"Input {name!r} has binary data but the request has no {HEADER_LENGTH} header.",
            hint=f"Set {HEADER_LENGTH} to the byte length of the JSON part of the body.",
        )
    if offset + size > len(binary):
        raise InvalidInputError(
            f"Input {name!r}: 'binary_data_size' is {size} but only {len(binary) - offset} "
            "bytes of binary data are left in the body."
        )
    chunk = binary[offset : offset + size]
    data = _from_binary(chunk, name, datatype, dtype, count)
    return V2Tensor(name, datatype, shape, data.reshape(shape), parameters), offset + size


def _from_binary(
    chunk: memoryview, name: str, datatype: str, dtype: np.dtype[Any], count: int
) -> npt.NDArray[Any]:
    if datatype == "BYTES":
        return _unpack_bytes(chunk, name, count)
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInputError(
            f"Input {name!r}: 'binary_data_size' is {len(chunk)} bytes but {count} {datatype} "
            f"elements need {count * dtype.itemsize}."
        )
    if datatype == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise InvalidInputError(f"Input {name!r}: BOOL bytes must be 0 or 1.")
        return raw.astype(bool)
    # A copy: aligned, writable and in native byte order, so torch.from_numpy takes it.
    return np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="))


def _unpack_bytes(chunk: memoryview, name: str, count: int) -> npt.NDArray[Any]:
    if count * _LEN.size > len(chunk):
        raise InvalidInputError(
            f"Input {name!r}: {len(chunk)} bytes cannot hold {count} BYTES elements "
            "(each needs a 4-byte length prefix)."
        )
    items: list[bytes] = []
    offset = 0
    for i in range(count):
        if offset + _LEN.size > len(chunk):
            raise InvalidInputError(f"Input {name!r}: BYTES element {i} has no length prefix.")
        (length,) = _LEN.unpack_from(chunk, offset)
        offset += _LEN.size
        if offset + length > len(chunk):
            raise InvalidInputError(
                f"Input {name!r}: BYTES element {i} claims {length} bytes but only "
                f"{len(chunk) - offset} are left."
            )
        items.append(bytes(chunk[offset : offset + length]))
        offset += length
    if offset != len(chunk):
        raise InvalidInputError(
            f"Input {name!r}: {len(chunk) - offset} bytes are left after its {count} BYTES "
            "elements; 'binary_data_size' or 'shape' is wrong."
        )
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def _flatten(data: Any) -> list[Any]:
    """Nested lists to one row-major list, without recursion (JSON nests deep)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


_JSON_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "b": ((bool,), "true or false"),
    "i": ((int,), "an integer"),
    "u": ((int,), "an integer"),
    "f": ((int, float), "a number"),
    "V": ((int, float), "a number"),  # ml_dtypes' bfloat16
    "O": ((str,), "a string"),
}


def _from_json(
    data: Any, name: str, datatype: str, dtype: np.dtype[Any], count: int
) -> npt.NDArray[Any]:
    flat = _flatten(data)
    if len(flat) != count:
        raise InvalidInputError(
            f"Input {name!r} has {len(flat)} elements in 'data' but its shape needs {count}."
        )
    allowed, expected = _JSON_KINDS.get(dtype.kind, ((int, float), "a number"))
    for i, item in enumerate(flat):
        if type(item) not in allowed:
            raise InvalidInputError(
                f"Input {name!r}: element {i} is {_kind(item)} ({item!r:.40}) but {datatype} "
                f"needs {expected}."
            )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        try:
            out[:] = [s.encode("utf-8") for s in flat]
        except UnicodeEncodeError as exc:
            raise InvalidInputError(
                f"Input {name!r}: a string is not valid UTF-8: {exc}."
            ) from None
        return out
    if dtype.kind in "iu" and flat:
        info = np.iinfo(dtype)
        low, high = min(flat), max(flat)
        if low < info.min or high > info.max:
            raise InvalidInputError(
                f"Input {name!r}: values must lie in [{info.min}, {info.max}] for {datatype}, "
                f"got {low if low < info.min else high}."
            )
    native = dtype.newbyteorder("=")
    if dtype.kind in "fV":
        try:
            wide = np.array(flat, dtype=np.float64)
        except OverflowError:
            raise InvalidInputError(
                f"Input {name!r}: a value is too large for {datatype}."
            ) from None
        with np.errstate(over="ignore"):
            out = wide.astype(native)
        if np.any(np.isinf(out.astype(np.float64)) & np.isfinite(wide)):
            raise InvalidInputError(f"Input {name!r}: a value is too large for {datatype}.")
        return out
    return np.array(flat, dtype=native)


def _parse_outputs(raw: Any, binary_output: bool) -> list[RequestedOutput]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidInputError("'outputs' must be a list of {\"name\": ...} objects.")
    outputs: list[RequestedOutput] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInputError(f"outputs[{index}] must be an object with a string 'name'.")
        name = item["name"]
        parameters = _parameters(item, f"output {name!r}")
        binary = parameters.get("binary_data", binary_output)
        if not isinstance(binary, bool):
            raise InvalidInputError(f"Output {name!r}: 'binary_data' must be true or false.")
        if parameters.get("classification", 0):
            raise InvalidInputError(
                f"Output {name!r}: the classification extension is not supported.",
                hint="Request the raw output and take the top-k on the client.",
            )
        if any(o.name == name for o in outputs):
            raise InvalidInputError(f"Output {name!r} is requested more than once.")
        outputs.append(RequestedOutput(name, binary, parameters))
    return outputs


# --- responses -----------------------------------------------------------------------


def encode_infer_response(
    *,
    model_name: str,
    model_version: str | None,
    request: V2Request,
    outputs: list[V2Tensor],
) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers to set; only the outputs the request asked for."""
    by_name = {t.name: t for t in outputs}
    if request.outputs:
        chosen: list[tuple[V2Tensor, bool]] = []
        for wanted in request.outputs:
            if wanted.name not in by_name:
                raise InvalidInputError(
                    f"Model {model_name!r} has no output {wanted.name!r}.",
                    hint=f"Its outputs are: {', '.join(map(repr, by_name)) or 'none'}.",
                )
            chosen.append((by_name[wanted.name], wanted.binary))
    else:
        chosen = [(t, request.binary_output) for t in outputs]

    response: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        response["model_version"] = model_version
    if request.id is not None:
        response["id"] = request.id
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor, binary in chosen:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": [int(d) for d in tensor.shape],
        }
        data = _checked(tensor)
        parameters = dict(tensor.parameters)
        parameters.pop("binary_data_size", None)
        if binary:
            raw = _to_binary(data, tensor.datatype)
            parameters["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            entry["data"] = _to_json(data, tensor)
        if parameters:
            entry["parameters"] = parameters
        entries.append(entry)
    response["outputs"] = entries

    header = json.dumps(response, separators=(",", ":")).encode("utf-8")
    if not any(binary for _, binary in chosen):
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    headers = {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}
    return b"".join([header, *chunks]), headers


def _checked(tensor: V2Tensor) -> npt.NDArray[Any]:
    data = np.asarray(tensor.data)
    if data.size != math.prod(tensor.shape):
        raise ValueError(
            f"Output {tensor.name!r} has {data.size} elements but its shape {tensor.shape} "
            f"needs {math.prod(tensor.shape)}."
        )
    return data


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, np.bytes_):
        return bytes(item)
    return str(item).encode("utf-8")


def _to_binary(data: npt.NDArray[Any], datatype: str) -> bytes:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in data.ravel(order="C"):
            value = _as_bytes(item)
            parts += (_LEN.pack(len(value)), value)
        return b"".join(parts)
    return np.asarray(data, dtype=numpy_dtype(datatype)).tobytes(order="C")


def _to_json(data: npt.NDArray[Any], tensor: V2Tensor) -> list[Any]:
    flat = data.ravel(order="C")
    if tensor.datatype != "BYTES":
        if tensor.datatype == "BF16":  # plain floats in JSON
            return flat.astype(np.float32).tolist()  # type: ignore[no-any-return]
        return flat.astype(numpy_dtype(tensor.datatype)).tolist()  # type: ignore[no-any-return]
    try:
        return [_as_bytes(item).decode("utf-8") for item in flat]
    except UnicodeDecodeError:
        raise InvalidInputError(
            f"Output {tensor.name!r} holds bytes that are not UTF-8 text, so JSON cannot carry it.",
            hint='Request it with "parameters": {"binary_data": true}.',
        ) from None


def _kind(value: Any) -> str:
    return _KIND_NAMES.get(type(value), type(value).__name__)


_KIND_NAMES: dict[type, str] = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}
