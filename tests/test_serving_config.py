"""Serving configuration: YAML, env vars and flags; custom handlers; worker processes."""

from __future__ import annotations

import signal
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from serving_utils import SAMPLE, run_server

from torchship.demo import train_demo
from torchship.errors import ConfigError, ServiceUnavailableError
from torchship.serving import ImagePayload, InferenceService, ServeSettings
from torchship.serving.handlers import load_handler
from torchship.settings import load_settings
from torchship.store import InputSpec, ModelStore
from torchship.zoo import digits


def test_precedence_flags_over_env_over_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("models: [a, b]\nport: 9000\nmax_delay_ms: 7\nworkers: auto\n")
    s = load_settings(config, cls=ServeSettings)
    assert (s.models, s.port, s.max_delay_ms, s.workers) == (["a", "b"], 9000, 7.0, "auto")
    monkeypatch.setenv("TORCHSHIP_PORT", "9100")
    monkeypatch.setenv("TORCHSHIP_MODELS", "c,d:2")
    s = load_settings(config, cls=ServeSettings)
    assert (s.models, s.port, s.max_delay_ms) == (["c", "d:2"], 9100, 7.0)
    s = load_settings(config, cls=ServeSettings, port=9200, models=None)
    assert (s.models, s.port) == (["c", "d:2"], 9200)


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Invalid settings"):
        load_settings(cls=ServeSettings, port=-1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad, cls=ServeSettings)
    with pytest.raises(ConfigError, match="Invalid settings"):
        load_settings(cls=ServeSettings, framework="django")
    # one line per mistake, naming the field and the value, no documentation links
    with pytest.raises(ConfigError) as bad_limit:
        load_settings(cls=ServeSettings, rate_limits={"inference": "abc"})
    message = str(bad_limit.value)
    assert "rate_limits.inference.rate:" in message and "(got 'abc')" in message
    assert "burst" not in message and "errors.pydantic.dev" not in message


def test_workers_and_threads_never_oversubscribe() -> None:
    import os

    cores = os.cpu_count() or 1
    s = ServeSettings(workers="auto")
    assert s.worker_count() == cores and s.threads_per_worker() == 1
    assert ServeSettings(workers=1).threads_per_worker() == cores
    assert ServeSettings(workers=1, threads=3).threads_per_worker() == 3


HANDLER = textwrap.dedent(
    """
    from torchship.serving import ClassifierHandler

    class Tagged(ClassifierHandler):
        def postprocess(self, outputs, *, top_k):
            return [dict(item, handled_by="Tagged") for item in super().postprocess(outputs, top_k=top_k)]

    class NotAHandler:
        pass
    """
)


@pytest.fixture(scope="module")
def small_store(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Path:
    root = tmp_path_factory.mktemp("cfg") / "models"
    ModelStore(root).save(
        quick_mlp,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=digits_data.x_test[:8],
    )
    return root


def test_custom_handler_from_a_file(tmp_path: Path, small_store: Path) -> None:
    path = tmp_path / "my_handlers.py"
    path.write_text(HANDLER)
    settings = ServeSettings(
        store=small_store, runtime="eager", max_batch_size=2, handlers={"digits": f"{path}:Tagged"}
    )
    service = InferenceService(settings).start()
    try:
        result = service.predict(ImagePayload(SAMPLE.read_bytes()))
        assert result.predictions[0]["handled_by"] == "Tagged"
    finally:
        service.stop()
    with pytest.raises(ConfigError, match="not a Handler subclass"):
        load_handler(f"{path}:NotAHandler")
    with pytest.raises(ConfigError, match="Cannot load handler"):
        load_handler("torchship.nope:Thing")
    with pytest.raises(ConfigError, match="look like"):
        load_handler("no-colon")


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_several_worker_processes(tmp_path_factory: pytest.TempPathFactory, framework: str) -> None:
    root = tmp_path_factory.mktemp("workers") / "models"
    train_demo(ModelStore(root), "digits", export=False, epochs=3)
    with run_server(root, "--workers", "2", "--runtime", "eager", framework=framework) as (
        base,
        proc,
    ):

        def one(_: int) -> int:
            with SAMPLE.open("rb") as fh:
                return requests.post(f"{base}/predict", files={"file": fh}, timeout=30).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(40))) == {200}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_per_model_batching_options(tmp_path: Path, small_store: Path) -> None:
    ModelStore(small_store).save(
        digits.DigitsMLP(hidden=32, layers=1),
        "other",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
    )
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"store: {small_store}\nmodels: [digits, other]\nruntime: eager\nmax_batch_size: 4\nmax_delay_ms: 1\n"
        "model_options:\n  other: {max_batch_size: 1, max_delay_ms: 0}\n"
    )
    service = InferenceService(load_settings(config, cls=ServeSettings)).start()
    try:
        by_name = {m.name: m.batcher for m in service.models()}
        assert (by_name["digits"].max_batch_size, by_name["digits"].max_delay_ms) == (4, 1.0)
        assert (by_name["other"].max_batch_size, by_name["other"].max_delay_ms) == (1, 0.0)
    finally:
        service.stop()
    with pytest.raises(ConfigError):
        load_settings(cls=ServeSettings, max_batch_size=0)
    with pytest.raises(ConfigError):
        load_settings(cls=ServeSettings, model_options={"x": {"max_batch_size": 0}})
    with pytest.raises(ConfigError):
        load_settings(cls=ServeSettings, model_options={"x": {"max_batchsize": 3}})


def test_listeners_disable_nagle(tmp_path: Path) -> None:
    """Without TCP_NODELAY every keep-alive answer waits ~40 ms for a delayed ACK."""
    import socket

    import uvicorn
    from serving_utils import free_port

    from torchship.serving.runner import _sockets

    settings = ServeSettings(port=free_port(), management_port=free_port())
    config = uvicorn.Config(lambda *a: None, host=settings.host, port=settings.port)
    sockets = _sockets(config, settings)
    try:
        assert len(sockets) == 2
        for sock in sockets:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        for sock in sockets:
            sock.close()


def test_what_would_never_be_ready_is_refused_before_serving(small_store: Path) -> None:
    """A missing model or version, an unknown device, a missing handler, a taken port:
    one line and exit code 2 from `torchship serve`, not a server that never gets ready."""
    import socket
    import subprocess
    import sys

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "torchship", "serve", "--store", str(small_store), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = {
            ("--model", "nope"): "No model named 'nope'",
            ("--model", "digits:9"): "no version or alias '9'",
            ("--device", "bogus"): "'bogus' is not a device",
            ("--handler", "digits=nope.py:X"): "nope.py does not exist",
            ("--port", port): f"Cannot listen on 127.0.0.1:{port}",
        }
        for args, message in cases.items():
            done = serve(*args)
            assert done.returncode == 2, (args, done.stderr[-2000:])
            assert message in done.stderr and "Traceback" not in done.stderr, args


@pytest.mark.parametrize(
    ("sent", "probe"),
    [
        (b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"HEAD /v2/health/ready HTTP/1.1\r\n\r\n", True),
        (b"GET /metrics?name=x HTTP/1.1\r\n\r\n", True),
        (b"GET /ping HTTP/1.1\r\n", True),
        (b"POST /health/live HTTP/1.1\r\n\r\n", False),
        (b"GET /predict HTTP/1.1\r\n\r\n", False),
        (b"GET /pingpong HTTP/1.1\r\n\r\n", False),
        (b"GET http://x/health/live HTTP/1.1\r\n\r\n", False),
        (b"\x16\x03\x01\x02\x00", False),  # a TLS hello
        (b"", False),  # nothing arrived yet
    ],
)
def test_a_flask_worker_tells_probes_from_the_first_bytes(sent: bytes, probe: bool) -> None:
    import socket

    from torchship.serving.gunicorn_worker import is_probe, peek
    from torchship.serving.settings import DEFAULT_OPEN_PATHS

    server, client = socket.socketpair()
    with server, client:
        if sent:
            client.sendall(sent)
        first = peek(server)
        assert (first is not None and is_probe(first, DEFAULT_OPEN_PATHS)) is probe
        if sent:
            assert server.recv(len(sent)) == sent  # peeked, not consumed


def test_the_supervisor_of_worker_processes_imports_no_torch(small_store: Path) -> None:
    """`torchship serve --workers N` checks the settings and the store, then spawns the
    workers; importing torch there too (~1.3 s, ~250 MB) came before every worker's own."""
    import subprocess
    import sys

    code = textwrap.dedent(
        f"""
        import sys
        from torchship.cli import serve_cmds
        from torchship.serving import runner
        from torchship.serving.preflight import preflight
        from torchship.serving.settings import ServeSettings
        preflight(ServeSettings(store={str(small_store)!r}, models=["digits", "digits:1"]))
        runner.check_ports(ServeSettings(store={str(small_store)!r}, port=0))
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_model_that_fails_to_load_is_reported_and_the_others_serve(
    tmp_path: Path, small_store: Path
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text(
        "from torchship.serving.handlers import Handler\n"
        "class Broken(Handler):\n"
        "    def setup(self, predictor, **kw):\n"
        "        raise RuntimeError('no GPU kernel for this layer')\n"
    )
    import shutil

    root = shutil.copytree(small_store, tmp_path / "models")
    store = ModelStore(root)
    store.save(digits.DigitsMLP(), "other", input_spec=digits.input_spec(), labels=digits.LABELS)
    settings = ServeSettings(
        store=root,
        models=["digits", "other"],
        runtime="eager",
        handlers={"other": f"{broken}:Broken"},
    )
    service = InferenceService(settings).start()
    try:
        ready, body = service.readiness()
        assert not ready and "no GPU kernel" in body["load_errors"]["other"]
        assert service.predict(ImagePayload(SAMPLE.read_bytes())).model == "digits"
        # a typo in a later load is a 404 for its caller, not a reason for the probe
        from fastapi.testclient import TestClient

        from torchship.serving.fastapi_app import create_app

        client = TestClient(create_app(service=service))
        assert client.post("/manage/models/digits/versions/9/load").status_code == 404
        assert list(client.get("/health/ready").json()["load_errors"]) == ["other"]
    finally:
        service.stop()
    # an archive that fails to load keeps the server not ready too
    (tmp_path / "bad.mar").write_bytes(b"not a zip")
    with_archive = ServeSettings(
        store=root, models=["digits", "bad=bad.mar"], model_store=tmp_path, runtime="eager"
    )
    service = InferenceService(with_archive).start()
    try:
        ready, body = service.readiness()
        assert not ready and "not a model archive" in body["load_errors"]["bad=bad.mar"]
    finally:
        service.stop()
    only_broken = ServeSettings(
        store=root, models=["other"], runtime="eager", handlers={"other": f"{broken}:Broken"}
    )
    service = InferenceService(only_broken).start()
    try:
        with pytest.raises(ServiceUnavailableError, match="No model could be loaded: other"):
            service.predict(ImagePayload(SAMPLE.read_bytes()))
    finally:
        service.stop()


BLANK = textwrap.dedent(
    """
    import torch
    from torchship.serving import ClassifierHandler

    class Blank(ClassifierHandler):
        def preprocess(self, payload):
            return torch.zeros(1, *self.predictor.input_spec.shape)
    """
)


def test_v2_infer_goes_through_a_custom_handlers_preprocess(
    tmp_path: Path, small_store: Path
) -> None:
    """An image sent over the Open Inference Protocol meets the same handler as /predict."""
    import numpy as np
    from fastapi.testclient import TestClient

    from torchship.preprocessing import preprocess_image
    from torchship.serving.fastapi_app import create_app as create_fastapi
    from torchship.serving.flask_app import create_app as create_flask

    httpclient = pytest.importorskip("tritonclient.http")
    path = tmp_path / "blank.py"
    path.write_text(BLANK)
    settings = ServeSettings(
        store=small_store, runtime="eager", handlers={"digits": f"{path}:Blank"}
    )
    model = ModelStore(small_store).load("digits").eval()
    with torch.inference_mode():
        blank = model(torch.zeros(1, 1, 8, 8)).numpy()
        plain = model(preprocess_image(SAMPLE.read_bytes(), digits.input_spec())[None]).numpy()
    assert not np.allclose(blank, plain, atol=1e-3)  # the handler makes a difference

    image = httpclient.InferInput("input", [1], "BYTES")
    image.set_data_from_numpy(np.array([SAMPLE.read_bytes()], dtype=object))
    body, json_size = httpclient.InferenceServerClient.generate_request_body([image])
    headers = {"Inference-Header-Content-Length": str(json_size)}
    fastapi_app = create_fastapi(settings, load_in_background=False)
    with TestClient(fastapi_app) as client:
        r = client.post("/v2/models/digits/infer", content=body, headers=headers)
        answers = [(r.status_code, r.content, r.headers.get("inference-header-content-length"))]
    flask_app = create_flask(settings, load_in_background=False)
    try:
        r2 = flask_app.test_client().post("/v2/models/digits/infer", data=body, headers=headers)
        answers.append((r2.status_code, r2.data, r2.headers.get("inference-header-content-length")))
    finally:
        flask_app.extensions["torchship"].stop()
    for status, content, length in answers:
        assert status == 200, content[:300]
        result = httpclient.InferenceServerClient.parse_response_body(
            content, header_length=int(length) if length else None
        )
        np.testing.assert_allclose(result.as_numpy("output"), blank, atol=1e-5)


UNBATCHED = textwrap.dedent(
    """
    import torch
    from torchship.serving import ClassifierHandler

    class Unbatched(ClassifierHandler):
        def preprocess(self, payload):
            return torch.zeros(*self.predictor.input_spec.shape)  # forgot the batch axis
    """
)


def test_v2_refuses_bytes_for_a_tensor_model_and_a_handler_that_breaks_the_batch(
    tmp_path: Path, small_store: Path
) -> None:
    import numpy as np
    from fastapi.testclient import TestClient

    from torchship.serving.fastapi_app import create_app as create_fastapi

    httpclient = pytest.importorskip("tritonclient.http")
    image = httpclient.InferInput("input", [2], "BYTES")
    image.set_data_from_numpy(np.array([SAMPLE.read_bytes()] * 2, dtype=object))
    body, json_size = httpclient.InferenceServerClient.generate_request_body([image])
    headers = {"Inference-Header-Content-Length": str(json_size)}
    path = tmp_path / "unbatched.py"
    path.write_text(UNBATCHED)
    settings = ServeSettings(
        store=small_store, runtime="eager", handlers={"digits": f"{path}:Unbatched"}
    )
    with TestClient(create_fastapi(settings, load_in_background=False)) as client:
        r = client.post("/v2/models/digits/infer", content=body, headers=headers)
        assert r.status_code == 500 and "Unbatched.preprocess" in r.json()["error"]
        assert client.get("/health/ready").status_code == 200  # still serving
    tensor_model = tmp_path / "tensor" / "models"
    linear = torch.nn.Linear(4, 2)
    linear.init_kwargs = {"in_features": 4, "out_features": 2}  # type: ignore[assignment]
    ModelStore(tensor_model).save(linear, "lin", input_spec=InputSpec(shape=[4]))
    settings = ServeSettings(store=tensor_model, models=["lin"], runtime="eager")
    with TestClient(create_fastapi(settings, load_in_background=False)) as client:
        r = client.post("/v2/models/lin/infer", content=body, headers=headers)
        assert r.status_code == 400 and "not BYTES" in r.json()["error"]
