"""Response cache: LRU/TTL/size bounds, keys, bypass, version safety, invalidation, metrics."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_utils import FRAMEWORKS, ONE, Client, settings
from policy_utils import two_version_store as make_store
from serving_utils import SAMPLE

from torchship.serving import ImagePayload, InferenceService, TensorPayload
from torchship.serving.policies.cache import MemoryStore, ResponseCache, cache_control
from torchship.zoo import digits


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_lru_by_entries_and_bytes_and_ttl() -> None:
    clock = Clock()
    store = MemoryStore(max_entries=2, max_bytes=10, clock=clock)
    store.put("a", b"1111", 60)
    store.put("b", b"2222", 60)
    assert store.get("a") == b"1111"  # a is now the most recently used
    store.put("c", b"33", 60)  # 3 entries > 2: b (least recently used) goes
    assert (store.get("a"), store.get("b"), store.get("c")) == (b"1111", None, b"33")
    store.put("d", b"444444", 60)  # 4 + 2 + 6 bytes > 10: a goes
    assert store.get("a") is None and store.bytes <= 10 and len(store) == 2
    store.put("huge", b"x" * 11, 60)  # bigger than the whole cache: never stored
    assert store.get("huge") is None and store.get("d") == b"444444"
    clock.now += 61  # expired
    assert store.get("d") is None and store.get("c") is None and store.bytes == 0


def test_drop_prefix() -> None:
    store = MemoryStore()
    for key in ("digits/1/a", "digits/1/b", "digits/10/c", "other/1/d"):
        store.put(key, b"v", 60)
    assert store.drop_prefix("digits/1/") == 2
    assert store.get("digits/10/c") == b"v" and store.get("other/1/d") == b"v"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, (True, True)),
        ("no-cache", (False, True)),
        ("max-age=0", (False, True)),
        ("No-Store", (False, False)),
        ("no-cache, no-store", (False, False)),
        ("max-age=60", (True, True)),
    ],
)
def test_cache_control(value: str | None, expected: tuple[bool, bool]) -> None:
    assert cache_control({"Cache-Control": value} if value else {}) == expected


@pytest.fixture(scope="module")
def store_root(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Path:
    return make_store(tmp_path_factory.mktemp("cache") / "models", quick_mlp, digits_data)


def test_keys_follow_the_decoded_input_and_stay_small(store_root: Path) -> None:
    service = InferenceService(settings(store_root, cache=True)).start()
    try:
        loaded = service.get("digits")
        x = np.zeros((1, 1, 8, 8))
        key = ResponseCache.key(loaded, "fp", TensorPayload(x), 5)
        assert key == ResponseCache.key(loaded, "fp", TensorPayload(x.copy(order="F")), 5)
        assert key != ResponseCache.key(loaded, "fp", TensorPayload(x), 3)  # top_k matters
        assert key != ResponseCache.key(loaded, "fp2", TensorPayload(x), 5)  # what is loaded
        assert key != ResponseCache.key(loaded, "fp", TensorPayload(x.astype(np.float32)), 5)
        assert key is not None and key.startswith("digits/1/")
        big = ResponseCache.key(loaded, "fp", ImagePayload(b"\x00" * 5_000_000), 5)
        assert big is not None and len(big) == len(key)
        assert ResponseCache.key(loaded, "fp", TensorPayload(np.array([None])), 5) is None
    finally:
        service.stop()


@pytest.fixture(scope="module", params=FRAMEWORKS)
def cached(request: pytest.FixtureRequest, store_root: Path) -> Iterator[Client]:
    service = InferenceService(settings(store_root, cache=True)).start()
    yield Client(request.param, service)
    service.stop()


def _x(seed: int) -> dict[str, list[list[list[float]]]]:
    return {"inputs": np.random.default_rng(seed).random((1, 8, 8)).round(3).tolist()}


def test_hit_after_miss_with_the_same_answer(cached: Client) -> None:
    body = _x(1)
    first, second = cached.predict(body=body), cached.predict(body=body)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert first.json["predictions"] == second.json["predictions"]
    assert second.headers["X-Model-Version"] == "1"
    assert cached.predict(body=_x(2)).headers["X-Cache"] == "MISS"
    # the same array as .npy hits the entry the JSON request made: keys hash the input,
    # not the framing
    buf = io.BytesIO()
    np.save(buf, np.asarray(body["inputs"], dtype=np.float64))
    r = cached.call(
        "post", "/predict", content=buf.getvalue(), headers={"Content-Type": "application/x-npy"}
    )
    assert r.headers["X-Cache"] == "HIT" and r.json["predictions"] == first.json["predictions"]
    # another top_k is another answer
    assert cached.predict(body={**body, "top_k": 2}).headers["X-Cache"] == "MISS"


def test_bypass_per_request(cached: Client) -> None:
    body = _x(3)
    assert cached.predict(body=body).headers["X-Cache"] == "MISS"
    r = cached.predict({"Cache-Control": "no-cache"}, body)
    assert r.status == 200 and r.headers["X-Cache"] == "BYPASS"
    assert cached.predict(body=body).headers["X-Cache"] == "HIT"
    fresh = _x(4)
    assert cached.predict({"Cache-Control": "no-store"}, fresh).headers["X-Cache"] == "BYPASS"
    assert cached.predict(body=fresh).headers["X-Cache"] == "MISS"  # no-store stored nothing


def test_errors_are_never_cached(cached: Client) -> None:
    bad = {"inputs": [[1.0, 2.0]]}
    for _ in range(2):
        r = cached.predict(body=bad)
        assert r.status == 400 and "X-Cache" not in r.headers
    assert cached.predict(body=ONE).status == 200


def test_never_an_answer_of_another_version(cached: Client) -> None:
    body = _x(5)
    v1 = cached.predict(body=body)
    assert v1.headers["X-Cache"] == "MISS" and cached.predict(body=body).headers["X-Cache"] == "HIT"
    assert cached.call("post", "/manage/models/digits/versions/2/load").status == 200
    pinned = cached.call("post", "/predict?version=2", json=body)
    assert pinned.headers["X-Model-Version"] == "2" and pinned.headers["X-Cache"] == "MISS"
    assert pinned.json["predictions"] != v1.json["predictions"]  # halved weights: other odds
    # routing picks the version first: after a switch to v2 the v1 entry is not used
    r = cached.call("put", "/manage/models/digits/policy", json={"kind": "fixed", "version": "2"})
    assert r.status == 200
    routed = cached.predict(body=body)
    assert routed.headers["X-Model-Version"] == "2" and routed.headers["X-Cache"] == "HIT"
    assert routed.json["predictions"] == pinned.json["predictions"]
    # unloading a version drops its entries; v1's stay
    cached.call("put", "/manage/models/digits/policy", json={"kind": "fixed", "version": "1"})
    assert cached.call("post", "/manage/models/digits/versions/2/unload").status == 200
    assert cached.predict(body=body).headers["X-Cache"] == "HIT"
    assert cached.call("post", "/manage/models/digits/versions/2/load").status == 200
    again = cached.call("post", "/predict?version=2", json=body)
    assert again.headers["X-Cache"] == "MISS"
    assert cached.call("post", "/manage/models/digits/versions/2/unload").status == 200


def test_hit_and_miss_metrics_and_images(cached: Client) -> None:
    data = SAMPLE.read_bytes()
    raw = cached.call("post", "/predict", content=data, headers={"Content-Type": "image/jpeg"})
    assert raw.status == 200 and raw.headers["X-Cache"] == "MISS"
    again = cached.call("post", "/predict", content=data, headers={"Content-Type": "image/jpeg"})
    assert again.headers["X-Cache"] == "HIT"
    metrics = cached.call("get", "/metrics").json
    assert 'torchship_cache_hits_total{model="digits",version="1"}' in metrics
    assert 'torchship_cache_misses_total{model="digits",version="1"}' in metrics


def test_cache_off_by_default(store_root: Path) -> None:
    service = InferenceService(settings(store_root)).start()
    try:
        assert service.cache is None
        r = Client("fastapi", service).predict()
        assert r.status == 200 and "X-Cache" not in r.headers
    finally:
        service.stop()
