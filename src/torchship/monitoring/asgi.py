"""Pure ASGI middleware that opens every request's log context, counts and times it, and
writes its access line (the FastAPI front end installs it outermost, so requests refused
by inner middleware, 413s and 404s included, are seen too).

It also owns the one exit for unexpected exceptions: they become the generic 500 here,
logged once with their traceback and the request id, instead of escaping to Starlette's
and the server's own handlers (which would log them a second and third time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from torchship.monitoring.logs import AccessRecord, end_request, start_request
from torchship.monitoring.requests import RequestObserver
from torchship.serving.http import send_asgi_error

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("torchship.serving")


def _endpoint(scope: Scope) -> str:
    """The route template (bounded label values), also for requests refused before
    routing: matched against the app's routes then."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    app = scope.get("app")
    for candidate in getattr(app, "routes", ()):
        try:
            match, _ = candidate.matches(scope)
        except Exception:
            continue
        if match.value > 0:  # starlette.routing.Match: FULL or PARTIAL (wrong method)
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"


class RequestMonitorMiddleware:
    def __init__(self, app: ASGIApp, observer: RequestObserver) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        req_cap = self.observer.request_capture_bytes
        incoming_id = request_type = None
        for k, v in scope["headers"]:  # ASGI header names are lower-case
            if k == b"x-request-id":
                incoming_id = v.decode("latin-1")
            elif k == b"content-type":
                request_type = v.decode("latin-1")
        headers = (
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            if req_cap
            else None
        )
        ctx, token = start_request(incoming_id)
        resp_cap = self.observer.response_capture_bytes
        request_body = bytearray()
        response_body = bytearray()
        seen = {"in": 0, "out": 0, "status": 500, "started": False}
        response_type: str | None = None

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                seen["in"] += len(chunk)
                if len(request_body) < req_cap:
                    request_body.extend(chunk[: req_cap - len(request_body)])
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal response_type
            if message["type"] == "http.response.start":
                seen["status"], seen["started"] = message["status"], True
                state = scope.get("state") or {}
                model = state.get("model") or ctx.model
                version = state.get("version") or ctx.version
                extra = [(b"x-request-id", ctx.request_id.encode())]
                if version:  # every answer says which version served it
                    names = {k.lower() for k, _ in message.get("headers", [])}
                    if b"x-model-version" not in names:
                        extra += [
                            (b"x-model-name", str(model).encode()),
                            (b"x-model-version", str(version).encode()),
                        ]
                message["headers"] = [*message.get("headers", []), *extra]
                for k, v in message["headers"]:
                    if k.lower() == b"content-type":
                        response_type = v.decode("latin-1")
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                seen["out"] += len(chunk)
                keep = resp_cap if seen["status"] >= 400 else req_cap
                if len(response_body) < keep:
                    response_body.extend(chunk[: keep - len(response_body)])
            await send(message)

        metrics = self.observer.metrics
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive_wrapper if req_cap else receive, send_wrapper)
        except Exception as exc:
            if seen["started"]:  # too late for an error response: log, drop the connection
                log.error("error after the response started", exc_info=exc)
            else:
                await send_asgi_error(send_wrapper, exc)  # logs unknown errors, once
        finally:
            metrics.in_flight.dec()
            state = scope.get("state") or {}
            client = scope.get("client")
            ip = getattr(state.get("admission"), "ip", None) or (client[0] if client else None)
            self.observer.finish(
                AccessRecord(
                    method=scope["method"],
                    path=scope["path"],
                    query=scope.get("query_string", b"").decode("latin-1"),
                    status=int(seen["status"]),
                    seconds=time.monotonic() - start,
                    endpoint=_endpoint(scope),
                    client=ip,
                    model=state.get("model") or ctx.model,
                    version=state.get("version") or ctx.version,
                    request_headers=headers,
                    request_body=bytes(request_body) if req_cap else None,
                    request_type=request_type,
                    request_bytes=seen["in"],
                    request_complete=seen["in"] <= len(request_body),
                    response_body=bytes(response_body),
                    response_type=response_type,
                    response_bytes=seen["out"],
                )
            )
            end_request(token)
