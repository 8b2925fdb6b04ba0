"""Token buckets: the arithmetic, the headers, per-key and per-IP buckets, 429 over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from policy_utils import BOTH_KEY, FRAMEWORKS, INFER_KEY, KEYS, Client, settings
from policy_utils import two_version_store as make_store

from torchship.errors import ConfigError, RateLimitedError
from torchship.serving import InferenceService, ServeSettings
from torchship.serving.policies import Gate, Limit, RateLimiter, RequestInfo
from torchship.serving.policies.ratelimit import MemoryBuckets
from torchship.zoo import digits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter({"inference": Limit(rate=2.0, burst=3)}, MemoryBuckets(clock=clock))
    decisions = [limiter.check("inference", "ip:a") for _ in range(4)]
    assert [d.allowed for d in decisions if d] == [True, True, True, False]
    refused = decisions[-1]
    assert refused is not None and refused.retry_after_s == pytest.approx(0.5)
    assert refused.headers() == {
        "RateLimit-Limit": "3",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "2",  # 3 tokens at 2/s
        "RateLimit-Policy": "3;w=2",
    }
    clock.now += 0.5  # one token back
    assert limiter.check("inference", "ip:a").allowed  # type: ignore[union-attr]
    assert not limiter.check("inference", "ip:a").allowed  # type: ignore[union-attr]
    clock.now += 60  # never more than the burst
    results = [limiter.check("inference", "ip:a").allowed for _ in range(5)]  # type: ignore[union-attr]
    assert results == [True, True, True, False, False]


def test_buckets_are_per_client_and_per_scope_and_unlimited_scopes_pass() -> None:
    limiter = RateLimiter({"inference": Limit(1.0, 1)}, MemoryBuckets(clock=Clock()))
    assert limiter.check("inference", "key:a").allowed  # type: ignore[union-attr]
    assert not limiter.check("inference", "key:a").allowed  # type: ignore[union-attr]
    assert limiter.check("inference", "key:b").allowed  # type: ignore[union-attr]
    assert limiter.check("admin", "key:a") is None


def test_memory_buckets_are_bounded() -> None:
    buckets = MemoryBuckets(max_keys=100, clock=Clock())
    for i in range(1000):
        buckets.take(f"ip:{i}", Limit(1.0, 1))
    assert len(buckets) == 100


def test_limit_specs() -> None:
    assert Limit.parse("5:20") == Limit(5.0, 20)
    assert Limit.parse("0.5") == Limit(0.5, 1)
    for bad in ("x", "0", "5:0", "-1:3"):
        with pytest.raises(ConfigError):
            Limit.parse(bad)
    s = ServeSettings(rate_limits={"inference": "10:30", "admin": {"rate": 0.2}})
    assert (s.rate_limits["inference"].rate, s.rate_limits["inference"].burst) == (10.0, 30)
    assert s.rate_limits["admin"].burst == 1
    with pytest.raises(ValueError):
        ServeSettings(rate_limits={"everything": "1"})
    with pytest.raises(ValueError):
        ServeSettings(rate_limits={"inference": "0"})


def test_client_ip_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    gate = Gate(trusted_proxies=["10.0.0.0/8", "127.0.0.1"])
    forged = {"x-forwarded-for": "6.6.6.6, 203.0.113.9, 10.0.0.7"}
    # behind two trusted hops: the nearest untrusted address, not the forged left part
    assert gate.client_ip(RequestInfo("GET", "/", forged, "127.0.0.1")) == "203.0.113.9"
    # a direct client's header is ignored
    assert gate.client_ip(RequestInfo("GET", "/", forged, "198.51.100.4")) == "198.51.100.4"
    assert gate.client_ip(RequestInfo("GET", "/", {}, "10.1.1.1")) == "10.1.1.1"
    assert Gate().client_ip(RequestInfo("GET", "/", forged, "127.0.0.1")) == "127.0.0.1"
    with pytest.raises(ConfigError):
        Gate(trusted_proxies=["not-an-ip"])
    with pytest.raises(ValueError):  # refused when the settings are read, before serving
        ServeSettings(trusted_proxies=["not-an-ip"])


def test_gate_refuses_with_headers_and_counts_the_refusal() -> None:
    gate = Gate(limiter=RateLimiter({"inference": Limit(1.0, 2)}))
    info = RequestInfo("POST", "/predict", {}, "192.0.2.1")
    assert gate.admit(info).headers["RateLimit-Remaining"] == "1"
    assert gate.admit(info).headers["RateLimit-Remaining"] == "0"
    with pytest.raises(RateLimitedError) as refused:
        gate.admit(info)
    headers = refused.value.response_headers()
    assert headers["Retry-After"] == "1" and headers["RateLimit-Limit"] == "2"
    # open paths are never limited
    for _ in range(5):
        assert gate.admit(RequestInfo("GET", "/health/ready", {}, "192.0.2.1")).headers == {}


# --- over HTTP -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_root(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Path:
    return make_store(tmp_path_factory.mktemp("ratelimit") / "models", quick_mlp, digits_data)


@pytest.fixture(params=FRAMEWORKS)
def limited(request: pytest.FixtureRequest, store_root: Path) -> Iterator[Client]:
    # 0.01 tokens/s: no token comes back while the test runs, so counts are exact
    s = settings(store_root, api_keys=KEYS, rate_limits={"inference": "0.01:3", "admin": "0.01:1"})
    service = InferenceService(s).start()
    yield Client(request.param, service)
    service.stop()


def test_429_with_retry_after_and_ratelimit_headers(limited: Client) -> None:
    c = limited
    key = {"X-API-Key": INFER_KEY}
    ok = [c.predict(key) for _ in range(3)]
    assert [r.status for r in ok] == [200, 200, 200]
    assert [r.headers["RateLimit-Remaining"] for r in ok] == ["2", "1", "0"]
    assert ok[0].headers["RateLimit-Limit"] == "3"
    refused = c.predict(key)
    assert refused.status == 429 and refused.json["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 99  # 1 token at 0.01/s
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert "Retry-After" in refused.json["hint"]
    # another key has its own bucket; health checks are never limited
    assert c.predict({"X-API-Key": BOTH_KEY}).status == 200
    assert all(c.call("get", "/health/ready").status == 200 for _ in range(5))
    # admin has its own scope and limit
    admin = {"X-API-Key": BOTH_KEY}
    assert c.call("get", "/manage/models", headers=admin).status == 200
    assert c.call("get", "/manage/models", headers=admin).status == 429
    metrics = c.call("get", "/metrics").json
    assert 'torchship_rate_limited_total{scope="inference"}' in metrics


def test_anonymous_clients_are_limited_per_ip(store_root: Path) -> None:
    s = settings(store_root, rate_limits={"inference": "0.01:2"})
    service = InferenceService(s).start()
    try:
        for framework in FRAMEWORKS:
            a = Client(framework, service, peer="192.0.2.10")
            b = Client(framework, service, peer="192.0.2.11")
            assert [a.predict().status for _ in range(3)] == [200, 200, 429]
            assert b.predict().status == 200
            # pages need no key, but they are not a way around the limit either
            assert b.call("get", "/static/status.js").status == 200
            assert b.call("get", "/static/apikey.js").status == 429
    finally:
        service.stop()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_forwarded_for_is_trusted_only_from_trusted_proxies_over_a_socket(
    store_root: Path, framework: str, tmp_path: Path
) -> None:
    """A loopback client is not a proxy unless configured as one: its X-Forwarded-For
    neither dodges its rate limit nor names it in the access log."""
    import json

    import requests
    from serving_utils import run_server

    body = {"inputs": [[[0.0] * 8] * 8]}
    for trusted, expect in (([], ["200", "429"]), (["127.0.0.1"], ["200", "200"])):
        args = ["--model", "digits", "--rate-limit", "inference=0.01:1", "--log-format", "json"]
        args += [a for p in trusted for a in ("--trusted-proxy", p)]
        log = tmp_path / f"{framework}-{len(trusted)}.log"
        with run_server(store_root, *args, framework=framework, log=log) as (base, _):
            codes = [
                str(
                    requests.post(
                        f"{base}/predict",
                        json=body,
                        headers={"X-Forwarded-For": f"198.51.100.{i}"},
                        timeout=30,
                    ).status_code
                )
                for i in (1, 2)
            ]
        assert codes == expect, (trusted, codes)
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        clients = {x.get("client") for x in lines if x.get("path") == "/predict"}
        assert clients == ({"198.51.100.1", "198.51.100.2"} if trusted else {"127.0.0.1"})
