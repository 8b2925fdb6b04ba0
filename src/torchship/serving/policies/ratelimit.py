"""Token-bucket rate limits per client, in memory or shared through Redis.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; each
request takes one. The bucket is per scope (``inference``, ``admin``) and per client: the
API key's name when the request has one, else the client's IP address.

The answer carries the IETF draft headers (``RateLimit-Limit``, ``-Remaining``, ``-Reset``,
``RateLimit-Policy``) and, when refused, ``Retry-After``: seconds until a token is back.

Backends: :class:`MemoryBuckets` (one process; each worker process then has its own
buckets, so N workers allow N times the rate) and :class:`RedisBuckets` (every worker
and replica shares one bucket per client; one atomic Lua script per request, clocked by
Redis's own ``TIME`` so replicas with skewed clocks agree). If Redis cannot be reached,
requests are let through and the failure is logged: a limiter outage must not become a
service outage.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torchship.errors import ConfigError

log = logging.getLogger("torchship.serving")


@dataclass(frozen=True)
class Limit:
    """``rate`` tokens per second, at most ``burst`` at once."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)) or self.burst < 1:
            raise ConfigError(
                f"A rate limit needs rate > 0 and burst >= 1 (got {self.rate}, {self.burst})."
            )

    @classmethod
    def parse(cls, text: str) -> Limit:
        """``RATE[:BURST]`` in requests per second, e.g. ``5`` or ``5:20`` (burst defaults
        to the rate, rounded up)."""
        rate_s, _, burst_s = text.partition(":")
        try:
            rate = float(rate_s)
            burst = int(burst_s) if burst_s else max(1, math.ceil(rate))
        except ValueError:
            raise ConfigError(
                f"Rate limit {text!r} must look like RATE[:BURST], e.g. 5:20."
            ) from None
        return cls(rate, burst)


@dataclass(frozen=True)
class Decision:
    """One bucket's answer; :meth:`headers` renders it for the response."""

    allowed: bool
    limit: Limit
    tokens: float  # left after this request

    @property
    def retry_after_s(self) -> float:
        """Seconds until one token is back (0 when allowed)."""
        return 0.0 if self.allowed else max(0.0, (1.0 - self.tokens) / self.limit.rate)

    def headers(self) -> dict[str, str]:
        lim = self.limit
        full_in = (lim.burst - self.tokens) / lim.rate
        return {
            "RateLimit-Limit": str(lim.burst),
            "RateLimit-Remaining": str(max(0, math.floor(self.tokens))),
            "RateLimit-Reset": str(max(0, math.ceil(full_in))),
            "RateLimit-Policy": f"{lim.burst};w={max(1, math.ceil(lim.burst / lim.rate))}",
        }


class Buckets(Protocol):
    #: True when ``take`` blocks on the network (async callers move it off the loop).
    remote: bool

    def take(self, key: str, limit: Limit) -> tuple[bool, float]:
        """Take one token from ``key``'s bucket: (allowed, tokens left)."""
        ...


def refill(tokens: float, elapsed: float, limit: Limit) -> float:
    return min(float(limit.burst), tokens + max(0.0, elapsed) * limit.rate)


class MemoryBuckets:
    """Buckets in this process, the least recently used dropped past ``max_keys``."""

    remote = False

    def __init__(
        self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, limit: Limit) -> tuple[bool, float]:
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(limit.burst), now))
            tokens = refill(tokens, now - last, limit)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:  # the oldest has refilled the longest
                self._buckets.popitem(last=False)
        return allowed, tokens

    def __len__(self) -> int:
        return len(self._buckets)


# KEYS[1] bucket; ARGV rate, burst. Floats travel as strings (Lua numbers returned to
# Redis are truncated to integers).
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, string.format('%.6f', tokens)}
"""


class RedisBuckets:
    """Buckets in Redis, shared by every process that uses the same server and prefix."""

    remote = True

    def __init__(self, client: Any, prefix: str = "torchship:rl:") -> None:
        self.client = client
        self.prefix = prefix
        self._script = client.register_script(TOKEN_BUCKET_LUA)
        self._warned = 0.0

    @classmethod
    def from_url(cls, url: str, prefix: str = "torchship:rl:") -> RedisBuckets:
        from torchship.serving.policies._redis import connect

        return cls(connect(url), prefix)

    def take(self, key: str, limit: Limit) -> tuple[bool, float]:
        try:
            allowed, tokens = self._script(keys=[self.prefix + key], args=[limit.rate, limit.burst])
        except Exception as exc:  # fail open: see the module docstring
            now = time.monotonic()
            if now - self._warned > 10:
                self._warned = now
                log.warning("rate limiting skipped: Redis failed (%s)", exc)
            return True, float(limit.burst)
        return bool(allowed), float(tokens)


class RateLimiter:
    """Per-scope limits over one bucket store; scopes without a limit are not limited."""

    def __init__(self, limits: dict[str, Limit], buckets: Buckets | None = None) -> None:
        self.limits = dict(limits)
        self.buckets: Buckets = buckets if buckets is not None else MemoryBuckets()

    @property
    def remote(self) -> bool:
        return self.buckets.remote

    def check(self, scope: str, client: str) -> Decision | None:
        """Take a token for ``client`` in ``scope``; None when ``scope`` is unlimited."""
        limit = self.limits.get(scope)
        if limit is None:
            return None
        allowed, tokens = self.buckets.take(f"{scope}:{client}", limit)
        return Decision(allowed, limit, tokens)
