"""The :class:`~torchship.serving.policies.gate.Gate` as pure ASGI middleware.

Two layers, so the request metrics (between them) count refused requests too:

* :class:`ResponseHeadersMiddleware`, outermost: answers CORS preflights and puts the
  gate's headers on every response, errors from other middleware included;
* :class:`AdmissionMiddleware`, innermost: auth and rate limits before any route runs
  (and before the body is read).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from torchship.errors import TorchshipError
from torchship.serving.http import dumps, error_response
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


async def send_error(send: Send, exc: BaseException, extra: dict[str, str] | None = None) -> None:
    status, body, headers = error_response(exc)
    payload = dumps(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in {**headers, **(extra or {})}.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class ResponseHeadersMiddleware:
    """CORS preflights; security, CORS, rate-limit and cache headers on every response."""

    def __init__(self, app: ASGIApp, gate: Gate, draining: Callable[[], bool]) -> None:
        self.app = app
        self.gate = gate
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = request_info(scope)
        state = scope.setdefault("state", {})

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                existing = {k.lower() for k, _ in message.get("headers", [])}
                content_type = next(
                    (
                        v.decode("latin-1")
                        for k, v in message.get("headers", [])
                        if k.lower() == b"content-type"
                    ),
                    None,
                )
                added = self.gate.response_headers(
                    info,
                    state.get("admission"),
                    content_type,
                    cache=state.get("cache"),
                    draining=self.draining(),
                )
                message["headers"] = [
                    *message.get("headers", []),
                    *(
                        (k.lower().encode(), v.encode())
                        for k, v in added.items()
                        if k.lower().encode() not in existing
                    ),
                ]
            await send(message)

        try:
            preflight = self.gate.preflight(info)
        except TorchshipError as exc:
            await send_error(send_with_headers, exc)
            return
        if preflight is not None:
            raw = [(k.lower().encode(), v.encode()) for k, v in preflight.items()]
            await send({"type": "http.response.start", "status": 204, "headers": raw})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send_with_headers)


class AdmissionMiddleware:
    """401 / 403 / 429 before the route runs; the admission is left in ``scope["state"]``."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = request_info(scope)
        try:
            if self.gate.blocking:
                admission = await asyncio.to_thread(self.gate.admit, info)
            else:
                admission = self.gate.admit(info)
        except TorchshipError as exc:
            await send_error(send, exc)
            return
        scope.setdefault("state", {})["admission"] = admission
        await self.app(scope, receive, send)
