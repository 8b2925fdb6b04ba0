"""Flask front end (WSGI; gunicorn in production): the same routes over the same core."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from torchship.errors import (
    InvalidInputError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    QueueFullError,
    RouteNotFoundError,
    TorchshipError,
)
from torchship.monitoring.requests import RequestObserver
from torchship.monitoring.wsgi import gunicorn_logger_class, install_flask
from torchship.serving import docs_page, mar_models, payloads, protocols, status_page
from torchship.serving.gunicorn_worker import shedding
from torchship.serving.http import dumps, error_response, port_refuses, start_in_background
from torchship.serving.management import Management
from torchship.serving.metrics import PROMETHEUS_CONTENT_TYPE, mark_worker_dead
from torchship.serving.payloads import IMAGE_FIELDS, Payload
from torchship.serving.policies import Gate, RequestInfo
from torchship.serving.policies.lifecycle import install_drain_delay
from torchship.serving.service import InferenceService
from torchship.serving.settings import ServeSettings
from torchship.serving.torchserve_api import PREFIX as TS_PREFIX
from torchship.serving.torchserve_api import TorchServeManagement, TorchServePathsWSGI

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
    app = Flask("torchship", static_folder=None)  # /static/ is the pages' route below
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

    # Request id, metrics, access line, X-Model-* headers: first and last of all hooks.
    install_flask(app, RequestObserver.from_settings(service.metrics, settings))

    gate = Gate.from_settings(settings)

    def request_info() -> RequestInfo:
        if "request_info" not in g:
            headers = {k.lower(): v for k, v in request.headers.items()}
            g.request_info = RequestInfo(request.method, request.path, headers, request.remote_addr)
        info: RequestInfo = g.request_info
        return info

    @app.before_request
    def _shed() -> None:
        """Refused by the gunicorn worker (see torchship.serving.gunicorn_worker); health
        probes and /metrics are answered even then."""
        if shedding() and not gate.is_open(request.path):
            raise QueueFullError(
                f"Too many requests are waiting in this worker (over "
                f"{settings.max_queue_size}, or for longer than {settings.timeout_s:g} s).",
                hint="Retry after the Retry-After delay, or add workers or replicas.",
            )

    @app.before_request
    def _admit() -> Response | None:
        """CORS preflight, then auth and rate limits (401 / 403 / 429)."""
        preflight = gate.preflight(request_info())
        if preflight is not None:
            return Response(status=204, headers=preflight)
        g.admission = gate.admit(request_info())
        return None

    @app.after_request
    def _gate_headers(response: Response) -> Response:
        # No 'Connection: close' while draining: hop-by-hop headers are the WSGI server's.
        added = gate.response_headers(
            request_info(), g.get("admission"), response.content_type, cache=g.get("cache")
        )
        for name, value in added.items():
            response.headers.setdefault(name, value)
        return response

    # --- torchship API -----------------------------------------------------------

    @app.get("/")
    def index() -> Response:
        if status_page.wants_html(request.headers.get("Accept")):
            return Response(status_page.page(), content_type=status_page.HTML)
        return _json(status_page.index(service))

    @app.get(status_page.STATUS_PATH)
    def status() -> Response:
        return _json(status_page.status(service))

    @app.get(status_page.STATIC_PREFIX + "<name>")
    def static_asset(name: str) -> Response:
        found = status_page.asset(name)
        if found is None:
            raise RouteNotFoundError(f"No asset {name!r}.")
        return Response(
            found[0],
            content_type=found[1],
            headers={"Cache-Control": status_page.ASSET_CACHE_CONTROL},
        )

    @app.get(docs_page.DOCS_PATH)
    @app.get(docs_page.REDOC_PATH)
    def docs() -> Response:
        return Response(docs_page.page(request.path), content_type=status_page.HTML)

    openapi: list[bytes] = []  # built at the first request: it imports the FastAPI app

    @app.get(docs_page.OPENAPI_PATH)
    def openapi_json() -> Response:
        if not openapi:
            openapi.append(dumps(docs_page.openapi_for(service)))
        return Response(openapi[0], content_type="application/json")

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
        g.cache = result.extra.get("cache")
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

    @app.get("/health/startup")
    def startup() -> Response:
        ok, details = service.startup()
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
        if mar_models.serves_archive(service, name):  # the archive's own handler answers
            raw = _read_archive_request()
            loaded, answer = mar_models.predict(
                service, raw, name, version, dict(request.headers.items())
            )
            g.model, g.version = loaded.name, loaded.version
            return Response(answer.body, status=answer.status, headers=answer.headers)
        payload, top_k = _read_payload()
        result = service.predict(
            payload, model=name, version=version, top_k=top_k, headers=dict(request.headers.items())
        )
        g.model, g.version = result.model, result.version
        g.cache = result.extra.get("cache")
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
        return _json({"ready": ok}, 200 if ok else protocols.V2_NOT_READY)

    @app.get("/v2/models/<name>")
    @app.get("/v2/models/<name>/versions/<version>")
    def v2_model(name: str, version: str | None = None) -> Response:
        return _json(protocols.v2_model_metadata(service, service.get(name, version)))

    @app.get("/v2/models/<name>/ready")
    @app.get("/v2/models/<name>/versions/<version>/ready")
    def v2_model_ready(name: str, version: str | None = None) -> Response:
        return _json(*protocols.v2_model_ready(service, name, version))

    @app.post("/v2/models/<name>/infer")
    @app.post("/v2/models/<name>/versions/<version>/infer")
    def v2_infer(name: str, version: str | None = None) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        with service.lease(name, version, headers) as (loaded, route):
            g.model, g.version = loaded.name, loaded.version
            began = time.monotonic()
            v2_request, batch = protocols.v2_decode(
                loaded, _read_body(), headers, max_items=settings.max_queue_size
            )
            service.metrics.observe_preprocess(
                loaded.name, loaded.version, time.monotonic() - began
            )
            outputs = service.infer_tensor(loaded, batch, route)
            content, out_headers = protocols.v2_encode(loaded, v2_request, outputs)
        return Response(content, headers=out_headers)

    _management_routes(app, Management(service))
    _torchserve_routes(app, TorchServeManagement(service))
    # TorchServe's management paths (/models...) on the management port -> /manage/torchserve
    app.wsgi_app = TorchServePathsWSGI(app.wsgi_app, settings.management_port)  # type: ignore[method-assign]
    return app


def _torchserve_routes(app: Flask, ts: TorchServeManagement) -> None:
    """TorchServe's management API under ``/manage/torchserve`` (and, on the management
    port, at TorchServe's own ``/models...`` paths)."""
    models = f"{TS_PREFIX}/models"

    def answer(result: tuple[int, dict[str, str]]) -> Response:
        return _json(result[1], result[0])

    app.get(models, endpoint="ts_list")(
        lambda: _json(
            ts.list_models(request.args.get("limit"), request.args.get("next_page_token"))
        )
    )
    app.post(models, endpoint="ts_register")(lambda: answer(ts.register(request.args.to_dict())))
    for rule in (models + "/<name>", models + "/<name>/<version>"):
        app.get(rule, endpoint=f"ts_describe{rule.count('<')}")(
            lambda name, version=None: _json(ts.describe(name, version))
        )
        app.put(rule, endpoint=f"ts_scale{rule.count('<')}")(
            lambda name, version=None: answer(ts.scale(name, version, request.args.to_dict()))
        )
        app.delete(rule, endpoint=f"ts_unregister{rule.count('<')}")(
            lambda name, version=None: _json(ts.unregister(name, version))
        )
    app.put(models + "/<name>/<version>/set-default", endpoint="ts_set_default")(
        lambda name, version: _json(ts.set_default(name, version))
    )


def _read_archive_request() -> mar_models.ArchiveRequest:
    """The request as TorchServe hands it to a handler (form fields, or the body)."""
    form = None
    if payloads.media_type(request.content_type) in (
        "multipart/form-data",
        "application/x-www-form-urlencoded",
    ):
        form = [mar_models.FormField(k, v) for k, v in request.form.items(multi=True)]
        form += [
            mar_models.FormField(k, f.read(), f.content_type)
            for k, f in request.files.items(multi=True)
        ]
    body = b"" if form is not None else _read_body()
    return mar_models.archive_request(
        body,
        request.content_type,
        dict(request.headers.items()),
        request.args.items(multi=True),
        form,
    )


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
    from torchship.monitoring.logs import configure_logging
    from torchship.settings import load_settings

    settings = load_settings(cls=ServeSettings)
    configure_logging(settings.log_format, access_log=settings.access_log)
    # Load before accepting: workers share one listening socket, so a worker that
    # accepted while still loading would answer 503 while its siblings could serve.
    app = create_app(settings, load_in_background=False)
    service: InferenceService = app.extensions["torchship"]
    install_drain_delay(service.begin_drain, service.settings.drain_delay_s)
    return app


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
            # gthread, plus a bound on requests waiting for a thread (503 past it)
            self.cfg.set("worker_class", "torchship.serving.gunicorn_worker.SheddingWorker")
            self.cfg.set("threads", 8)
            self.cfg.set(
                "graceful_timeout", int(settings.graceful_timeout_s + settings.drain_delay_s)
            )
            self.cfg.set("timeout", max(60, int(settings.timeout_s * 2)))
            self.cfg.set("loglevel", "warning")
            # A worker that exits stops counting in the live metrics gauges.
            self.cfg.set("child_exit", lambda _arbiter, worker: mark_worker_dead(worker.pid))
            self.cfg.set("logger_class", gunicorn_logger_class())  # JSON/text like the rest

        def load(self) -> Flask:
            return app_from_env()

    _App().run()
