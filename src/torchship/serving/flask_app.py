"""Flask front end (WSGI; gunicorn in production): the same routes over the same core."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from torchship import __version__
from torchship.errors import (
    InvalidInputError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    RouteNotFoundError,
    TorchshipError,
)
from torchship.serving import payloads, protocols
from torchship.serving.http import dumps, error_response, port_refuses, start_in_background
from torchship.serving.management import Management
from torchship.serving.metrics import PROMETHEUS_CONTENT_TYPE
from torchship.serving.payloads import IMAGE_FIELDS, Payload
from torchship.serving.service import InferenceService
from torchship.serving.settings import ServeSettings

log = logging.getLogger("torchship.serving")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status=status, headers=headers, mimetype="application/json")


def create_app(
    settings: ServeSettings | None = None,
    *,
    service: InferenceService | None = None,
    load_in_background: bool = True,
) -> Flask:
    """Build the Flask app over ``service``; models start loading right away."""
    service = service or InferenceService(settings)
    settings = service.settings
    app = Flask("torchship")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["torchship"] = service
    if load_in_background:
        start_in_background(service)
    else:
        service.start()

    @app.errorhandler(Exception)
    def _errors(exc: Exception) -> Response:
        if isinstance(exc, RequestEntityTooLarge):
            exc = PayloadTooLargeError(
                f"The request body exceeds the limit of {settings.max_body_bytes} bytes.",
                hint="Send a smaller file, or raise max_body_bytes (TORCHSHIP_MAX_BODY_BYTES).",
            )
        elif isinstance(exc, HTTPException) and not isinstance(exc, TorchshipError):
            if exc.code == 404:
                exc = RouteNotFoundError(f"No route {request.method} {request.path}.")
            elif exc.code == 405:
                exc = MethodNotAllowedError(f"{request.method} is not allowed on {request.path}.")
            else:
                mapped = InvalidInputError(exc.description or exc.name)
                mapped.status_code = exc.code or 400
                exc = mapped
        status, body, headers = error_response(exc)
        return _json(body, status, headers)

    @app.before_request
    def _port_gate() -> None:
        port = request.environ.get("SERVER_PORT")
        if port_refuses(request.path, int(port) if port else None, settings.management_port):
            raise RouteNotFoundError(f"No route {request.path} on this port.")

    @app.before_request
    def _start_timer() -> None:
        g.start = time.monotonic()
        service.metrics.in_flight.inc()

    @app.teardown_request
    def _done(exc: BaseException | None) -> None:
        if "start" in g:  # not when an earlier before_request refused the request
            service.metrics.in_flight.dec()

    @app.after_request
    def _observe(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        service.metrics.observe_request(
            rule,
            g.get("model", ""),
            g.get("version", ""),
            response.status_code,
            time.monotonic() - g.get("start", time.monotonic()),
        )
        if g.get("version"):  # every answer says which version served it
            response.headers["X-Model-Name"] = g.model
            response.headers["X-Model-Version"] = g.version
        return response

    # --- torchship API -----------------------------------------------------------

    @app.get("/")
    def index() -> Response:
        ready, _ = service.readiness()
        return _json(
            {
                "name": "torchship",
                "version": __version__,
                "ready": ready,
                "models": service.model_names(),
            }
        )

    @app.post("/predict")
    def predict() -> Response:
        payload, top_k = _read_payload()
        result = service.predict(
            payload,
            model=request.args.get("model"),
            version=request.args.get("version"),
            top_k=payloads.parse_top_k(request.args.get("top_k")) or top_k,
            headers=dict(request.headers.items()),
        )
        g.model, g.version = result.model, result.version
        return _json(result.to_dict())

    @app.get("/models")
    def models() -> Response:
        return _json({"models": [m.info() for m in service.models()]})

    @app.get("/health/live")
    def live() -> Response:
        return _json({"status": "alive"})

    @app.get("/health/ready")
    def ready() -> Response:
        ok, details = service.readiness()
        return _json(details, 200 if ok else 503, {} if ok else {"Retry-After": "1"})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(service.metrics.render(), content_type=PROMETHEUS_CONTENT_TYPE)

    # --- TorchServe inference API ---------------------------------------------------

    @app.get("/ping")
    def ping() -> Response:
        ok, _ = service.readiness()
        return _json({"status": "Healthy" if ok else "Unhealthy"}, 200 if ok else 503)

    @app.post("/predictions/<name>")
    @app.post("/predictions/<name>/<version>")
    def predictions(name: str, version: str | None = None) -> Response:
        payload, top_k = _read_payload()
        result = service.predict(
            payload, model=name, version=version, top_k=top_k, headers=dict(request.headers.items())
        )
        g.model, g.version = result.model, result.version
        return _json(protocols.torchserve_body(result))

    # --- Open Inference Protocol (V2) -------------------------------------------------

    @app.get("/v2")
    def v2_server() -> Response:
        return _json(protocols.v2_server_metadata())

    @app.get("/v2/health/live")
    def v2_live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    def v2_ready() -> Response:
        ok, _ = service.readiness()
        return _json({"ready": ok}, 200 if ok else 503)

    @app.get("/v2/models/<name>")
    @app.get("/v2/models/<name>/versions/<version>")
    def v2_model(name: str, version: str | None = None) -> Response:
        return _json(protocols.v2_model_metadata(service, service.get(name, version)))

    @app.get("/v2/models/<name>/ready")
    @app.get("/v2/models/<name>/versions/<version>/ready")
    def v2_model_ready(name: str, version: str | None = None) -> Response:
        loaded = service.get(name, version)
        return _json({"name": loaded.name, "ready": loaded.ready})

    @app.post("/v2/models/<name>/infer")
    @app.post("/v2/models/<name>/versions/<version>/infer")
    def v2_infer(name: str, version: str | None = None) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        with service.lease(name, version, headers) as (loaded, route):
            g.model, g.version = loaded.name, loaded.version
            v2_request, batch = protocols.v2_decode(
                loaded, _read_body(), headers, max_items=settings.max_queue_size
            )
            outputs = service.infer_tensor(loaded, batch, route)
            content, out_headers = protocols.v2_encode(loaded, v2_request, outputs)
        return Response(content, headers=out_headers)

    _management_routes(app, Management(service))
    return app


def _management_routes(app: Flask, m: Management) -> None:
    """``/manage/...``: versions, load/unload, traffic policy, promote, rollback, history."""

    def body() -> dict[str, Any]:
        data = payloads.load_json(_read_body()) or {}
        if not isinstance(data, dict):
            raise InvalidInputError("The body must be a JSON object.")
        return data

    def reason() -> str:
        return str(body().get("reason", ""))

    app.get("/manage/models")(lambda: _json(m.overview()))
    app.get("/manage/models/<name>", endpoint="manage_model")(lambda name: _json(m.model(name)))
    app.get("/manage/models/<name>/versions", endpoint="manage_versions")(
        lambda name: _json(m.versions(name))
    )
    app.post("/manage/models/<name>/versions/<version>/load", endpoint="manage_load")(
        lambda name, version: _json(m.load(name, version))
    )
    app.post("/manage/models/<name>/versions/<version>/unload", endpoint="manage_unload")(
        lambda name, version: _json(m.unload(name, version))
    )
    app.get("/manage/models/<name>/policy", endpoint="manage_policy")(
        lambda name: _json(m.policy(name))
    )
    app.put("/manage/models/<name>/policy", endpoint="manage_set_policy")(
        lambda name: _json(m.set_policy(name, body()))
    )
    app.post("/manage/models/<name>/advance", endpoint="manage_advance")(
        lambda name: _json(m.advance(name, reason()))
    )
    app.get("/manage/models/<name>/history", endpoint="manage_history")(
        lambda name: _json(m.history(name))
    )

    @app.post("/manage/models/<name>/promote", endpoint="manage_promote")
    def promote(name: str) -> Response:
        data = body()
        if not isinstance(data.get("version"), str):
            raise InvalidInputError("'version' (a string) is required.")
        return _json(m.promote(name, data["version"], str(data.get("reason", ""))))

    @app.post("/manage/models/<name>/rollback", endpoint="manage_rollback")
    def rollback(name: str) -> Response:
        data = body()
        to = data.get("to")
        if to is not None and not isinstance(to, str):
            raise InvalidInputError("'to' must be a version string.")
        return _json(m.rollback(name, to=to, reason=str(data.get("reason", ""))))


def _read_body() -> bytes:
    """The whole body, or 413: werkzeug's limiter silently truncates a chunked body at
    MAX_CONTENT_LENGTH, so read one byte more and refuse if it arrives."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    body = request.get_data(cache=False)
    if request.content_length is None and len(body) >= limit and request.stream.read(1):
        raise PayloadTooLargeError(
            f"The request body exceeds the limit of {limit} bytes.",
            hint="Send a smaller file, or raise max_body_bytes (TORCHSHIP_MAX_BODY_BYTES).",
        )
    return body


def _read_payload() -> tuple[Payload, int | None]:
    """Multipart (image/file field), JSON, or a raw image / .npy body."""
    if payloads.media_type(request.content_type) == "multipart/form-data":
        for field in (*IMAGE_FIELDS, *request.files.keys()):
            upload = request.files.get(field)
            if upload is not None:
                return payloads.ImagePayload(upload.read()), payloads.parse_top_k(
                    request.form.get("top_k")
                )
        raise payloads.no_file_error()
    return payloads.parse_body(_read_body(), request.content_type)


def app_from_env() -> Flask:
    """Factory for gunicorn worker processes: settings come from ``TORCHSHIP_*``."""
    from torchship.settings import load_settings

    # Load before accepting: workers share one listening socket, so a worker that
    # accepted while still loading would answer 503 while its siblings could serve.
    return create_app(load_settings(cls=ServeSettings), load_in_background=False)


def serve_gunicorn(settings: ServeSettings, workers: int) -> None:
    """Flask in production: gunicorn, ``workers`` processes with a few HTTP threads each."""
    import os

    from gunicorn.app.base import BaseApplication

    from torchship.serving.runner import settings_to_env

    os.environ.update(settings_to_env(settings))

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            binds = [f"{settings.host}:{settings.port}"]
            if settings.management_port:
                binds.append(f"{settings.host}:{settings.management_port}")
            self.cfg.set("bind", binds)
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", 8)
            self.cfg.set("graceful_timeout", int(settings.graceful_timeout_s))
            self.cfg.set("timeout", max(60, int(settings.timeout_s * 2)))
            self.cfg.set("loglevel", "warning")

        def load(self) -> Flask:
            return app_from_env()

    _App().run()
