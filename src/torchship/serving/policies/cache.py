"""Response cache: the same input to the same model version gets the stored answer.

The key is a SHA-256 over the resolved model name and version, a fingerprint of what
was loaded (the checksums of its files, the runtime, the handler class), the request
options that change the answer (``top_k``) and the *decoded* input (image bytes, or the
array's dtype, shape and data), so framing (multipart vs raw body, JSON spacing) does
not matter and a huge input costs one hash, never a huge key. The version is resolved
first (pinned, alias, or chosen by the A/B / canary policy), then the cache is
consulted: a cache can never answer for a version other than the one routing chose.
A hit runs no model, so it is neither mirrored to a shadow version nor counted by a
canary's error/latency guard: those judge versions on the requests they computed.

Entries expire after ``ttl_s``; the memory store keeps at most ``max_entries`` entries
and ``max_bytes`` bytes, least recently used out first. Loading over or unloading a
version drops its entries. With :class:`RedisStore` every worker and replica shares the
cache (size it with Redis's ``maxmemory`` and ``allkeys-lru``); a Redis failure is a miss.

Per request, ``Cache-Control: no-cache`` skips the lookup (the fresh answer is stored)
and ``no-store`` skips the cache entirely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from torchship.serving.metrics import record_cache
from torchship.serving.payloads import ImagePayload, Payload, TensorPayload

if TYPE_CHECKING:
    from torchship.serving.service import LoadedModel
    from torchship.serving.settings import ServeSettings

log = logging.getLogger("torchship.serving")

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"


class CacheStore(Protocol):
    #: True when calls block on the network (async callers move them off the loop).
    remote: bool

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes, ttl_s: float) -> None: ...

    def drop_prefix(self, prefix: str) -> int: ...


class MemoryStore:
    """LRU + TTL in this process, bounded by entry count and total bytes."""

    remote = False

    def __init__(
        self,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self.bytes = 0
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                self._remove(key)
                return None
            self._data.move_to_end(key)
            return entry[1]

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            if key in self._data:
                self._remove(key)
            self._data[key] = (self._clock() + ttl_s, value)
            self.bytes += len(value)
            while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
                self._remove(next(iter(self._data)))

    def drop_prefix(self, prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._data if k.startswith(prefix)]
            for k in doomed:
                self._remove(k)
        return len(doomed)

    def _remove(self, key: str) -> None:
        _, value = self._data.pop(key)
        self.bytes -= len(value)

    def __len__(self) -> int:
        return len(self._data)


class RedisStore:
    """Entries in Redis (``SET ... PX ttl``), shared by every worker and replica."""

    remote = True

    def __init__(self, client: Any, prefix: str = "torchship:cache:") -> None:
        self.client = client
        self.prefix = prefix
        self._warned = 0.0

    @classmethod
    def from_url(cls, url: str, prefix: str = "torchship:cache:") -> RedisStore:
        from torchship.serving.policies._redis import connect

        return cls(connect(url), prefix)

    def get(self, key: str) -> bytes | None:
        try:
            value = self.client.get(self.prefix + key)
        except Exception as exc:
            self._warn(exc)
            return None
        return bytes(value) if value is not None else None

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            self.client.set(self.prefix + key, value, px=max(1, int(ttl_s * 1000)))
        except Exception as exc:
            self._warn(exc)

    def drop_prefix(self, prefix: str) -> int:
        pattern = _glob_escape(self.prefix + prefix) + "*"
        dropped = 0
        try:
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    dropped += self.client.unlink(*batch)
                    batch = []
            if batch:
                dropped += self.client.unlink(*batch)
        except Exception as exc:
            self._warn(exc)
        return int(dropped)

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned > 10:
            self._warned = now
            log.warning("response cache skipped: Redis failed (%s)", exc)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def model_fingerprint(loaded: LoadedModel) -> str:
    """What besides name and version decides an answer: file checksums, runtime, handler."""
    manifest = loaded.predictor.manifest
    handler = type(loaded.handler)
    parts = {
        "files": {name: f.sha256 for name, f in sorted(manifest.files.items())},
        "runtime": loaded.predictor.runtime,
        "handler": f"{handler.__module__}.{handler.__qualname__}",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cache_control(headers: Mapping[str, str] | None) -> tuple[bool, bool]:
    """(look up, store) as the request's ``Cache-Control`` allows."""
    value = _header(headers, "cache-control")
    if not value:
        return True, True
    directives: dict[str, str] = {}
    for part in value.split(","):
        name, _, arg = part.strip().partition("=")
        directives[name.lower()] = arg.strip().strip('"')
    if "no-store" in directives:
        return False, False
    if "no-cache" in directives or directives.get("max-age") == "0":
        return False, True
    return True, True


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


class ResponseCache:
    """Keys, lookups with hit/miss metrics, and invalidation over one :class:`CacheStore`."""

    def __init__(self, store: CacheStore, *, ttl_s: float = 300.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> ResponseCache | None:
        """The cache ``settings`` ask for; None when caching is off."""
        if not settings.cache:
            return None
        store: CacheStore
        if settings.cache_backend == "redis":
            store = RedisStore.from_url(settings.redis_url)
        else:
            store = MemoryStore(settings.cache_max_entries, settings.cache_max_bytes)
        return cls(store, ttl_s=settings.cache_ttl_s)

    @property
    def remote(self) -> bool:
        return self.store.remote

    @staticmethod
    def key(loaded: LoadedModel, fingerprint: str, payload: Payload, top_k: int) -> str | None:
        """The entry's key, or None for inputs that cannot be hashed faithfully."""
        h = hashlib.sha256()
        h.update(f"{fingerprint}|k={top_k}|".encode())
        if isinstance(payload, ImagePayload):
            h.update(b"image|")
            h.update(payload.data)
        elif isinstance(payload, TensorPayload):
            import numpy as np

            array = payload.array
            if array.dtype.hasobject:
                return None
            array = np.ascontiguousarray(array)
            h.update(f"tensor|{array.dtype.str}|{array.shape}|".encode())
            h.update(array.data)  # contiguous: hashed in place, no copy
        else:
            return None
        return f"{loaded.name}/{loaded.version}/{h.hexdigest()}"

    def get(self, key: str, model: str, version: str) -> Any | None:
        raw = self.store.get(key)
        value = None
        if raw is not None:
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
        hit = value is not None
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        record_cache(model, version, hit)
        return value

    def put(self, key: str, value: Any) -> None:
        self.store.put(key, json.dumps(value, separators=(",", ":")).encode(), self.ttl_s)

    def invalidate(self, model: str, version: str | None = None) -> int:
        """Drop the entries of ``model`` (one ``version``, or all); returns how many."""
        prefix = f"{model}/{version}/" if version is not None else f"{model}/"
        return self.store.drop_prefix(prefix)
