"""The :class:`~torchship.serving.policies.gate.Gate` and the HTTP limits as one pure
ASGI layer, inside the request monitor (so refused requests are counted and logged).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from torchship.errors import PayloadTooLargeError, RouteNotFoundError, TorchshipError
from torchship.serving.http import port_refuses, send_asgi_error
from torchship.serving.policies.gate import Gate, RequestInfo

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def request_info(scope: Scope) -> RequestInfo:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    client = scope.get("client")
    return RequestInfo(
        scope.get("method", "GET"), scope["path"], headers, client[0] if client else None
    )


class EdgeMiddleware:
    """The gate and the HTTP limits, as one layer (each layer costs every request):

    * CORS preflights answered; security, CORS, rate-limit and cache headers added to
      every response, errors from this layer included;
    * with a management port, ``/manage/*`` only there and inference routes elsewhere
      (404 otherwise);
    * 413 for bodies over ``max_body_bytes``, by Content-Length up front or by counting
      chunks of a body without one;
    * 401 / 403 / 429 before any route runs (and before the body is read); the
      admission is left in ``scope["state"]``.
    """

    def __init__(
        self,
        app: ASGIApp,
        gate: Gate,
        draining: Callable[[], bool],
        *,
        max_body_bytes: int,
        management_port: int | None = None,
    ) -> None:
        self.app = app
        self.gate = gate
        self.draining = draining
        self.max_body_bytes = max_body_bytes
        self.management_port = management_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = request_info(scope)
        state = scope.setdefault("state", {})
        gate = self.gate

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = message.get("headers", [])
                existing = {k.lower() for k, _ in raw}
                content_type = next(
                    (v.decode("latin-1") for k, v in raw if k.lower() == b"content-type"), None
                )
                added = gate.response_headers(
                    info,
                    state.get("admission"),
                    content_type,
                    cache=state.get("cache"),
                    draining=self.draining(),
                )
                message["headers"] = [
                    *raw,
                    *(
                        (name, v.encode())
                        for k, v in added.items()
                        if (name := k.lower().encode()) not in existing
                    ),
                ]
            await send(message)

        try:
            preflight = gate.preflight(info)
            if preflight is None:
                server = scope.get("server") or (None, None)
                if port_refuses(info.path, server[1], self.management_port):
                    raise RouteNotFoundError(f"No route {info.path} on this port.")
                length = info.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                    raise self._too_large()
                if gate.blocking:
                    admission = await asyncio.to_thread(gate.admit, info)
                else:
                    admission = gate.admit(info)
        except TorchshipError as exc:
            await send_asgi_error(send_with_headers, exc)
            return
        if preflight is not None:
            raw = [(k.lower().encode(), v.encode()) for k, v in preflight.items()]
            await send({"type": "http.response.start", "status": 204, "headers": raw})
            await send({"type": "http.response.body", "body": b""})
            return
        state["admission"] = admission
        if length is None or not length.isdigit():  # chunked: nothing bounds it up front
            receive = self._counting(receive)
        await self.app(scope, receive, send_with_headers)

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self._too_large()
            return message

        return limited

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"The request body exceeds the limit of {self.max_body_bytes} bytes.",
            hint="Send a smaller file, or raise max_body_bytes (TORCHSHIP_MAX_BODY_BYTES).",
        )
