"""The Redis client, imported only when a Redis backend is chosen (``torchship[redis]``)."""

from __future__ import annotations

from typing import Any

from torchship.errors import ConfigError, MissingDependencyError

# Short timeouts: a slow Redis must cost a request milliseconds, not seconds (the
# limiter then fails open and the cache misses).
SOCKET_TIMEOUT_S = 0.25


def connect(url: str) -> Any:
    """A client for ``url`` (``redis://host:port/db``, ``rediss://`` for TLS, ``unix://``)."""
    try:
        import redis
    except ImportError as exc:
        raise MissingDependencyError("redis", "redis", "A Redis backend") from exc
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=30,
        )
    except ValueError as exc:
        raise ConfigError(f"Invalid redis_url {url!r}: {exc}") from exc
