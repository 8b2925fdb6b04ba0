"""Both front ends over real sockets: `torchship serve` subprocesses on loopback."""

from __future__ import annotations

import base64
import io
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from monitoring_utils import scrape
from serving_utils import SAMPLE, bomb_png, run_server

from torchship.demo import train_demo
from torchship.preprocessing import preprocess_image
from torchship.runtime import load_predictor
from torchship.store import ModelStore
from torchship.zoo import digits

FRAMEWORKS = ["fastapi", "flask"]


@pytest.fixture(scope="session")
def served_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served") / "models"
    store = ModelStore(root)
    train_demo(store, "digits", export=True)  # CNN v1, with TorchScript + ONNX
    train_demo(store, "digits", arch="mlp", alias="candidate")  # v2
    return root


@pytest.fixture(scope="session")
def expected_sample(served_store: Path) -> str:
    predictor = load_predictor(served_store, "digits:1", runtime="eager", warmup=False)
    assert predictor.input_spec is not None
    x = preprocess_image(SAMPLE.read_bytes(), predictor.input_spec)[None]
    return digits.LABELS[int(predictor.predict(x).argmax())]


@pytest.fixture(scope="module", params=FRAMEWORKS)
def server(request: pytest.FixtureRequest, served_store: Path) -> Iterator[str]:
    framework = request.param
    with run_server(
        served_store,
        "--model",
        "digits:1",
        "--model",
        "digits:candidate",
        "--max-body-bytes",
        "1000000",
        "--runtime",
        "onnx",
        framework=framework,
    ) as (base, proc):
        yield base
        proc.send_signal(__import__("signal").SIGTERM)
        assert proc.wait(timeout=30) == 0, "SIGTERM must drain and exit 0"


def _image_post(base: str, field: str, path: str = "/predict", **params: str) -> requests.Response:
    with SAMPLE.open("rb") as fh:
        return requests.post(
            f"{base}{path}",
            files={field: ("sample.jpg", fh, "image/jpeg")},
            params=params,
            timeout=30,
        )


@pytest.mark.parametrize("field", ["image", "file"])
def test_predict_multipart_image(server: str, field: str, expected_sample: str) -> None:
    r = _image_post(server, field)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "digits" and body["version"] == "1"
    assert body["runtime"] == "onnxruntime"
    (pred,) = body["predictions"]
    assert pred["label"] == expected_sample
    assert len(pred["top_k"]) == 5
    assert abs(sum(p["probability"] for p in pred["top_k"]) - 1) < 0.2


def test_predict_other_body_kinds(
    server: str, digits_data: digits.DigitsData, expected_sample: str
) -> None:
    raw = requests.post(
        f"{server}/predict",
        data=SAMPLE.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert raw.json()["predictions"][0]["label"] == expected_sample
    b64 = requests.post(
        f"{server}/predict",
        json={"image": base64.b64encode(SAMPLE.read_bytes()).decode()},
        timeout=30,
    )
    assert b64.json()["predictions"][0]["label"] == expected_sample

    x = digits_data.x_test[:6]
    js = requests.post(f"{server}/predict", json={"inputs": x.tolist(), "top_k": 2}, timeout=30)
    assert js.status_code == 200, js.text
    preds = js.json()["predictions"]
    assert [p["label"] for p in preds] == [str(int(y)) for y in digits_data.y_test[:6]]
    assert all(len(p["top_k"]) == 2 for p in preds)

    buf = io.BytesIO()
    np.save(buf, x[0].numpy())
    npy = requests.post(
        f"{server}/predict",
        data=buf.getvalue(),
        headers={"Content-Type": "application/x-npy"},
        timeout=30,
    )
    assert npy.json()["predictions"][0]["label"] == str(int(digits_data.y_test[0]))


def test_versions_and_aliases(server: str) -> None:
    r = _image_post(server, "image", version="candidate")
    assert r.json()["version"] == "2"
    r = _image_post(server, "image", version="2")
    assert r.json()["version"] == "2"
    r = _image_post(server, "file", path="/predictions/digits/2")
    assert r.status_code == 200
    assert len(r.json()) == 5 and all(isinstance(v, float) for v in r.json().values())


def _bad_requests() -> list[tuple[str, dict[str, object], int, str]]:
    sample = SAMPLE.read_bytes()
    one = [[[0.0] * 8] * 8]
    return [
        (
            "not an image",
            {"files": {"image": ("x.jpg", b"definitely not an image")}},
            400,
            "invalid_image",
        ),
        (
            "truncated jpeg",
            {"files": {"image": ("x.jpg", sample[: len(sample) // 2])}},
            400,
            "invalid_image",
        ),
        (
            "decompression bomb",
            {"files": {"image": ("x.png", bomb_png())}},
            413,
            "payload_too_large",
        ),
        (
            "over the size limit",
            {"data": b"\xff" * 1_200_000, "headers": {"Content-Type": "image/jpeg"}},
            413,
            "payload_too_large",
        ),
        ("wrong shape", {"json": {"inputs": [[1.0, 2.0, 3.0]]}}, 400, "invalid_input"),
        ("wrong dtype", {"json": {"inputs": [[["a"] * 8] * 8]}}, 400, "invalid_input"),
        (
            "NaN",
            {
                "data": json.dumps({"inputs": [[[float("nan")] * 8] * 8]}),
                "headers": {"Content-Type": "application/json"},
            },
            400,
            "invalid_input",
        ),
        (
            "inf",
            {
                "data": json.dumps({"inputs": [[[float("inf")] * 8] * 8]}),
                "headers": {"Content-Type": "application/json"},
            },
            400,
            "invalid_input",
        ),
        (
            "empty body",
            {"data": b"", "headers": {"Content-Type": "image/png"}},
            400,
            "invalid_input",
        ),
        (
            "empty json",
            {"data": b"", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_input",
        ),
        (
            "broken json",
            {"data": b"{'inputs':", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_input",
        ),
        (
            "wrong content type",
            {"data": b"a,b\n1,2", "headers": {"Content-Type": "text/csv"}},
            415,
            "unsupported_media_type",
        ),
        (
            "multipart without file",
            {"data": {"name": "x"}, "files": {"other": ("", b"")}},
            400,
            None,
        ),
        (
            "pickled npy",
            {"data": _pickled_npy(), "headers": {"Content-Type": "application/x-npy"}},
            400,
            "invalid_input",
        ),
        (
            "not an npy",
            {"data": b"\x80\x04garbage", "headers": {"Content-Type": "application/x-npy"}},
            400,
            "invalid_input",
        ),
        ("top_k zero", {"json": {"inputs": one, "top_k": 0}}, 400, "invalid_input"),
        (
            "top_k not a number (form)",
            {"files": {"image": ("s.jpg", sample)}, "data": {"top_k": "abc"}},
            400,
            "invalid_input",
        ),
        (
            "top_k not a number (query)",
            {"json": {"inputs": one}, "params": {"top_k": "abc"}},
            400,
            "invalid_input",
        ),
        (
            "unknown model",
            {"json": {"inputs": one}, "params": {"model": "cats"}},
            404,
            "model_not_found",
        ),
        (
            "unknown version",
            {"json": {"inputs": one}, "params": {"version": "9"}},
            404,
            "version_not_found",
        ),
        (
            "traversal in version",
            {"json": {"inputs": one}, "params": {"version": "../../etc"}},
            400,
            None,
        ),
    ]


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(
    server: str, case, expected_sample: str
) -> None:  # type: ignore[no-untyped-def]
    _name, kwargs, status, code = case
    r = requests.post(f"{server}/predict", timeout=30, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] and isinstance(body["error"], str)
    if code:
        assert body["code"] == code
    assert "Traceback" not in r.text
    assert _image_post(server, "image").json()["predictions"][0]["label"] == expected_sample


def test_wrong_method_and_route(server: str) -> None:
    for method, path in (
        ("GET", "/predict"),
        ("PUT", "/predict"),
        ("DELETE", "/v2/models/digits/infer"),
        ("GET", "/predictions/digits"),
        ("POST", "/health/ready"),
    ):
        r = requests.request(method, f"{server}{path}", timeout=5)
        assert r.status_code == 405 and r.json()["code"] == "method_not_allowed", (method, path)
    r = requests.post(f"{server}/nope", timeout=5)
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_a_chunked_body_over_the_limit_gets_413(server: str, expected_sample: str) -> None:
    """Without Content-Length the limit is enforced while the body streams in."""
    for path, content_type in (
        ("/predict", "image/jpeg"),
        ("/v2/models/digits/infer", "application/json"),
        ("/predictions/digits", "image/jpeg"),
    ):
        chunks = (b"\xff" * 100_000 for _ in range(12))  # 1.2 MB, the limit is 1 MB
        r = requests.post(
            f"{server}{path}", data=chunks, headers={"Content-Type": content_type}, timeout=30
        )
        assert r.status_code == 413 and r.json()["code"] == "payload_too_large", (path, r.text)
    assert _image_post(server, "image").json()["predictions"][0]["label"] == expected_sample


def test_health_models_metrics(server: str) -> None:
    assert requests.get(f"{server}/health/live", timeout=5).json() == {"status": "alive"}
    ready = requests.get(f"{server}/health/ready", timeout=5).json()
    assert ready["ready"] is True and ready["models"] == {"digits:1": True, "digits:2": True}
    assert requests.get(f"{server}/ping", timeout=5).json() == {"status": "Healthy"}
    models = requests.get(f"{server}/models", timeout=5).json()["models"]
    assert {(m["name"], m["version"]) for m in models} == {("digits", "1"), ("digits", "2")}
    assert all(m["max_batch_size"] >= 1 and m["batch_scaling"] for m in models)
    _image_post(server, "image")
    text = requests.get(f"{server}/metrics", timeout=5).text
    assert (
        'torchship_requests_total{code="200",endpoint="/predict",model="digits",version="1"}'
        in text
    )
    assert "torchship_batch_size_bucket" in text
    assert "process_resident_memory_bytes" in text


def test_client_that_disconnects_breaks_nothing(server: str, expected_sample: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    body = SAMPLE.read_bytes()
    for cut in (10, len(body) // 2):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:cut]
            )
    with socket.create_connection((host, int(port))) as s:  # sends all, leaves before the answer
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    assert _image_post(server, "file").json()["predictions"][0]["label"] == expected_sample


def test_concurrent_requests_are_batched_and_equal_unbatched(
    server: str, digits_data: digits.DigitsData, served_store: Path
) -> None:
    """Answers to concurrent requests, some of them batched together, equal the model's
    answers to each item alone (top 3, probabilities to 1e-5)."""
    xs = digits_data.x_test[:48]
    predictor = load_predictor(served_store, "digits:1", runtime="onnx", warmup=False)
    alone = [torch.softmax(predictor.predict(xs[i : i + 1]), 1)[0] for i in range(len(xs))]

    def one(i: int) -> dict:  # type: ignore[type-arg]
        return requests.post(
            f"{server}/predict", json={"inputs": xs[i].tolist(), "top_k": 3}, timeout=30
        ).json()

    items = batches = 0.0
    for _ in range(3):  # batching is opportunistic: it must happen in one of three rounds
        before = scrape(server)
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(len(xs))))
        after = scrape(server)
        for i, res in enumerate(results):
            ranked = [(r["index"], r["probability"]) for r in res["predictions"][0]["top_k"]]
            probs, idx = alone[i].topk(3)
            assert [k for k, _ in ranked] == idx.tolist()
            assert max(abs(p - float(q)) for (_, p), q in zip(ranked, probs, strict=True)) < 1e-5
        items += after.value("torchship_batch_size_sum") - before.value("torchship_batch_size_sum")
        batches += after.value("torchship_batch_size_count") - before.value(
            "torchship_batch_size_count"
        )
        if batches < items:
            break
    assert items >= len(xs) and batches < items, f"{items:.0f} items in {batches:.0f} batches"


def test_open_inference_protocol_with_tritonclient(
    server: str, digits_data: digits.DigitsData
) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "2")
    meta = client.get_server_metadata()
    assert meta["name"] == "torchship" and "binary_tensor_data" in meta["extensions"]
    model_meta = client.get_model_metadata("digits")
    assert model_meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert model_meta["platform"] == "onnxruntime_onnx"

    x = digits_data.x_test[:5].numpy()
    for binary in (True, False):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("output", binary_data=binary)
        result = client.infer("digits", [inp], outputs=[out])
        logits = result.as_numpy("output")
        assert logits.shape == (5, 10)
        assert logits.argmax(1).tolist() == digits_data.y_test[:5].tolist()
    # defaults (binary in and out), a version, and BYTES holding an encoded image
    inp = httpclient.InferInput("input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([SAMPLE.read_bytes()], dtype=object))
    result = client.infer("digits", [inp], model_version="1")
    assert result.as_numpy("output").shape == (1, 10)
    assert result.get_response()["model_version"] == "1"

    bad = httpclient.InferInput("input", [2, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(Exception, match="shape"):
        client.infer("digits", [bad])
    r = requests.post(f"{server}/v2/models/digits/infer", data=b"{not json", timeout=5)
    assert r.status_code == 400 and "error" in r.json()
    misnamed = {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32"}]}
    misnamed["inputs"][0]["data"] = [0.0] * 64
    r = requests.post(f"{server}/v2/models/digits/infer", json=misnamed, timeout=5)
    assert r.status_code == 400 and "no input named 'x'" in r.json()["error"]
    r = requests.get(f"{server}/v2/models/cats", timeout=5)
    assert r.status_code == 404 and "error" in r.json()
    client.close()
