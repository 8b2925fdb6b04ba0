"""Security headers on every response, and CORS for browser clients on other origins.

The security headers stop browsers from sniffing JSON as HTML, framing the API, leaking
URLs in ``Referer`` and (for JSON answers) loading anything at all. HTML pages the server
itself serves (``/docs``, status pages) get the same headers except the strict
``Content-Security-Policy``, which would break their scripts and styles.

CORS is off unless ``cors_origins`` lists origins (``*`` for any): browsers then may call
the API from those pages, sending ``Authorization``/``X-API-Key`` headers (no cookies:
credentials mode is never allowed). A preflight from an origin not listed is refused
with 403.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torchship.errors import ForbiddenError

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-site",
}
API_CSP = "default-src 'none'; frame-ancestors 'none'"

ALLOW_METHODS = ("GET", "POST", "PUT", "DELETE", "OPTIONS")
ALLOW_HEADERS = (
    "Authorization",
    "X-API-Key",
    "Content-Type",
    "Cache-Control",
    "X-User-ID",
    "X-Request-ID",
)
EXPOSE_HEADERS = (
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "RateLimit-Policy",
    "X-Model-Name",
    "X-Model-Version",
    "X-Cache",
    "X-Request-ID",
)


class CorsPolicy:
    """Which origins may call the API from a browser, and the headers that say so."""

    def __init__(
        self,
        origins: Iterable[str],
        *,
        allow_headers: Iterable[str] = ALLOW_HEADERS,
        max_age_s: int = 600,
    ) -> None:
        self.origins = {o.rstrip("/") for o in origins}
        self.any = "*" in self.origins
        self.allow_headers = [h.lower() for h in allow_headers]
        self.max_age_s = max_age_s

    def allows(self, origin: str) -> bool:
        return self.any or origin.rstrip("/") in self.origins

    def is_preflight(self, method: str, headers: Mapping[str, str]) -> bool:
        return (
            method == "OPTIONS"
            and "origin" in headers
            and "access-control-request-method" in headers
        )

    def preflight(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Headers answering a preflight, or :class:`ForbiddenError` for a refused one."""
        origin = headers["origin"]
        method = headers["access-control-request-method"].strip().upper()
        wanted = [
            h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",")
        ]
        refused = [h for h in wanted if h and h not in self.allow_headers]
        if not self.allows(origin):
            raise ForbiddenError(
                f"Origin {origin!r} may not call this API from a browser.",
                hint="Ask the operator to add it to cors_origins (TORCHSHIP_CORS_ORIGINS).",
            )
        if method not in ALLOW_METHODS or refused:
            raise ForbiddenError(
                f"CORS preflight refused: method {method!r}"
                + (f", headers {', '.join(refused)}" if refused else "")
                + " not allowed.",
                hint=f"Allowed methods: {', '.join(ALLOW_METHODS)}; "
                f"headers: {', '.join(self.allow_headers)}.",
            )
        return {
            **self._origin(origin),
            "Access-Control-Allow-Methods": ", ".join(ALLOW_METHODS),
            "Access-Control-Allow-Headers": ", ".join(self.allow_headers),
            "Access-Control-Max-Age": str(self.max_age_s),
        }

    def actual(self, origin: str | None) -> dict[str, str]:
        """Headers for a normal response to a browser request from ``origin``."""
        if not origin or not self.allows(origin):
            return {"Vary": "Origin"} if not self.any else {}
        return {**self._origin(origin), "Access-Control-Expose-Headers": ", ".join(EXPOSE_HEADERS)}

    def _origin(self, origin: str) -> dict[str, str]:
        if self.any:
            return {"Access-Control-Allow-Origin": "*"}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def security_headers(content_type: str | None) -> dict[str, str]:
    """The security headers for a response of ``content_type``."""
    headers = dict(SECURITY_HEADERS)
    if not (content_type or "").lower().startswith("text/html"):
        headers["Content-Security-Policy"] = API_CSP
    return headers
