"""The gate every request passes, whatever the front end: auth, rate limits, headers.

An adapter builds a :class:`RequestInfo` (method, path, lower-case headers, the socket
peer's address), then:

1. :meth:`Gate.preflight` — a CORS preflight is answered here, before auth (browsers
   send no credentials on it);
2. :meth:`Gate.admit` — the route's scope (``admin`` for the management API, else
   ``inference``), the API key (401/403), the client's token bucket (429); returns the
   :class:`Admission` whose ``RateLimit-*`` headers go on the response;
3. :meth:`Gate.response_headers` — security headers, CORS, ``X-Cache``, and
   ``Connection: close`` while draining so keep-alive clients move to other replicas.

Open paths (health, metrics by default) need no key and are not rate limited; nor do
the HTML pages' shells and assets (status page, API docs: no data in them). The
management API is never open while auth is on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torchship.errors import ConfigError, RateLimitedError
from torchship.serving.http import is_management
from torchship.serving.metrics import record_rate_limited
from torchship.serving.policies.auth import KeyStore
from torchship.serving.policies.headers import CorsPolicy, security_headers
from torchship.serving.policies.ratelimit import Buckets, Limit, MemoryBuckets, RateLimiter
from torchship.serving.settings import DEFAULT_OPEN_PATHS
from torchship.serving.status_page import is_page_shell

if TYPE_CHECKING:
    from torchship.serving.settings import ServeSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class RequestInfo:
    """What the gate needs of a request; ``headers`` has lower-case names."""

    method: str
    path: str
    headers: Mapping[str, str]
    peer: str | None = None


@dataclass(frozen=True)
class Admission:
    """A request let in: its scope, key name (None: anonymous), client id (the rate limit's
    key), headers to add, and the client's address (behind trusted proxies, the one they
    forwarded for: what access lines name)."""

    scope: str
    key: str | None = None
    client: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    ip: str | None = None


class Gate:
    def __init__(
        self,
        *,
        keys: KeyStore | None = None,
        limiter: RateLimiter | None = None,
        open_paths: Iterable[str] = DEFAULT_OPEN_PATHS,
        trusted_proxies: Iterable[str] = (),
        cors: CorsPolicy | None = None,
        security_headers: bool = True,
    ) -> None:
        self.keys = keys
        self.limiter = limiter
        self.open_paths = tuple(open_paths)
        self.trusted = [_network(p) for p in trusted_proxies]
        self.cors = cors
        self.security_headers = security_headers

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> Gate:
        limiter = None
        if settings.rate_limits:
            buckets: Buckets
            if settings.rate_limit_backend == "redis":
                from torchship.serving.policies.ratelimit import RedisBuckets

                buckets = RedisBuckets.from_url(settings.redis_url)
            else:
                buckets = MemoryBuckets()
            limits: dict[str, Limit] = {
                str(s): Limit(spec.rate, spec.burst) for s, spec in settings.rate_limits.items()
            }
            limiter = RateLimiter(limits, buckets)
        return cls(
            keys=KeyStore.from_specs(settings.api_keys, settings.api_keys_file),
            limiter=limiter,
            open_paths=settings.open_paths,
            trusted_proxies=settings.trusted_proxies,
            cors=CorsPolicy(settings.cors_origins) if settings.cors_origins else None,
            security_headers=settings.security_headers,
        )

    @property
    def auth_enabled(self) -> bool:
        return self.keys is not None

    @property
    def blocking(self) -> bool:
        """True when :meth:`admit` waits on the network (a Redis rate limiter)."""
        return self.limiter is not None and self.limiter.remote

    # --- decisions ------------------------------------------------------------------

    @staticmethod
    def scope_of(path: str) -> str:
        return "admin" if is_management(path) else "inference"

    def is_open(self, path: str) -> bool:
        return is_open_path(path, self.open_paths)

    def preflight(self, info: RequestInfo) -> dict[str, str] | None:
        """Headers of a 204 answering a CORS preflight; None if this is not one."""
        if self.cors is None or not self.cors.is_preflight(info.method, info.headers):
            return None
        headers = self.cors.preflight(info.headers)
        if self.security_headers:
            headers.update(security_headers(None))
        return headers

    def admit(self, info: RequestInfo) -> Admission:
        """Let the request in, or raise 401 / 403 / 429."""
        scope = self.scope_of(info.path)
        ip = self.client_ip(info)
        if self.is_open(info.path):
            return Admission(scope, ip=ip)
        # Page shells and their assets hold no data, so a browser gets them without a
        # key; they still count against the client's address like any other request.
        shell = is_page_shell(info.path, info.headers.get("accept"))
        key = None
        if self.keys is not None and not shell:
            found = self.keys.authenticate(info.headers)
            self.keys.authorize(found, scope)
            key = found.name
        client = f"key:{key}" if key else f"ip:{ip}"
        decision = self.limiter.check(scope, client) if self.limiter else None
        if decision is None:
            return Admission(scope, key, client, ip=ip)
        headers = decision.headers()
        if not decision.allowed:
            record_rate_limited(scope)
            who = f"API key {key!r}" if key else "this client"
            raise RateLimitedError(
                f"Rate limit exceeded for {who}: {decision.limit.rate:g} requests/s, "
                f"bursts of {decision.limit.burst} ({scope}).",
                retry_after=decision.retry_after_s,
                headers=headers,
                hint="Wait Retry-After seconds, then retry; spread requests out or batch "
                "several inputs into one request.",
            )
        return Admission(scope, key, client, headers, ip)

    def client_ip(self, info: RequestInfo) -> str:
        """The socket peer; behind ``trusted_proxies``, the nearest untrusted address in
        ``X-Forwarded-For`` (read from the right: a client can forge the left part)."""
        peer = info.peer or "unknown"
        if not self.trusted or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for h in info.headers.get("x-forwarded-for", "").split(",")]
        hops = [h for h in hops if h]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop[:64]
        return hops[0][:64] if hops else peer

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    # --- responses ------------------------------------------------------------------

    def response_headers(
        self,
        info: RequestInfo,
        admission: Admission | None,
        content_type: str | None,
        *,
        cache: str | None = None,
        draining: bool = False,
    ) -> dict[str, str]:
        """Headers to add to a response (the gate's; the route's own stay as they are)."""
        headers: dict[str, str] = {}
        if self.security_headers:
            headers.update(security_headers(content_type))
        if self.cors is not None:
            headers.update(self.cors.actual(info.headers.get("origin")))
        if admission is not None:
            headers.update(admission.headers)
        if cache:
            headers["X-Cache"] = cache
        if draining:
            headers["Connection"] = "close"
        return headers


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise ConfigError(f"trusted_proxies: {text!r} is not an IP address or CIDR.") from exc


def is_open_path(path: str, open_paths: Iterable[str]) -> bool:
    """Probes and metrics: answered without credentials, and even to a worker that is
    shedding load. A path ending in ``/`` opens everything under it."""
    if is_management(path):
        return False
    return any(path.startswith(p) if p.endswith("/") else path == p for p in open_paths)
