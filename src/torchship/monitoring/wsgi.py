"""The Flask front end's request monitoring: the same request id, metrics and access line
as :mod:`torchship.monitoring.asgi`, as Flask hooks that run first (before any other
``before_request``) and last (after every other ``after_request`` and teardown)."""

from __future__ import annotations

import re
import time
from typing import IO, Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from torchship.monitoring.logs import AccessRecord, current_request, end_request, start_request
from torchship.monitoring.requests import RequestObserver


class _TeeInput:
    """``wsgi.input`` that keeps the first ``limit`` bytes read through it, for the log."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self.raw = raw
        self.limit = limit
        self.kept = bytearray()
        self.seen = 0

    def _keep(self, data: bytes) -> bytes:
        self.seen += len(data)
        if len(self.kept) < self.limit:
            self.kept.extend(data[: self.limit - len(self.kept)])
        return data

    def read(self, size: int = -1) -> bytes:
        return self._keep(self.raw.read(size))

    def readline(self, size: int = -1) -> bytes:
        return self._keep(self.raw.readline(size))

    def readlines(self, hint: int = -1) -> list[bytes]:
        return [self._keep(line) for line in self.raw.readlines(hint)]

    def __iter__(self) -> Any:
        return iter(self.readline, b"")

    def close(self) -> None:
        self.raw.close()


_CONVERTER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def _template(rule: str) -> str:
    """Werkzeug's ``/predictions/<name>`` as Starlette writes it, ``/predictions/{name}``:
    one endpoint label whichever front end served it (dashboards match on it)."""
    return _CONVERTER.sub(r"{\1}", rule)


def _endpoint(app: Flask) -> str:
    return _template(_rule(app))


def _rule(app: Flask) -> str:
    if request.url_rule is not None:
        return request.url_rule.rule
    # Refused before routing (405: the path exists for another method): the rule anyway.
    adapter = app.url_map.bind_to_environ(request.environ)
    try:
        rule, _ = adapter.match(return_rule=True)
        return rule.rule
    except MethodNotAllowed as exc:
        for method in exc.valid_methods or ():
            try:
                rule, _ = adapter.match(method=method, return_rule=True)
                return rule.rule
            except (NotFound, MethodNotAllowed):
                continue
    except Exception:
        pass
    return "unmatched"


def install_flask(app: Flask, observer: RequestObserver) -> None:
    metrics = observer.metrics
    capture = observer.request_capture_bytes

    def begin() -> None:
        _, token = start_request(request.headers.get("X-Request-ID"))
        g.torchship_monitor = (token, time.monotonic())
        metrics.in_flight.inc()
        if capture:
            tee = _TeeInput(request.environ["wsgi.input"], capture)
            request.environ["wsgi.input"] = tee
            g.torchship_tee = tee

    def finish(response: Response) -> Response:
        ctx = current_request()
        started = g.get("torchship_monitor")
        if ctx is None or started is None:
            return response
        model = g.get("model") or ctx.model
        version = g.get("version") or ctx.version
        response.headers["X-Request-ID"] = ctx.request_id
        if version and "X-Model-Version" not in response.headers:
            response.headers["X-Model-Name"] = str(model)
            response.headers["X-Model-Version"] = str(version)
        readable = not response.direct_passthrough and not response.is_streamed
        keep = observer.response_capture_bytes if response.status_code >= 400 else capture
        body = response.get_data()[:keep] if (keep and readable) else b""
        tee: _TeeInput | None = g.get("torchship_tee")
        observer.finish(
            AccessRecord(
                method=request.method,
                path=request.path,
                query=request.query_string.decode("latin-1"),
                status=response.status_code,
                seconds=time.monotonic() - started[1],
                endpoint=_endpoint(app),
                client=getattr(g.get("admission"), "ip", None) or request.remote_addr,
                model=model,
                version=version,
                request_headers=dict(request.headers.items()) if capture else None,
                request_body=bytes(tee.kept) if tee is not None else None,
                request_type=request.content_type,
                request_bytes=request.content_length or (tee.seen if tee else None),
                request_complete=tee is None
                or len(tee.kept) >= (request.content_length or tee.seen),
                response_body=body,
                response_type=response.content_type,
                response_bytes=response.content_length,
            )
        )
        return response

    def teardown(exc: BaseException | None) -> None:
        started = g.pop("torchship_monitor", None)
        if started is not None:
            metrics.in_flight.dec()
            end_request(started[0])

    # First in, last out: other hooks (auth, limits, caching) run inside this one.
    app.before_request_funcs.setdefault(None, []).insert(0, begin)
    app.after_request_funcs.setdefault(None, []).insert(0, finish)
    app.teardown_request_funcs.setdefault(None, []).insert(0, teardown)


def gunicorn_logger_class() -> type:
    """gunicorn's logger, sending its own lines (worker boots, timeouts, kills) through
    torchship's root handler, so they come out as JSON or text like every other line."""
    from gunicorn.glogging import Logger

    class _Logger(Logger):  # type: ignore[misc]
        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for logger in (self.error_log, self.access_log):
                logger.handlers.clear()
                logger.propagate = True

    return _Logger
