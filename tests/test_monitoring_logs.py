"""Structured logs: request ids, JSON/text lines, access lines with sampling, truncation
and redaction; unexpected errors logged once, never leaked (both front ends, in process)."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from monitoring_utils import BOOM, save_digits, write_buggy_handler

from torchship.monitoring.logs import (
    REDACTED,
    AccessLog,
    AccessRecord,
    JsonFormatter,
    RequestContextFilter,
    TextFormatter,
    configure_logging,
    end_request,
    new_request_id,
    note_model,
    start_request,
)
from torchship.serving.settings import ServeSettings

FRAMEWORKS = ["fastapi", "flask"]
HEX_ID = re.compile(r"^[0-9a-f]{32}$")


# --- request ids and formatters ----------------------------------------------------------


@pytest.mark.parametrize("good", ["abc-123", "7f0c2a1e-1d7b-4c4e-9f0e-5a1b2c3d4e5f", "lb:42/x.y_z"])
def test_sane_request_ids_are_kept(good: str) -> None:
    assert new_request_id(good) == good


@pytest.mark.parametrize(
    "bad", [None, "", "has space", 'quo"te', "new\nline", "x" * 129, "<script>", "ünïcode"]
)
def test_other_request_ids_are_replaced(bad: str | None) -> None:
    assert HEX_ID.match(new_request_id(bad))


def _record(msg: str = "hello %s", *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("torchship.test", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_request_context_and_extras() -> None:
    _, token = start_request("req-1")
    try:
        note_model("digits", "3")
        record = _record("hello %s", "world", latency_ms=1.5, status=200)
        RequestContextFilter().filter(record)
    finally:
        end_request(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world"
    assert line["level"] == "info" and line["logger"] == "torchship.test"
    assert (line["request_id"], line["model"], line["version"]) == ("req-1", "digits", "3")
    assert (line["latency_ms"], line["status"]) == (1.5, 200)
    assert line["ts"].endswith("+00:00")
    outside = _record()
    RequestContextFilter().filter(outside)
    assert "request_id" not in json.loads(JsonFormatter().format(outside))


def test_json_lines_hold_the_traceback_of_an_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "failed", (), exc_info=__import__("sys").exc_info()
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["error_type"] == "ValueError"
    assert "Traceback" in line["traceback"] and "boom" in line["traceback"]


def test_text_lines_show_the_request_id_and_fields() -> None:
    record = _record("GET / 200", request_id="abc", status=200, path="/a b")
    text = TextFormatter().format(record)
    assert "torchship.test [abc] GET / 200" in text
    assert "status=200" in text and 'path="/a b"' in text


def test_text_lines_read_like_the_standard_formatter_across_seconds() -> None:
    """The time is formatted once per second and reused: each line still shows its own
    second and milliseconds, also when the clock goes back; tracebacks and stacks
    follow on their own lines, as logging.Formatter puts them."""
    reference = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    ours = TextFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = __import__("sys").exc_info()
    start = 1_700_000_000.0
    for created, message, exc, stack in [
        (start + 0.001, "a", None, None),
        (start + 0.999, "b", None, None),
        (start + 1.25, "ends with a newline\n", exc_info, None),
        (start - 3600.5, "earlier", None, "Stack (most recent call last):\n  here"),
        (start + 1.5, "c", exc_info, "Stack (most recent call last):\n  here"),
    ]:
        record = logging.LogRecord("t", logging.INFO, __file__, 1, message, (), exc, sinfo=stack)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        assert ours.format(record) == reference.format(record)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access = logging.getLogger("torchship.access")
    access_level = access.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    access.setLevel(access_level)


def test_configure_logging_installs_one_handler_and_replaces_it(restore_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("text", stream=first)
    configure_logging("json", stream=second, level="INFO")
    logging.getLogger("torchship.test").info("once", extra={"k": 1})
    assert first.getvalue() == ""
    (line,) = second.getvalue().splitlines()
    assert json.loads(line)["k"] == 1
    assert logging.getLogger("torchship.access").isEnabledFor(logging.INFO)
    configure_logging("json", access_log=False, stream=second)
    assert not logging.getLogger("torchship.access").isEnabledFor(logging.INFO)


# --- access lines ------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _access(**kw: Any) -> tuple[AccessLog, _Capture]:
    logger = logging.getLogger(f"test.access.{random.random()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    cap = _Capture()
    logger.addHandler(cap)
    return AccessLog(logger=logger, **kw), cap


def _rec(status: int = 200, **kw: Any) -> AccessRecord:
    base: dict[str, Any] = dict(
        method="POST", path="/predict", query="", status=status, seconds=0.0123, endpoint="/predict"
    )
    return AccessRecord(**{**base, **kw})


def test_access_lines_redact_configured_fields_everywhere() -> None:
    log, cap = _access(log_bodies=True, redact_fields=["password", "authorization", "api_key"])
    body = {"inputs": [1, 2], "password": "hunter2", "nested": [{"API_KEY": "k-123"}]}
    log.log(
        _rec(
            query="api_key=k-456&top_k=3",
            request_headers={"Authorization": "Bearer sekrit", "Accept": "*/*"},
            request_body=json.dumps(body).encode(),
            request_type="application/json",
            response_body=b'{"ok":true,"password":"p"}',
            response_type="application/json",
        )
    )
    (r,) = cap.records
    text = json.dumps(r.__dict__, default=str)
    for secret in ("hunter2", "k-123", "k-456", "sekrit", '"p"'):
        assert secret not in text
    assert json.loads(r.request_body) == {
        "inputs": [1, 2],
        "password": REDACTED,
        "nested": [{"API_KEY": REDACTED}],
    }
    assert r.request_headers == {"Authorization": REDACTED, "Accept": "*/*"}
    assert "top_k=3" in r.query and "k-456" not in r.query
    assert r.latency_ms == 12.3 and r.status == 200


def test_access_lines_truncate_and_describe_bodies() -> None:
    log, cap = _access(log_bodies=True, max_body_chars=40, redact_fields=["token"])
    # JSON cut off before its end (only the first bytes were kept): redacted as text
    partial = b'{"token": "abcdef", "inputs": [' + b"1, " * 5000
    log.log(
        _rec(
            request_body=partial[:200],
            request_type="application/json",
            request_bytes=len(partial),
            request_complete=False,
            response_body=b"\x89PNG...",
            response_type="image/png",
            response_bytes=1234,
        )
    )
    (r,) = cap.records
    assert "abcdef" not in r.request_body and REDACTED in r.request_body
    assert "...(+" in r.request_body and f"(of {len(partial):,} bytes)" in r.request_body
    assert r.response_body == "<1,234 bytes image/png>"


def test_access_line_levels_keep_error_for_the_servers_faults() -> None:
    log, cap = _access()
    for status, path in (
        (200, "/predict"),
        (500, "/predict"),
        (503, "/predict"),
        (503, "/health/ready"),
    ):
        log.log(_rec(status, path=path))
    assert [r.levelno for r in cap.records] == [
        logging.INFO,  # served
        logging.ERROR,  # the server's fault
        logging.WARNING,  # not ready, draining, queue full: a state, not a fault
        logging.INFO,  # a readiness probe asked exactly that
    ]


def test_sampling_keeps_errors_and_a_fraction_of_successes() -> None:
    log, cap = _access(sample_rate=0.25, rng=random.Random(7))
    for _ in range(400):
        log.log(_rec(200))
    kept = len(cap.records)
    assert 60 <= kept <= 140  # ~100 of 400 with this seed, every time
    for _ in range(10):
        log.log(_rec(503))
    assert len(cap.records) == kept + 10
    off, cap_off = _access(sample_rate=0.0)
    off.log(_rec(200))
    off.log(_rec(404))
    assert [r.status for r in cap_off.records] == [404]
    disabled, cap_disabled = _access(enabled=False)
    disabled.log(_rec(500))
    assert cap_disabled.records == []


# --- both front ends, in process ---------------------------------------------------------


@pytest.fixture(scope="module")
def log_store(tmp_path_factory: pytest.TempPathFactory, quick_mlp: torch.nn.Module) -> Path:
    return save_digits(tmp_path_factory.mktemp("logs") / "models", quick_mlp)


def _client(framework: str, settings: ServeSettings) -> Any:
    if framework == "fastapi":
        from fastapi.testclient import TestClient

        from torchship.serving.fastapi_app import create_app

        return TestClient(create_app(settings, load_in_background=False))
    from torchship.serving.flask_app import create_app as create_flask

    app = create_flask(settings, load_in_background=False)
    client = app.test_client()
    client.service = app.extensions["torchship"]
    return client


@pytest.fixture(params=FRAMEWORKS)
def client(
    request: pytest.FixtureRequest,
    log_store: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> Iterator[Any]:
    settings = ServeSettings(
        store=log_store,
        models=["digits"],
        runtime="eager",
        max_batch_size=4,
        handlers={"digits": write_buggy_handler(tmp_path)},
        log_bodies=True,
        log_max_body_chars=2000,
        log_redact_fields=["password", "authorization"],
    )
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestContextFilter())  # what configure_logging installs
    c = _client(request.param, settings)
    if request.param == "fastapi":
        with c:
            yield c
    else:
        yield c
        c.service.stop()


def _json_body(r: Any) -> Any:
    return json.loads(r.data if hasattr(r, "data") else r.content)


def _post(client: Any, path: str, body: bytes | None = None, **kw: Any) -> Any:
    """POST through either test client (httpx's takes raw bytes as content=)."""
    if body is not None:
        kw["data" if hasattr(client, "application") else "content"] = body
    return client.post(path, **kw)


def _access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "torchship.access"]


def test_request_id_is_taken_or_made_and_returned(client: Any) -> None:
    given = _post(
        client, "/predict", json={"inputs": [[[0.0] * 8] * 8]}, headers={"X-Request-ID": "abc-1"}
    )
    assert given.status_code == 200
    assert given.headers["X-Request-ID"] == "abc-1"
    made = [client.get("/health/live").headers["X-Request-ID"] for _ in range(2)]
    assert all(HEX_ID.match(m) for m in made) and made[0] != made[1]
    unsafe = client.get("/health/live", headers={"X-Request-ID": 'bad id "x"'})
    assert HEX_ID.match(unsafe.headers["X-Request-ID"])


def test_access_line_per_request_with_latency_model_version_status(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    r = _post(
        client,
        "/predict",
        json={"inputs": [[[0.0] * 8] * 8], "password": "hunter2"},
        headers={"X-Request-ID": "line-1", "Authorization": "Bearer sekrit"},
    )
    assert r.status_code == 200
    (line,) = [a for a in _access_records(caplog) if a.request_id == "line-1"]
    assert (line.status, line.model, line.version, line.endpoint) == (
        200,
        "digits",
        "1",
        "/predict",
    )
    assert line.latency_ms > 0 and line.levelno == logging.INFO
    assert json.loads(line.request_body)["password"] == REDACTED
    assert {k.lower(): v for k, v in line.request_headers.items()}["authorization"] == REDACTED
    assert "hunter2" not in caplog.text and "sekrit" not in caplog.text
    assert json.loads(line.response_body)["predictions"][0]["label"] in {str(i) for i in range(10)}


def test_bad_input_is_a_logged_4xx_and_the_server_keeps_serving(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    bad = _post(
        client, "/predict", json={"inputs": "not numbers"}, headers={"X-Request-ID": "bad-1"}
    )
    assert bad.status_code == 400 and _json_body(bad)["code"] == "invalid_input"
    (line,) = [a for a in _access_records(caplog) if a.request_id == "bad-1"]
    assert line.status == 400 and line.error == "invalid_input"
    assert not [r for r in caplog.records if r.exc_info]  # a client error has no traceback
    ok = _post(client, "/predict", json={"inputs": [[[0.0] * 8] * 8]})
    assert ok.status_code == 200


def test_unexpected_error_is_logged_once_with_traceback_and_hidden(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    r = _post(
        client, "/predict", BOOM, headers={"Content-Type": "image/png", "X-Request-ID": "boom-1"}
    )
    assert r.status_code == 500
    assert _json_body(r) == {"error": "Internal server error.", "code": "internal_error"}
    assert r.headers["X-Request-ID"] == "boom-1"
    assert "secret" not in (r.data if hasattr(r, "data") else r.content).decode()
    with_traceback = [rec for rec in caplog.records if rec.exc_info]
    assert len(with_traceback) == 1, [rec.getMessage() for rec in with_traceback]
    (error,) = with_traceback
    assert error.request_id == "boom-1" and error.model == "digits"
    assert "secret-internal-detail" in str(error.exc_info[1])
    (line,) = [a for a in _access_records(caplog) if a.request_id == "boom-1"]
    assert line.status == 500 and line.error == "internal_error" and line.levelno == logging.ERROR
    assert _post(client, "/predict", json={"inputs": [[[0.0] * 8] * 8]}).status_code == 200


def test_sampled_out_successes_have_no_line_but_errors_do(
    log_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi.testclient import TestClient

    from torchship.serving.fastapi_app import create_app

    caplog.set_level(logging.INFO)
    settings = ServeSettings(
        store=log_store, models=["digits"], runtime="eager", max_batch_size=4, log_sample_rate=0
    )
    with TestClient(create_app(settings, load_in_background=False)) as c:
        caplog.clear()
        assert c.get("/health/live").status_code == 200
        assert c.get("/nope").status_code == 404
    assert [(r.path, r.status) for r in _access_records(caplog)] == [("/nope", 404)]
