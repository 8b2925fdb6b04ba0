"""The framework-free core and both adapters in-process (test clients)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from serving_utils import SAMPLE

from torchship.errors import ModelNotReadyError, QueueFullError
from torchship.serving import (
    ClassifierHandler,
    ImagePayload,
    InferenceService,
    ServeSettings,
    TensorPayload,
    fastapi_app,
    flask_app,
)
from torchship.store import ModelStore
from torchship.zoo import digits


@pytest.fixture(scope="module")
def core_store(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Path:
    root = tmp_path_factory.mktemp("core") / "models"
    ModelStore(root).save(
        quick_mlp,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=digits_data.x_test[:16],
    )
    return root


def _settings(store: Path, **kw: object) -> ServeSettings:
    base: dict[str, object] = {
        "store": store,
        "models": ["digits"],
        "runtime": "eager",
        "max_batch_size": 4,
    }
    return ServeSettings(**(base | kw))  # type: ignore[arg-type]


class GatedHandler(ClassifierHandler):
    """Inference waits for a gate: lets a test fill the queue deterministically."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.gate.wait(10)
        return super().inference(batch)


@pytest.fixture
def gated(core_store: Path) -> Iterator[tuple[InferenceService, GatedHandler]]:
    service = InferenceService(
        _settings(core_store, max_queue_size=1, max_batch_size=1, timeout_s=5)
    )
    handler = GatedHandler()
    service.load("digits", handler=handler)
    service._started = True
    yield service, handler
    handler.gate.set()
    service.stop()


def test_core_predict_image_and_tensor(core_store: Path, digits_data: digits.DigitsData) -> None:
    service = InferenceService(_settings(core_store)).start()
    try:
        image = service.predict(ImagePayload(SAMPLE.read_bytes()), top_k=3)
        assert (
            image.model == "digits"
            and image.version == "1"
            and len(image.predictions[0]["top_k"]) == 3
        )
        tensors = service.predict(TensorPayload(digits_data.x_test[:3].numpy()))
        assert len(tensors.predictions) == 3
        assert service.readiness()[0]
    finally:
        service.stop()
    assert not service.readiness()[0], "a draining/stopped service is not ready"


def test_never_ready_with_zero_models(core_store: Path) -> None:
    service = InferenceService(_settings(core_store, models=[])).start()
    assert service.readiness()[0] is False
    with pytest.raises(ModelNotReadyError):
        service.predict(TensorPayload(torch.zeros(1, 8, 8).numpy()))


def test_queue_full_is_503_with_retry_after(gated: tuple[InferenceService, GatedHandler]) -> None:
    service, handler = gated
    x = TensorPayload(torch.zeros(1, 1, 8, 8).numpy())
    results: list[object] = []
    first = threading.Thread(target=lambda: results.append(service.predict(x)))
    first.start()
    assert handler.entered.wait(5)  # first request is inside inference
    second = threading.Thread(target=lambda: results.append(service.predict(x)))
    second.start()
    loaded = service.get("digits")
    while loaded.batcher.queue_depth < 1:  # the second request is queued (bounded spin)
        threading.Event().wait(0.001)
    with pytest.raises(QueueFullError) as err:
        service.predict(x)
    assert err.value.retry_after >= 1
    client = TestClient(fastapi_app.create_app(service=service))  # no lifespan: service is ours
    r = client.post("/predict", json={"inputs": [[[0.0] * 8] * 8]})
    assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
    assert r.json()["code"] == "queue_full"
    fl = flask_app.create_app(service=service, load_in_background=False).test_client()
    r = fl.post("/predict", json={"inputs": [[[0.0] * 8] * 8]})
    assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
    handler.gate.set()
    first.join(5)
    second.join(5)
    assert len(results) == 2


def test_timeout_is_504(core_store: Path) -> None:
    service = InferenceService(_settings(core_store, timeout_s=0.2, max_batch_size=1))
    handler = GatedHandler()
    service.load("digits", handler=handler)
    service._started = True
    try:
        client = TestClient(fastapi_app.create_app(service=service))  # no lifespan
        r = client.post("/predict", json={"inputs": [[[0.0] * 8] * 8]})
        assert r.status_code == 504 and r.json()["code"] == "timeout"
        handler.gate.set()
        assert service.predict(TensorPayload(torch.zeros(1, 8, 8).numpy())).predictions
    finally:
        handler.gate.set()
        service.stop()


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_not_ready_while_loading_then_ready(core_store: Path, framework: str) -> None:
    service = InferenceService(_settings(core_store))
    gate = threading.Event()
    original = service.start

    def slow_start() -> InferenceService:
        gate.wait(10)
        return original()

    service.start = slow_start  # type: ignore[method-assign]
    if framework == "fastapi":
        ctx = TestClient(fastapi_app.create_app(service=service))
        client = ctx.__enter__()
    else:
        client = flask_app.create_app(service=service).test_client()
    try:
        r = client.get("/health/ready")
        assert r.status_code == 503
        r = client.post("/predict", json={"inputs": [[[0.0] * 8] * 8]})
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert client.get("/health/live").status_code == 200
        gate.set()
        for _ in range(2000):
            if client.get("/health/ready").status_code == 200:
                break
            threading.Event().wait(0.005)
        assert client.get("/health/ready").status_code == 200
        assert client.post("/predict", json={"inputs": [[[0.0] * 8] * 8]}).status_code == 200
    finally:
        if framework == "fastapi":
            ctx.__exit__(None, None, None)
        else:
            service.stop()


def test_openapi_docs_have_examples(core_store: Path) -> None:
    app = fastapi_app.create_app(_settings(core_store), load_in_background=False)
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
        body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json", "image/png"} <= set(body)
        assert body["application/json"]["examples"]["tensor"]["value"]["inputs"]
        assert "/v2/models/{name}/infer" in schema["paths"]
        assert client.get("/docs").status_code == 200
        example = body["application/json"]["examples"]["tensor"]["value"]
        assert client.post("/predict", json=example).status_code == 200
        v2_body = schema["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
        assert {"application/json", "application/octet-stream"} <= set(v2_body)
        v2_example = v2_body["application/json"]["examples"]["digit"]["value"]
        r = client.post("/v2/models/digits/infer", json=v2_example)
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 10]


def test_a_fast_cpu_model_batches_on_the_event_loop_with_the_same_answers(
    core_store: Path, digits_data: digits.DigitsData
) -> None:
    body = {"inputs": digits_data.x_test[:5].tolist(), "top_k": 3}
    answers = {}
    for inline_ms in (1000.0, 0.0):
        app = fastapi_app.create_app(
            _settings(core_store, inline_batch_ms=inline_ms), load_in_background=False
        )
        with TestClient(app) as client:
            info = client.get("/models").json()["models"][0]
            reply = client.post("/predict", json=body)
            assert reply.status_code == 200, reply.text
            answers[info["batches_on"]] = [p["top_k"] for p in reply.json()["predictions"]]
    assert set(answers) == {"event loop", "worker thread"}
    assert answers["event loop"] == answers["worker thread"]


def test_a_custom_inference_hook_never_runs_on_the_event_loop(core_store: Path) -> None:
    service = InferenceService(_settings(core_store, inline_batch_ms=1000.0))
    try:
        loaded = service.load("digits", handler=GatedHandler())
        assert loaded.info()["batches_on"] == "worker thread"
    finally:
        service.stop()


def test_non_finite_model_outputs_are_a_server_error_not_a_number() -> None:
    from torchship.errors import InferenceError
    from torchship.serving import TensorHandler
    from torchship.serving.payloads import load_json

    classifier, raw = ClassifierHandler(), TensorHandler()
    classifier.predictor = raw.predictor = type("P", (), {"labels": ["a", "b", "c"]})()  # type: ignore[assignment]
    for bad in (float("nan"), float("inf")):
        outputs = torch.tensor([[0.1, bad, 0.3]])
        for handler in (classifier, raw):
            with pytest.raises(InferenceError, match="NaN or infinite"):
                handler.postprocess(outputs, top_k=2)
    ok = classifier.postprocess(torch.tensor([[0.0, float("-inf"), 1.0]]), top_k=3)
    assert ok[0]["label"] == "c" and ok[0]["top_k"][-1]["probability"] == 0.0
    # what the fast JSON parser refuses still parses the standard library's way
    assert load_json(b'{"inputs": [NaN, 1e999, 123456789012345678901234567890]}')["inputs"][2] == (
        123456789012345678901234567890
    )


def test_started_service_freezes_what_is_alive_out_of_the_collectors_way(core_store: Path) -> None:
    import gc

    gc.unfreeze()
    try:
        for freeze in (False, True):
            service = InferenceService(_settings(core_store, gc_freeze=freeze)).start()
            try:
                assert (gc.get_freeze_count() > 0) is freeze
            finally:
                service.stop()
    finally:
        gc.unfreeze()


def test_the_collector_paused_for_start_up_is_back_once_the_models_load(core_store: Path) -> None:
    import gc

    from torchship._startup import pause_gc

    assert gc.isenabled()
    try:
        for user_disabled in (False, True):
            if user_disabled:
                gc.disable()  # the user's choice: start-up must not undo it
            pause_gc()
            assert not gc.isenabled()
            service = InferenceService(_settings(core_store, gc_freeze=False)).start()
            service.stop()
            assert gc.isenabled() is not user_disabled
    finally:
        gc.enable()


def test_stopping_while_the_models_load_waits_for_the_loader_and_loads_no_more(
    core_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGTERM at start-up: the loader thread must be done (no runtime's native threads
    # running while the interpreter exits: that aborted the container, exit 139) and
    # the second model must never load.
    in_load, release = threading.Event(), threading.Event()
    loads: list[str] = []
    original = InferenceService.load

    def slow_load(self: InferenceService, ref: str, **kw: object) -> object:
        loads.append(ref)
        in_load.set()
        release.wait(10)
        return original(self, ref, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(InferenceService, "load", slow_load)
    app = fastapi_app.create_app(_settings(core_store, models=["digits", "digits:1"]))
    with TestClient(app) as client:
        assert in_load.wait(10)
        assert client.get("/health/ready").status_code == 503
        threading.Timer(0.3, release.set).start()  # the load in hand ends after shutdown begins
    service: InferenceService = app.state.service
    assert loads == ["digits"]
    assert not any(t.name == "torchship-loader" and t.is_alive() for t in threading.enumerate())
    assert all(not m.ready for m in service.models())


def test_a_process_exiting_while_the_models_load_lets_the_loader_finish_first(
    core_store: Path,
) -> None:
    import subprocess
    import sys

    script = """
import sys, time
from torchship.serving import InferenceService, ServeSettings, flask_app
original = InferenceService.load
def slow(self, ref, **kw):
    time.sleep(0.5)
    loaded = original(self, ref, **kw)
    print("loaded", ref, flush=True)
    return loaded
InferenceService.load = slow
flask_app.create_app(ServeSettings(store=sys.argv[1], models=["digits", "digits:1"], runtime="eager"))
print("exiting", flush=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(core_store)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    # the model in hand finished loading before the interpreter shut down; no other began
    assert proc.stdout.split("\n")[:3] == ["exiting", "loaded digits", ""], proc.stdout


def test_v2_health_says_false_with_a_4xx(core_store: Path) -> None:
    """The Open Inference Protocol's health answers are the status: 200 true, 4xx false."""
    fast = fastapi_app.create_app(_settings(core_store), load_in_background=False)
    with TestClient(fast) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/digits/ready").status_code == 200
        _not_ready(fast.state.service)
        assert client.get("/v2/models/digits/ready").status_code == 400
        assert client.get("/v2/health/ready").json() == {"ready": False}
        assert client.get("/v2/health/ready").status_code == 400
        assert client.get("/health/ready").status_code == 503  # torchship's own probe
    flask = flask_app.create_app(_settings(core_store), load_in_background=False)
    service = flask.extensions["torchship"]
    try:
        client_f = flask.test_client()
        assert client_f.get("/v2/health/ready").status_code == 200
        service.begin_drain()  # SIGTERM seen: still serving, no longer ready
        assert client_f.get("/v2/models/digits/ready").status_code == 400
        assert client_f.post("/predict", json={"inputs": [[[0.0] * 8] * 8]}).status_code == 200
        _not_ready(service)
        assert client_f.get("/v2/models/digits/ready").status_code == 400
        assert client_f.get("/v2/health/ready").status_code == 400
        assert client_f.get("/health/ready").status_code == 503
    finally:
        service.stop()


def _not_ready(service: InferenceService) -> None:
    service.get("digits", None).ready = False  # as while a reload warms up
