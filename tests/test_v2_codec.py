"""The V2 (Open Inference Protocol) codec against tritonclient's own encoder and decoder."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest

from torchship.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError
from torchship.serving.v2 import (
    HEADER_LENGTH,
    RequestedOutput,
    V2Request,
    V2Tensor,
    compress_body,
    encode_infer_response,
    error_body,
    model_metadata,
    numpy_dtype,
    parse_header_length,
    parse_infer_request,
    server_metadata,
    v2_datatype,
)


@pytest.fixture(scope="module")
def http() -> Any:
    return pytest.importorskip("tritonclient.http")


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "fp32": rng.standard_normal((2, 3)).astype(np.float32),
        "int64": np.array([[1, -2], [3, 2**40]], dtype=np.int64),
        "bytes": np.array([[b"hello", b""], [b"w\xc3\xb6rld", b"x" * 300]], dtype=object),
        "bool": np.array([True, False, True]),
        "fp16": np.array([[0.5, -1.25, 65504.0]], dtype=np.float16),
    }


def triton_request(
    http: Any,
    arrays: dict[str, np.ndarray],
    *,
    binary: bool = True,
    outputs: list[Any] | None = None,
    request_id: str = "",
) -> tuple[bytes, int | None]:
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        infer_input = http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        infer_input.set_data_from_numpy(array, binary_data=binary)
        inputs.append(infer_input)
    body, json_size = http.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id=request_id
    )
    return body, json_size


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert actual.tolist() == expected.tolist()


# --- requests from the real client ------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_parses_requests_built_by_tritonclient(http: Any, binary: bool) -> None:
    arrays = sample_arrays()
    body, json_size = triton_request(http, arrays, binary=binary, request_id="req-7")
    assert (json_size is not None) == binary

    request = parse_infer_request(body, header_length=json_size)

    assert request.id == "req-7"
    assert request.outputs == []
    assert request.binary_output is True  # the client asks for binary when it lists no outputs
    assert [t.name for t in request.inputs] == list(arrays)
    for tensor in request.inputs:
        assert tensor.datatype == v2_datatype(arrays[tensor.name].dtype)
        assert tensor.shape == list(arrays[tensor.name].shape)
        assert_same(tensor.data, arrays[tensor.name])


def test_binary_inputs_are_writable_native_arrays(http: Any) -> None:
    body, json_size = triton_request(http, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    data = parse_infer_request(body, header_length=json_size).inputs[0].data
    assert data.flags.writeable and data.flags.c_contiguous and data.dtype.isnative


def test_bf16_binary_input(http: Any) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    array = np.array([1.5, -2.0, 3.0], dtype=ml_dtypes.bfloat16)
    body, json_size = triton_request(http, {"x": array})
    tensor = parse_infer_request(body, header_length=json_size).inputs[0]
    assert tensor.datatype == "BF16"
    assert tensor.data.astype(np.float32).tolist() == [1.5, -2.0, 3.0]


def test_empty_tensors(http: Any) -> None:
    arrays = {
        "f": np.zeros((0, 3), dtype=np.float32),
        "s": np.empty((0,), dtype=object),
    }
    body, json_size = triton_request(http, arrays)
    request = parse_infer_request(body, header_length=json_size)
    assert [t.data.shape for t in request.inputs] == [(0, 3), (0,)]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_requests_as_tritonclient_sends_them(http: Any, encoding: str) -> None:
    arrays = sample_arrays()
    body, json_size = triton_request(http, arrays)
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    request = parse_infer_request(packed, header_length=json_size, content_encoding=encoding)
    for tensor in request.inputs:
        assert_same(tensor.data, arrays[tensor.name])


def test_raw_deflate_and_identity_are_accepted() -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [4]}]}
    ).encode()
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = raw.compress(body) + raw.flush()
    for payload, coding in ((packed, "deflate"), (body, "identity"), (body, None)):
        request = parse_infer_request(payload, header_length=None, content_encoding=coding)
        assert request.inputs[0].data.tolist() == [4]


def test_decompression_is_bounded() -> None:
    bomb = gzip.compress(b"\x00" * 100_000)
    with pytest.raises(PayloadTooLargeError):
        parse_infer_request(
            bomb, header_length=None, content_encoding="gzip", max_decompressed_bytes=1000
        )
    with pytest.raises(UnsupportedMediaTypeError):
        parse_infer_request(b"{}", header_length=None, content_encoding="br")
    with pytest.raises(InvalidInputError, match="corrupt"):
        parse_infer_request(b"not gzip", header_length=None, content_encoding="gzip")
    with pytest.raises(InvalidInputError, match="truncated"):
        parse_infer_request(bomb[:-12], header_length=None, content_encoding="gzip")


# --- responses read back by the real client ---------------------------------------------


def model_outputs() -> list[V2Tensor]:
    return [
        V2Tensor.from_numpy("logits", np.array([[0.25, np.nan, -1.0]], dtype=np.float32)),
        V2Tensor.from_numpy("label", np.array([b"cat", b"\xff\x00raw"], dtype=object)),
        V2Tensor.from_numpy("ids", np.array([[3], [1]], dtype=np.int64)),
        V2Tensor.from_numpy("mask", np.array([True, False])),
        V2Tensor.from_numpy("half", np.array([1.5, -0.5], dtype=np.float16)),
    ]


def read_back(http: Any, body: bytes, headers: dict[str, str], encoding: str | None = None) -> Any:
    length = headers.get(HEADER_LENGTH)
    return http.InferenceServerClient.parse_response_body(
        body,
        header_length=None if length is None else int(length),
        content_encoding=encoding,
    )


def assert_outputs_match(result: Any, names: list[str]) -> None:
    expected = {t.name: t.data for t in model_outputs()}
    assert [o["name"] for o in result.get_response()["outputs"]] == names
    for name in names:
        actual = result.as_numpy(name)
        np.testing.assert_array_equal(actual, expected[name])
        assert actual.dtype == expected[name].dtype


def test_default_binary_response_round_trip(http: Any) -> None:
    body, json_size = triton_request(http, {"x": np.ones((1, 3), dtype=np.float32)}, request_id="a")
    request = parse_infer_request(body, header_length=json_size)

    out, headers = encode_infer_response(
        model_name="m", model_version="2", request=request, outputs=model_outputs()
    )

    assert headers["Content-Type"] == "application/octet-stream"
    result = read_back(http, out, headers)
    assert result.get_response()["model_name"] == "m"
    assert result.get_response()["model_version"] == "2"
    assert result.get_response()["id"] == "a"
    assert_outputs_match(result, ["logits", "label", "ids", "mask", "half"])


def test_requested_outputs_mix_binary_and_json(http: Any) -> None:
    outputs = [
        http.InferRequestedOutput("half", binary_data=False),
        http.InferRequestedOutput("logits", binary_data=True),
        http.InferRequestedOutput("mask", binary_data=False),
        http.InferRequestedOutput("label"),
    ]
    body, json_size = triton_request(http, {"x": np.ones(2, dtype=np.float32)}, outputs=outputs)
    request = parse_infer_request(body, header_length=json_size)
    assert [(o.name, o.binary) for o in request.outputs] == [
        ("half", False),
        ("logits", True),
        ("mask", False),
        ("label", True),
    ]

    out, headers = encode_infer_response(
        model_name="m", model_version=None, request=request, outputs=model_outputs()
    )

    result = read_back(http, out, headers)
    assert "model_version" not in result.get_response()
    assert_outputs_match(result, ["half", "logits", "mask", "label"])


def test_json_only_response(http: Any) -> None:
    outputs = [http.InferRequestedOutput(n, binary_data=False) for n in ("ids", "logits")]
    body, json_size = triton_request(http, {"x": np.ones(2, np.float32)}, outputs=outputs)
    request = parse_infer_request(body, header_length=json_size)

    out, headers = encode_infer_response(
        model_name="m", model_version="1", request=request, outputs=model_outputs()
    )

    assert headers == {"Content-Type": "application/json"}
    assert json.loads(out)["outputs"][0] == {
        "name": "ids",
        "datatype": "INT64",
        "shape": [2, 1],
        "data": [3, 1],
    }
    assert_outputs_match(read_back(http, out, headers), ["ids", "logits"])


@pytest.mark.parametrize("accept", ["gzip", "deflate"])
def test_compressed_response(http: Any, accept: str) -> None:
    body, json_size = triton_request(http, {"x": np.ones(2, np.float32)})
    request = parse_infer_request(body, header_length=json_size)
    out, headers = encode_infer_response(
        model_name="m", model_version=None, request=request, outputs=model_outputs()
    )
    packed, coding = compress_body(out, accept)
    assert coding == accept
    assert_outputs_match(
        read_back(http, packed, headers, coding), ["logits", "label", "ids", "mask", "half"]
    )
    assert compress_body(out, "br, gzip;q=0") == (out, None)


def test_unknown_requested_output_and_json_of_binary_bytes() -> None:
    request = V2Request(None, [], [RequestedOutput("nope", True, {})], {}, False)
    with pytest.raises(InvalidInputError, match="no output 'nope'"):
        encode_infer_response(
            model_name="m", model_version=None, request=request, outputs=model_outputs()
        )
    request = V2Request(None, [], [RequestedOutput("label", False, {})], {}, False)
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        encode_infer_response(
            model_name="m", model_version=None, request=request, outputs=model_outputs()
        )


# --- hand-written JSON requests ----------------------------------------------------------


def parse_json(obj: Any) -> V2Request:
    return parse_infer_request(json.dumps(obj).encode(), header_length=None)


def one_input(**fields: Any) -> dict[str, Any]:
    tensor = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    tensor.update(fields)
    return {"inputs": [{k: v for k, v in tensor.items() if v is not None}]}


def test_nested_and_flat_json_data_both_work() -> None:
    nested = parse_json(one_input(shape=[2, 2], data=[[1, 2], [3, 4.5]])).inputs[0].data
    flat = parse_json(one_input(shape=[2, 2], data=[1, 2, 3, 4.5])).inputs[0].data
    assert nested.tolist() == flat.tolist() == [[1.0, 2.0], [3.0, 4.5]]
    assert nested.dtype == np.float32


def test_json_nan_infinity_and_strings_for_bytes() -> None:
    body = (
        b'{"inputs":[{"name":"x","shape":[3],"datatype":"FP64","data":[NaN,Infinity,-Infinity]}]}'
    )
    data = parse_infer_request(body, header_length=None).inputs[0].data
    assert np.isnan(data[0]) and data[1] == np.inf and data[2] == -np.inf
    text = parse_json(one_input(datatype="BYTES", data=["héllo", ""])).inputs[0].data
    assert text.tolist() == ["héllo".encode(), b""]


def test_request_parameters_and_output_defaults() -> None:
    obj = one_input()
    obj["parameters"] = {"binary_data_output": True, "priority": 1}
    obj["outputs"] = [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}]
    request = parse_json(obj)
    assert request.parameters["priority"] == 1
    assert [(o.name, o.binary) for o in request.outputs] == [("a", True), ("b", False)]


def binary_request(
    tensors: list[dict[str, Any]], blob: bytes, length: int | None = -1
) -> V2Request:
    header = json.dumps({"inputs": tensors}).encode()
    return parse_infer_request(header + blob, header_length=len(header) if length == -1 else length)


def bin_tensor(datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {
        "name": "x",
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }


MALFORMED_JSON: list[tuple[str, Any, str]] = [
    ("not an object", [1, 2], "must be an object"),
    ("no inputs", {"id": "1"}, "non-empty 'inputs'"),
    ("empty inputs", {"inputs": []}, "non-empty 'inputs'"),
    ("input not object", {"inputs": [3]}, r"inputs\[0\] must be an object"),
    ("no name", {"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "'name'"),
    ("no shape", one_input(shape=None), "Input 'x' has no 'shape'"),
    ("no datatype", one_input(datatype=None), "Input 'x' has no 'datatype'"),
    ("no data", one_input(data=None), "neither 'data' nor"),
    ("unknown datatype", one_input(datatype="FP8"), "Input 'x': Unknown datatype 'FP8'"),
    ("datatype not str", one_input(datatype=32), "'datatype' must be a string"),
    ("negative dim", one_input(shape=[-1, 2]), "non-negative integers"),
    ("shape not list", one_input(shape="2"), "non-negative integers"),
    ("float dim", one_input(shape=[2.0]), "non-negative integers"),
    ("too few", one_input(shape=[3]), "has 2 elements in 'data' but its shape needs 3"),
    ("too many nested", one_input(shape=[1, 1], data=[[1], [2]]), "has 2 elements"),
    ("string in FP32", one_input(data=[1.0, "2"]), r"element 1 is a string .* FP32 needs a number"),
    ("bool in FP32", one_input(data=[True, 2.0]), "element 0 is a boolean"),
    ("float in INT64", one_input(datatype="INT64", data=[1, 2.5]), "INT64 needs an integer"),
    ("int in BOOL", one_input(datatype="BOOL", data=[1, 0]), "BOOL needs true or false"),
    ("number in BYTES", one_input(datatype="BYTES", data=["a", 1]), "BYTES needs a string"),
    ("null element", one_input(data=[None, 1.0]), "element 0 is null"),
    ("out of range", one_input(datatype="UINT8", data=[1, 300]), r"\[0, 255\].*got 300"),
    ("negative unsigned", one_input(datatype="UINT32", data=[-1, 3]), "got -1"),
    ("too big for FP16", one_input(datatype="FP16", data=[1.0, 1e6]), "too large for FP16"),
    ("huge int for FP32", one_input(data=[1, 10**400]), "too large for FP32"),
    ("lone surrogate", one_input(datatype="BYTES", data=["a", "\ud800"]), "not valid UTF-8"),
    (
        "duplicate names",
        {"inputs": one_input()["inputs"] * 2},
        "Input 'x' is given more than once",
    ),
    ("id not string", {**one_input(), "id": 5}, "'id' must be a string"),
    ("parameters not object", {**one_input(), "parameters": [1]}, "'parameters'"),
    (
        "binary_data_output not bool",
        {**one_input(), "parameters": {"binary_data_output": "yes"}},
        "binary_data_output",
    ),
    ("outputs not list", {**one_input(), "outputs": {"name": "y"}}, "'outputs' must be a list"),
    ("output without name", {**one_input(), "outputs": [{}]}, r"outputs\[0\]"),
    (
        "binary_data not bool",
        {**one_input(), "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]},
        "'binary_data' must be true or false",
    ),
    (
        "duplicate outputs",
        {**one_input(), "outputs": [{"name": "y"}, {"name": "y"}]},
        "requested more than once",
    ),
    (
        "classification",
        {**one_input(), "outputs": [{"name": "y", "parameters": {"classification": 3}}]},
        "classification",
    ),
    (
        "shared memory",
        one_input(
            data=None, parameters={"shared_memory_region": "r", "shared_memory_byte_size": 8}
        ),
        "Shared memory",
    ),
    (
        "binary without header",
        one_input(data=None, parameters={"binary_data_size": 8}),
        HEADER_LENGTH,
    ),
]


@pytest.mark.parametrize(
    ("obj", "match"),
    [case[1:] for case in MALFORMED_JSON],
    ids=[case[0] for case in MALFORMED_JSON],
)
def test_malformed_json_requests(obj: Any, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        parse_json(obj)


def test_invalid_json_and_header_length() -> None:
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        parse_infer_request(b'{"inputs": [', header_length=None)
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        parse_infer_request(b"[" * 100_000, header_length=None)
    with pytest.raises(InvalidInputError, match="not valid UTF-8"):
        parse_infer_request(b'{"id": "\xff"}', header_length=None)
    with pytest.raises(InvalidInputError, match="the body has only 4 bytes"):
        parse_infer_request(b"{}  ", header_length=5)
    with pytest.raises(InvalidInputError, match="must be an integer"):
        parse_header_length("12a")
    with pytest.raises(InvalidInputError, match="must not be negative"):
        parse_header_length("-1")
    assert parse_header_length(" 42 ") == 42
    assert parse_header_length(None) is None


def test_binary_section_errors() -> None:
    floats = np.arange(2, dtype="<f4").tobytes()
    assert binary_request([bin_tensor("FP32", [2], 8)], floats).inputs[0].data.tolist() == [0, 1]
    with pytest.raises(InvalidInputError, match="'binary_data_size' is 7 bytes but 2 FP32"):
        binary_request([bin_tensor("FP32", [2], 7)], floats[:7])
    with pytest.raises(InvalidInputError, match="only 4 bytes of binary data are left"):
        binary_request([bin_tensor("FP32", [2], 8)], floats[:4])
    with pytest.raises(InvalidInputError, match="2 bytes after the binary tensor data"):
        binary_request([bin_tensor("FP32", [2], 8)], floats + b"xx")
    with pytest.raises(InvalidInputError, match="bytes after the binary tensor data"):
        binary_request([one_input()["inputs"][0]], b"junk")
    with pytest.raises(InvalidInputError, match="non-negative integer"):
        binary_request([bin_tensor("FP32", [2], -8)], floats)
    with pytest.raises(InvalidInputError, match="both 'data' and"):
        binary_request([{**bin_tensor("FP32", [2], 8), "data": [1, 2]}], floats)
    with pytest.raises(InvalidInputError, match="BOOL bytes must be 0 or 1"):
        binary_request([bin_tensor("BOOL", [2], 2)], b"\x01\x02")


def test_binary_bytes_errors() -> None:
    good = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    assert binary_request([bin_tensor("BYTES", [2], 10)], good).inputs[0].data.tolist() == [
        b"ab",
        b"",
    ]
    with pytest.raises(InvalidInputError, match="cannot hold 3 BYTES elements"):
        binary_request([bin_tensor("BYTES", [3], 10)], good)
    too_long = struct.pack("<I", 50) + b"ab" + struct.pack("<I", 0)
    with pytest.raises(InvalidInputError, match="element 0 claims 50 bytes"):
        binary_request([bin_tensor("BYTES", [2], 10)], too_long)
    with pytest.raises(InvalidInputError, match="4 bytes are left after its 1 BYTES"):
        binary_request([bin_tensor("BYTES", [1], 10)], good)
    with pytest.raises(InvalidInputError, match="no length prefix"):
        binary_request([bin_tensor("BYTES", [2], 8)], struct.pack("<I", 1) + b"abcd")


# --- small helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "datatype",
    [
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
    ],
)
def test_datatype_round_trip(datatype: str) -> None:
    assert v2_datatype(numpy_dtype(datatype)) == datatype


def test_datatype_edges() -> None:
    assert v2_datatype(np.dtype("U5")) == "BYTES"
    assert v2_datatype(np.dtype(">f4")) == "FP32"
    with pytest.raises(TypeError):
        v2_datatype(np.dtype(np.complex64))
    with pytest.raises(InvalidInputError, match="Unknown datatype"):
        numpy_dtype("STRING")


def test_metadata_and_errors() -> None:
    assert error_body("boom") == {"error": "boom"}
    assert server_metadata("torchship", "0.1.0", ["binary_tensor_data"]) == {
        "name": "torchship",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    meta = model_metadata(
        "digits",
        ["1", "2"],
        "pytorch_torchscript",
        [("x", "FP32", [-1, 64])],
        [("y", "FP32", [-1, 10])],
    )
    assert meta == {
        "name": "digits",
        "versions": ["1", "2"],
        "platform": "pytorch_torchscript",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
    }
