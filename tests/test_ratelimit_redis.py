"""Rate limits shared through a real redis-server: replicas draw from one bucket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from policy_utils import INFER_KEY, KEYS, Client, settings
from policy_utils import two_version_store as make_store
from redis_utils import redis_server
from serving_utils import free_port

from torchship.serving import InferenceService
from torchship.serving.policies import Limit
from torchship.serving.policies.ratelimit import RedisBuckets
from torchship.zoo import digits


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def test_redis_bucket_burst_refill_and_expiry(redis_url: str) -> None:
    buckets = RedisBuckets.from_url(redis_url, prefix="t1:")
    limit = Limit(rate=2.0, burst=3)
    taken = [buckets.take("ip:a", limit) for _ in range(4)]
    assert [allowed for allowed, _ in taken] == [True, True, True, False]
    assert taken[2][1] < 1.0
    # the bucket expires once it would be full again, so idle clients cost no memory
    ttl_ms = buckets.client.pttl("t1:ip:a")
    assert 0 < ttl_ms <= 3 / 2.0 * 1000 + 1000
    # refill is computed from Redis's clock: move the last update 1 s back -> 2 tokens
    now_s, now_us = buckets.client.time()
    buckets.client.hset("t1:ip:a", mapping={"tokens": "0", "ts": f"{now_s - 1 + now_us / 1e6}"})
    assert [buckets.take("ip:a", limit)[0] for _ in range(3)] == [True, True, False]


def test_two_clients_share_one_bucket(redis_url: str) -> None:
    a = RedisBuckets.from_url(redis_url, prefix="t2:")
    b = RedisBuckets.from_url(redis_url, prefix="t2:")
    limit = Limit(rate=0.01, burst=4)
    results = [(a if i % 2 else b).take("key:ci", limit)[0] for i in range(6)]
    assert results == [True, True, True, True, False, False]


def test_an_unreachable_redis_lets_requests_through() -> None:
    pytest.importorskip("redis")
    buckets = RedisBuckets.from_url(f"redis://127.0.0.1:{free_port()}/0")
    assert buckets.take("ip:a", Limit(0.01, 1)) == (True, 1.0)
    assert buckets.take("ip:a", Limit(0.01, 1))[0]


@pytest.fixture(scope="module")
def store_root(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Path:
    return make_store(tmp_path_factory.mktemp("rl-redis") / "models", quick_mlp, digits_data)


def test_replicas_share_the_limit_over_http(store_root: Path, redis_url: str) -> None:
    """Two front ends, each with its own gate and Redis connection: one shared budget."""
    s = settings(
        store_root,
        api_keys=KEYS,
        rate_limits={"inference": "0.01:4"},
        rate_limit_backend="redis",
        redis_url=redis_url,
    )
    service = InferenceService(s).start()
    try:
        replicas = [Client("fastapi", service), Client("flask", service)]
        key = {"X-API-Key": INFER_KEY}
        statuses = [replicas[i % 2].predict(key).status for i in range(6)]
        assert statuses == [200, 200, 200, 200, 429, 429]
        refused = replicas[0].predict(key)
        assert refused.headers["RateLimit-Limit"] == "4" and int(refused.headers["Retry-After"]) > 1
    finally:
        service.stop()
