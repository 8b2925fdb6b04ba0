"""Production protections as framework-free policy classes both front ends use.

* :mod:`.auth` — API keys with scopes (``inference``, ``admin``), stored hashed;
* :mod:`.ratelimit` — token buckets per key or client IP, in memory or in Redis;
* :mod:`.cache` — response cache keyed on model, version and input, LRU + TTL, or Redis;
* :mod:`.headers` — security headers and CORS;
* :mod:`.gate` — the one call an adapter makes per request (auth, limits, headers);
* :mod:`.lifecycle` — SIGTERM: not-ready first, keep serving a while, then drain;
* :mod:`.asgi` — the gate as pure ASGI middleware (FastAPI); Flask calls the gate from
  its request hooks.

Redis is imported only when a ``*_backend="redis"`` setting chooses it.
"""

from torchship.serving.policies.auth import ApiKey, KeyStore, new_key
from torchship.serving.policies.cache import ResponseCache
from torchship.serving.policies.gate import Admission, Gate, RequestInfo
from torchship.serving.policies.ratelimit import Limit, RateLimiter

__all__ = [
    "Admission",
    "ApiKey",
    "Gate",
    "KeyStore",
    "Limit",
    "RateLimiter",
    "RequestInfo",
    "ResponseCache",
    "new_key",
]
