"""The response cache in a real redis-server: shared by replicas, TTL, invalidation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from policy_utils import Client, settings
from policy_utils import two_version_store as make_store
from redis_utils import redis_server
from serving_utils import free_port

from torchship.serving import InferenceService
from torchship.serving.policies.cache import RedisStore
from torchship.zoo import digits


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis-cache")) as url:
        yield url


def test_redis_store(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, prefix="c1:")
    store.put("digits/1/aa", b"one", ttl_s=30)
    store.put("digits/1/bb", b"two", ttl_s=30)
    store.put("digits/12/cc", b"three", ttl_s=30)
    assert store.get("digits/1/aa") == b"one" and store.get("nope") is None
    assert 0 < store.client.pttl("c1:digits/1/aa") <= 30_000
    assert store.drop_prefix("digits/1/") == 2
    assert store.get("digits/1/bb") is None and store.get("digits/12/cc") == b"three"


def test_an_unreachable_redis_is_a_miss() -> None:
    pytest.importorskip("redis")
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    store.put("k", b"v", 10)
    assert store.get("k") is None and store.drop_prefix("k") == 0


@pytest.fixture(scope="module")
def store_root(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Path:
    return make_store(tmp_path_factory.mktemp("cache-redis") / "models", quick_mlp, digits_data)


def test_replicas_share_answers(store_root: Path, redis_url: str) -> None:
    """Two services (two replicas' worth of loaded models) over one Redis."""
    s = settings(store_root, cache=True, cache_backend="redis", redis_url=redis_url)
    a, b = InferenceService(s).start(), InferenceService(s).start()
    try:
        body = {"inputs": [[[0.25] * 8] * 8]}
        first = Client("fastapi", a).predict(body=body)
        assert first.headers["X-Cache"] == "MISS"
        second = Client("flask", b).predict(body=body)
        assert second.headers["X-Cache"] == "HIT"
        assert second.json["predictions"] == first.json["predictions"]
        # loading v2 and unloading it on one replica drops only v2's entries
        assert a.cache is not None
        a.load("digits:2")
        pinned = Client("fastapi", a).call("post", "/predict?version=2", json=body)
        assert pinned.headers["X-Cache"] == "MISS"
        assert len(list(a.cache.store.client.scan_iter(match="torchship:cache:digits/2/*"))) == 1  # type: ignore[attr-defined]
        a.unload("digits", "2")
        assert not list(a.cache.store.client.scan_iter(match="torchship:cache:digits/2/*"))  # type: ignore[attr-defined]
        assert Client("fastapi", a).predict(body=body).headers["X-Cache"] == "HIT"
    finally:
        a.stop()
        b.stop()
