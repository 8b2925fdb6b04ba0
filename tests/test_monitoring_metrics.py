"""Prometheus metrics move as they should: real requests over a socket to both front ends
(one process), then /metrics scraped and compared with what was sent."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from monitoring_utils import BOOM, save_digits, scrape, serve_in_thread, write_buggy_handler
from serving_utils import SAMPLE

from torchship.monitoring.scrape import Scrape, histogram_quantile
from torchship.serving.metrics import record_cache, record_rate_limited
from torchship.serving.settings import ServeSettings

FRAMEWORKS = ["fastapi", "flask"]
DIGIT = [[[0.0] * 8] * 8]


@pytest.fixture(scope="module")
def metrics_store(tmp_path_factory: pytest.TempPathFactory, quick_mlp: torch.nn.Module) -> Path:
    return save_digits(tmp_path_factory.mktemp("metrics") / "models", quick_mlp)


@pytest.fixture(scope="module", params=FRAMEWORKS)
def server(
    request: pytest.FixtureRequest, metrics_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    settings = ServeSettings(
        store=metrics_store,
        models=["digits"],
        runtime="eager",
        max_batch_size=8,
        max_body_bytes=50_000,
        handlers={"digits": write_buggy_handler(tmp_path_factory.mktemp("handler"))},
        access_log=False,
    )
    if request.param == "fastapi":
        from torchship.serving.fastapi_app import create_app

        app: Any = create_app(settings, load_in_background=False)
    else:
        from torchship.serving.flask_app import create_app as create_flask

        app = create_flask(settings, load_in_background=False)
    with serve_in_thread(app, request.param) as base:
        yield base


def _delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def _v2_body() -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]
    }


def test_requests_latency_stages_and_batches_add_up(server: str) -> None:
    before = scrape(server)
    with SAMPLE.open("rb") as fh:
        assert requests.post(f"{server}/predict", files={"file": fh}, timeout=30).ok
    two = requests.post(f"{server}/predict", json={"inputs": [DIGIT, DIGIT]}, timeout=30)
    assert two.ok and len(two.json()["predictions"]) == 2
    b64 = base64.b64encode(SAMPLE.read_bytes()).decode()
    assert requests.post(f"{server}/predict", json={"image": b64}, timeout=30).ok
    assert requests.post(f"{server}/predictions/digits", data=SAMPLE.read_bytes(), timeout=30).ok
    assert requests.post(f"{server}/v2/models/digits/infer", json=_v2_body(), timeout=30).ok
    after = scrape(server)

    ok = {"model": "digits", "version": "1", "code": "200"}
    assert _delta(after, before, "torchship_requests_total", endpoint="/predict", **ok) == 3
    # route templates, written alike by both front ends (one dashboard query for both)
    ts_endpoint = "/predictions/{name}"
    assert _delta(after, before, "torchship_requests_total", endpoint=ts_endpoint, **ok) == 1
    v2 = "/v2/models/{name}/infer"
    assert _delta(after, before, "torchship_requests_total", endpoint=v2, **ok) == 1
    # end-to-end latency: one observation per request, none of them zero
    count = _delta(after, before, "torchship_request_latency_seconds_count", model="digits")
    assert count == 5
    assert _delta(after, before, "torchship_request_latency_seconds_sum", model="digits") > 0
    # 6 items went through the batcher: queue waits per item, batch sizes summing to 6
    digits = {"model": "digits", "version": "1"}
    assert _delta(after, before, "torchship_queue_wait_seconds_count", **digits) == 6
    assert _delta(after, before, "torchship_batch_size_sum", **digits) == 6
    batches = _delta(after, before, "torchship_batch_size_count", **digits)
    assert 1 <= batches <= 6
    assert _delta(after, before, "torchship_inference_seconds_count", **digits) == batches
    assert _delta(after, before, "torchship_preprocess_seconds_count", **digits) == 5


def test_errors_by_type_and_status_code(server: str) -> None:
    before = scrape(server)
    bad_image = requests.post(
        f"{server}/predict", files={"file": ("x.png", b"not an image", "image/png")}, timeout=30
    )
    assert bad_image.status_code == 400
    unknown = requests.post(
        f"{server}/predict", params={"model": "nope"}, json={"inputs": DIGIT}, timeout=30
    )
    assert unknown.status_code == 404
    too_big = requests.post(
        f"{server}/predict", data=b"0" * 60_000, headers={"Content-Type": "image/png"}, timeout=30
    )
    assert too_big.status_code == 413
    boom = requests.post(
        f"{server}/predict", data=BOOM, headers={"Content-Type": "image/png"}, timeout=30
    )
    assert boom.status_code == 500 and boom.json()["code"] == "internal_error"
    wrong_method = requests.get(f"{server}/predict", timeout=30)
    assert wrong_method.status_code == 405
    no_route = requests.get(f"{server}/no/such/route", timeout=30)
    assert no_route.status_code == 404
    assert requests.post(
        f"{server}/predict", json={"inputs": DIGIT}, timeout=30
    ).ok  # still serving
    after = scrape(server)

    def errors(kind: str, **labels: str) -> float:
        return _delta(after, before, "torchship_errors_total", type=kind, **labels)

    assert errors("invalid_image", model="digits", version="1") == 1
    assert errors("model_not_found") == 1
    assert errors("payload_too_large") == 1
    assert errors("internal_error", model="digits", version="1") == 1
    assert errors("method_not_allowed") == 1
    assert errors("not_found") == 1

    def code(c: str, endpoint: str = "/predict") -> float:
        return _delta(after, before, "torchship_requests_total", endpoint=endpoint, code=c)

    # refused before routing (413, 405) still count under their route
    assert (code("400"), code("404"), code("413"), code("500"), code("405")) == (1, 1, 1, 1, 1)
    assert code("404", endpoint="unmatched") == 1


def test_gauges_process_metrics_and_shared_counters(server: str) -> None:
    before = scrape(server)
    record_cache("digits", "1", hit=True)
    record_cache("digits", "1", hit=True)
    record_cache("digits", "1", hit=False)
    record_rate_limited("client")
    after = scrape(server)
    assert _delta(after, before, "torchship_cache_hits_total", model="digits", version="1") == 2
    assert _delta(after, before, "torchship_cache_misses_total", model="digits", version="1") == 1
    assert _delta(after, before, "torchship_rate_limited_total", scope="client") == 1

    assert after.value("torchship_in_flight_requests") == 1  # the scrape itself
    assert after.value("torchship_queue_depth", model="digits", version="1") == 0
    assert after.value("torchship_model_ready", model="digits", version="1") == 1
    assert after.value("torchship_ready") == 1
    assert after.value("torchship_workers") == 1
    assert after.value("torchship_model_load_seconds", model="digits", version="1") > 0
    assert after.value("process_resident_memory_bytes") > 10_000_000
    assert after.value("process_cpu_seconds_total") > 0
    assert not any("pid" in lab for lab in after.labelsets("process_resident_memory_bytes"))


def test_status_summary_matches_the_metrics(server: str) -> None:
    for _ in range(3):
        assert requests.post(f"{server}/predict", json={"inputs": DIGIT}, timeout=30).ok
    status = requests.get(f"{server}/status", timeout=10).json()
    m = scrape(server)

    def inference(**labels: str) -> float:
        return sum(
            v
            for n, lab, v in m.samples
            if n == "torchship_requests_total"
            and (lab["endpoint"].startswith("/predict") or lab["endpoint"].endswith("/infer"))
            and all(lab.get(k) == want for k, want in labels.items())
        )

    assert status["metrics"]["requests"] == inference() > 0
    assert status["metrics"]["versions"]["digits:1"]["requests"] == inference(
        model="digits", version="1"
    )
    assert status["metrics"]["errors"] == inference(code="500")
    buckets = status["metrics"]["latency"]["buckets"]
    assert buckets[-1][0] == "+Inf" and buckets[-1][1] == status["metrics"]["latency"]["count"]
    assert [b[1] for b in buckets] == sorted(b[1] for b in buckets)  # cumulative
    json.dumps(status, allow_nan=False)  # strict JSON: no infinities


def test_npy_requests_are_counted_too(server: str) -> None:
    before = scrape(server)
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 8, 8), dtype=np.float32))
    r = requests.post(
        f"{server}/predict",
        data=buf.getvalue(),
        headers={"Content-Type": "application/x-npy"},
        timeout=30,
    )
    assert r.ok, r.text
    after = scrape(server)
    assert _delta(after, before, "torchship_requests_total", endpoint="/predict", code="200") == 1


def test_histogram_quantile_interpolates_like_promql() -> None:
    inf = float("inf")
    buckets = [(0.1, 10.0), (0.5, 90.0), (1.0, 100.0), (inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * 40 / 80)
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 9 / 10)
    above = [(0.1, 0.0), (inf, 5.0)]
    assert histogram_quantile(0.5, above) == 0.1  # in the +Inf bucket: its lower bound
    assert np.isnan(histogram_quantile(0.5, [(0.1, 0.0), (inf, 0.0)]))
