"""Probes and shutdown: startup/readiness/liveness, not-ready while draining, SIGTERM
finishes in-flight requests and exits 0."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import requests
import torch
from policy_utils import FRAMEWORKS, ONE, Client, settings
from policy_utils import two_version_store as make_store
from serving_utils import run_server

from torchship.serving import InferenceService, ServeSettings
from torchship.zoo import digits


@pytest.fixture(scope="module")
def store_root(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Path:
    return make_store(tmp_path_factory.mktemp("lifecycle") / "models", quick_mlp, digits_data)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_probes_through_warm_up_and_drain(store_root: Path, framework: str) -> None:
    service = InferenceService(settings(store_root))
    client = Client(framework, service) if framework == "fastapi" else None  # no lifespan
    try:
        if client is not None:  # FastAPI without its lifespan: nothing loaded yet
            assert client.call("get", "/health/live").status == 200
            starting = client.call("get", "/health/startup")
            assert starting.status == 503 and starting.json["started"] is False
            assert client.call("get", "/health/ready").status == 503
        service.start()
        client = client or Client(framework, service)
        assert client.call("get", "/health/startup").status == 200
        ready = client.call("get", "/health/ready")
        assert ready.status == 200 and ready.json["draining"] is False
        service.begin_drain()  # what SIGTERM does first when drain_delay_s > 0
        draining = client.call("get", "/health/ready")
        assert draining.status == 503 and draining.json["draining"] is True
        assert draining.headers["Retry-After"] == "1"
        assert client.call("get", "/health/startup").status == 200  # started stays started
        assert client.call("get", "/health/live").status == 200
        served = client.predict()
        assert served.status == 200, "draining still serves until the delay is over"
        if framework == "fastapi":  # keep-alive clients are told to reconnect elsewhere
            assert served.headers["Connection"] == "close"
    finally:
        service.stop()
    assert client.predict().status == 503  # stopped: refuses


SLOW_HANDLER = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path

    from torchship.serving import ClassifierHandler

    class Slow(ClassifierHandler):
        \"\"\"Slow while the test's 'slow' file exists: a request that is in flight.\"\"\"

        def inference(self, batch):
            flags = Path(os.environ["TORCHSHIP_TEST_FLAGS"])
            if (flags / "slow").exists():
                (flags / "started").touch()
                time.sleep(2.0)  # the model being slow, not a synchronisation
            return super().inference(batch)
    """
)


@contextlib.contextmanager
def slow_server(
    store_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    framework: str,
    *args: str,
    max_batch_size: int = 1,
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """A server whose model is slow while ``flags/slow`` exists: (base, process, flags)."""
    handler = tmp_path / "slow_handler.py"
    handler.write_text(SLOW_HANDLER)
    flags = tmp_path / "flags"
    flags.mkdir()
    monkeypatch.setenv("TORCHSHIP_TEST_FLAGS", str(flags))
    monkeypatch.setenv("TORCHSHIP_WARMUP", "false")
    with run_server(
        store_root,
        "--model",
        "digits:1",
        "--runtime",
        "eager",
        "--max-batch-size",
        str(max_batch_size),
        "--handler",
        f"digits={handler}:Slow",
        *args,
        framework=framework,
    ) as (base, proc):
        yield base, proc, flags


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_sigterm_not_ready_first_then_drains_in_flight_and_exits_0(
    store_root: Path, framework: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with slow_server(store_root, tmp_path, monkeypatch, framework, "--drain-delay-s", "1.5") as (
        base,
        proc,
        flags,
    ):
        (flags / "slow").touch()
        in_flight: list[requests.Response] = []
        worker = threading.Thread(
            target=lambda: in_flight.append(requests.post(f"{base}/predict", json=ONE, timeout=30))
        )
        worker.start()
        deadline = time.monotonic() + 20
        while not (flags / "started").exists():
            assert time.monotonic() < deadline, "the slow request never started"
            time.sleep(0.01)
        (flags / "slow").unlink()
        proc.send_signal(signal.SIGTERM)
        # not ready at once, while still serving new requests during the delay
        deadline = time.monotonic() + 1.2
        ready = requests.get(f"{base}/health/ready", timeout=5)
        while ready.status_code == 200 and time.monotonic() < deadline:
            ready = requests.get(f"{base}/health/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["draining"] is True
        during = requests.post(f"{base}/predict", json=ONE, timeout=10)
        assert during.status_code == 200
        worker.join(timeout=30)
        assert in_flight and in_flight[0].status_code == 200, "the in-flight request finished"
        assert proc.wait(timeout=30) == 0, "SIGTERM drains and exits 0"


def test_safe_defaults() -> None:
    s = ServeSettings()
    assert s.host == "127.0.0.1", "bind loopback unless told otherwise"
    assert s.security_headers and not s.cors_origins and not s.cache and not s.trusted_proxies
    assert not s.api_keys and s.api_keys_file is None  # auth is on once keys are configured
    assert s.open_paths == ["/health/", "/v2/health/", "/ping", "/metrics"]
    assert s.max_body_bytes == 10 * 1024 * 1024 and s.timeout_s == 30.0


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_full_queue_is_503_and_a_slow_answer_504_over_a_real_socket(
    store_root: Path, framework: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the model stuck, the bounded queue refuses at once (503, Retry-After) and a
    request past its limit gets 504; once the model recovers, the server answers again."""
    monkeypatch.setenv("TORCHSHIP_TIMEOUT_S", "0.5")
    monkeypatch.setenv("TORCHSHIP_MAX_QUEUE_SIZE", "1")
    body = ONE
    with slow_server(store_root, tmp_path, monkeypatch, framework) as (base, _proc, flags):
        (flags / "slow").touch()
        answers: dict[str, requests.Response] = {}

        def post(key: str) -> None:
            answers[key] = requests.post(f"{base}/predict", json=body, timeout=30)

        first = threading.Thread(target=post, args=("stuck",))
        first.start()
        deadline = time.monotonic() + 10
        while not (flags / "started").exists():  # the model is now busy for 2 s
            assert time.monotonic() < deadline, "the first request never reached the model"
            time.sleep(0.01)
        others = [threading.Thread(target=post, args=(f"r{i}",)) for i in range(3)]
        for t in others:
            t.start()
        for t in [first, *others]:
            t.join(30)
        assert answers["stuck"].status_code == 504
        assert answers["stuck"].json()["code"] == "timeout"
        statuses = sorted(answers[f"r{i}"].status_code for i in range(3))
        assert 503 in statuses and set(statuses) <= {503, 504}, statuses
        refused = next(answers[f"r{i}"] for i in range(3) if answers[f"r{i}"].status_code == 503)
        assert refused.headers["Retry-After"].isdigit() and refused.json()["error"]
        (flags / "slow").unlink()
        deadline = time.monotonic() + 15
        while (r := requests.post(f"{base}/predict", json=body, timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)


@contextlib.contextmanager
def stuck_flask(
    store_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    max_queue_size: int,
    posts: int,
) -> Iterator[tuple[str, list[Future[requests.Response]]]]:
    """A Flask server (8 HTTP threads) whose model is stuck while ``posts`` predictions
    are sent; yields (base, their futures) a second later, then unsticks the model."""
    monkeypatch.setenv("TORCHSHIP_MAX_QUEUE_SIZE", str(max_queue_size))
    with slow_server(store_root, tmp_path, monkeypatch, "flask", max_batch_size=8) as (
        base,
        _proc,
        flags,
    ):
        (flags / "slow").touch()
        with ThreadPoolExecutor(posts) as pool:
            futures = [
                pool.submit(requests.post, f"{base}/predict", json=ONE, timeout=60)
                for _ in range(posts)
            ]
            time.sleep(1.0)  # every thread busy
            try:
                yield base, futures
            finally:
                (flags / "slow").unlink()
                wait(futures)


def assert_answers_at_once(url: str) -> None:
    began = time.monotonic()
    assert requests.get(url, timeout=10).status_code == 200, url
    assert time.monotonic() - began < 1.0, url


@pytest.mark.slow
def test_flask_refuses_past_the_queue_limit_instead_of_queueing_in_gunicorn(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its 8 HTTP threads all waiting on a stuck model, a Flask worker answers 503 to
    requests past ``max_queue_size`` waiting for a thread, and still answers probes."""
    with stuck_flask(store_root, tmp_path, monkeypatch, max_queue_size=8, posts=32) as (
        base,
        futures,
    ):
        assert_answers_at_once(f"{base}/health/live")  # the wait queue is full too
    answers = [f.result() for f in futures]
    refused = [r for r in answers if r.status_code == 503]
    assert {r.status_code for r in answers} <= {200, 503}
    assert any("waiting in this worker" in r.json()["error"] for r in refused), [
        r.json() for r in refused
    ]
    assert all(r.json()["code"] == "queue_full" for r in refused)
    assert all(r.headers["Retry-After"].isdigit() for r in refused)
    assert sum(r.status_code == 200 for r in answers) >= 9  # the stuck batch and more


@pytest.mark.slow
def test_flask_answers_probes_while_every_thread_waits_on_the_model(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the count limit nothing is refused, and requests wait for a thread; a
    liveness probe must not wait with them (a restart loop under load otherwise)."""
    # 8 threads busy, 4 requests waiting, far under the limit
    with stuck_flask(store_root, tmp_path, monkeypatch, max_queue_size=64, posts=12) as (
        base,
        futures,
    ):
        for path in ("/health/live", "/metrics", "/ping"):
            assert_answers_at_once(f"{base}{path}")
    assert {f.result().status_code for f in futures} == {200}


@pytest.mark.slow
def test_flask_refuses_a_request_that_waited_its_whole_time_limit_for_a_thread(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the count limit, a request that waited ``timeout_s`` for a thread is refused
    when it gets one (503) instead of starting its model time only then."""
    monkeypatch.setenv("TORCHSHIP_TIMEOUT_S", "1")
    with slow_server(store_root, tmp_path, monkeypatch, "flask") as (base, _proc, flags):
        (flags / "slow").touch()
        with ThreadPoolExecutor(24) as pool:
            answers = list(
                pool.map(
                    lambda _: requests.post(f"{base}/predict", json=ONE, timeout=60), range(24)
                )
            )
        (flags / "slow").unlink()
        codes = {r.status_code for r in answers}
        assert codes <= {503, 504} and 503 in codes, codes
        assert any(
            "for longer than 1 s" in r.json()["error"] for r in answers if r.status_code == 503
        )
