"""Security headers on every answer, and CORS for browser clients, on both front ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from policy_utils import FRAMEWORKS, INFER_KEY, KEYS, Client, settings
from policy_utils import two_version_store as make_store

from torchship.serving import InferenceService
from torchship.zoo import digits

APP = "https://app.example"


@pytest.fixture(scope="module")
def store_root(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Path:
    return make_store(tmp_path_factory.mktemp("headers") / "models", quick_mlp, digits_data)


@pytest.fixture(scope="module")
def service(store_root: Path) -> Iterator[InferenceService]:
    s = settings(store_root, api_keys=KEYS, cors_origins=[APP], max_body_bytes=2000)
    service = InferenceService(s).start()
    yield service
    service.stop()


@pytest.fixture(scope="module", params=FRAMEWORKS)
def client(request: pytest.FixtureRequest, service: InferenceService) -> Client:
    return Client(request.param, service)


def _secure(headers: object, csp: bool = True) -> bool:
    h = headers  # case-insensitive mapping
    ok = (
        h["X-Content-Type-Options"] == "nosniff"  # type: ignore[index]
        and h["X-Frame-Options"] == "DENY"  # type: ignore[index]
        and h["Referrer-Policy"] == "no-referrer"  # type: ignore[index]
    )
    has_csp = "default-src 'none'" in (h.get("Content-Security-Policy") or "")  # type: ignore[attr-defined]
    return ok and has_csp == csp


def test_every_answer_has_security_headers(client: Client) -> None:
    key = {"X-API-Key": INFER_KEY}
    answers = {
        "ok": client.predict(key),
        "unauthorized": client.predict(),
        "not found": client.call("get", "/nope", headers=key),
        "too large": client.call(
            "post",
            "/predict",
            content=b"x" * 5000,
            headers={**key, "Content-Type": "image/png"},
        ),
        "health": client.call("get", "/health/live"),
    }
    assert [r.status for r in answers.values()] == [200, 401, 404, 413, 200]
    for what, r in answers.items():
        assert _secure(r.headers), what


def test_html_pages_keep_their_scripts(service: InferenceService) -> None:
    docs = Client("fastapi", service).call("get", "/docs", headers={"X-API-Key": INFER_KEY})
    assert docs.status == 200 and _secure(docs.headers, csp=False)


def test_cors_preflight_and_actual_requests(client: Client) -> None:
    preflight = {
        "Origin": APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type",
    }
    r = client.call("options", "/predict", headers=preflight)  # no key: browsers send none
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == APP
    assert "x-api-key" in r.headers["Access-Control-Allow-Headers"].lower()
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    # refused: another origin, or a header not allowed
    r = client.call("options", "/predict", headers={**preflight, "Origin": "https://evil.example"})
    assert r.status == 403 and r.json["code"] == "forbidden" and "cors_origins" in r.json["hint"]
    assert "Access-Control-Allow-Origin" not in r.headers
    r = client.call(
        "options", "/predict", headers={**preflight, "Access-Control-Request-Headers": "x-evil"}
    )
    assert r.status == 403 and "x-evil" in r.json["error"]
    # actual requests: the allowed origin may read answers and the rate-limit headers...
    r = client.predict({"Origin": APP, "X-API-Key": INFER_KEY})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == APP
    assert "RateLimit-Remaining" in r.headers["Access-Control-Expose-Headers"]
    assert "Origin" in r.headers["Vary"]
    # ...and errors too (so a page can show why)
    r = client.predict({"Origin": APP})
    assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == APP
    # other origins get no CORS headers: the browser keeps the answer from the page
    r = client.predict({"Origin": "https://evil.example", "X-API-Key": INFER_KEY})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_no_cors_and_no_security_headers_when_turned_off(store_root: Path) -> None:
    service = InferenceService(settings(store_root, security_headers=False)).start()
    try:
        for framework in FRAMEWORKS:
            c = Client(framework, service)
            r = c.predict({"Origin": APP})
            assert r.status == 200 and "X-Frame-Options" not in r.headers
            assert "Access-Control-Allow-Origin" not in r.headers
            # without CORS, an OPTIONS preflight is just an OPTIONS request: not a 204
            r = c.call(
                "options",
                "/predict",
                headers={"Origin": APP, "Access-Control-Request-Method": "POST"},
            )
            assert r.status != 204 and "Access-Control-Allow-Origin" not in r.headers
    finally:
        service.stop()
