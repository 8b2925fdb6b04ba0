"""FastAPI front end: routes translate HTTP to :class:`InferenceService` calls and back."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from enum import Enum
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from torchship import __version__
from torchship.errors import (
    InvalidInputError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    RouteNotFoundError,
    TorchshipError,
)
from torchship.serving import payloads, protocols
from torchship.serving.http import error_response, port_refuses, start_in_background
from torchship.serving.management import Management
from torchship.serving.metrics import PROMETHEUS_CONTENT_TYPE
from torchship.serving.payloads import IMAGE_FIELDS, Payload
from torchship.serving.service import InferenceService
from torchship.serving.settings import ServeSettings

log = logging.getLogger("torchship.serving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --- schemas (OpenAPI docs and validation) -----------------------------------------------


class TopK(BaseModel):
    label: str
    index: int
    probability: float


class PredictionItem(BaseModel):
    label: str | None = Field(None, examples=["7"])
    index: int | None = None
    probability: float | None = Field(None, examples=[0.998])
    top_k: list[TopK] | None = None
    output: list[Any] | None = Field(None, description="Raw outputs, for non-classifiers.")


class PredictionResponse(BaseModel):
    model: str = Field(examples=["digits"])
    version: str = Field(examples=["1"])
    runtime: str = Field(examples=["onnxruntime"])
    predictions: list[PredictionItem]
    latency_ms: float


class ErrorResponse(BaseModel):
    error: str = Field(examples=["The uploaded file is not an image Pillow can read."])
    code: str = Field(examples=["invalid_image"])
    hint: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 503, 504)
}

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "file": {"type": "string", "format": "binary"},
                    },
                    "description": "An image in the 'image' (Flask example) or 'file' field.",
                }
            },
            "application/json": {
                "schema": payloads.PredictJSON.model_json_schema(),
                "examples": {
                    "tensor": {
                        "summary": "one 1x8x8 digit as normalised numbers",
                        "value": {"inputs": [[[0.0] * 8] * 8], "top_k": 3},
                    }
                },
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# --- pure ASGI middleware ----------------------------------------------------------------


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length up front or by counting chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_error(send, self._error())
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited, send)

    def _error(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"The request body exceeds the limit of {self.max_bytes} bytes.",
            hint="Send a smaller file, or raise max_body_bytes (TORCHSHIP_MAX_BODY_BYTES).",
        )


async def _send_error(send: Send, exc: BaseException) -> None:
    status, body, headers = error_response(exc)
    payload = json.dumps(body).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class PortGateMiddleware:
    """With a management port: /manage/* only there, inference routes only elsewhere."""

    def __init__(self, app: ASGIApp, management_port: int | None) -> None:
        self.app = app
        self.management_port = management_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server") or (None, None)
            if port_refuses(scope["path"], server[1], self.management_port):
                await _send_error(
                    send, RouteNotFoundError(f"No route {scope['path']} on this port.")
                )
                return
        await self.app(scope, receive, send)


class MetricsMiddleware:
    """Counts and times every request by route template, model, version and status."""

    def __init__(self, app: ASGIApp, service: InferenceService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500
        metrics = self.service.metrics

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                state = scope.get("state") or {}
                if state.get("version"):  # every answer says which version served it
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-model-name", str(state["model"]).encode()),
                        (b"x-model-version", str(state["version"]).encode()),
                    ]
            await send(message)

        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            state = scope.get("state") or {}
            metrics.observe_request(
                endpoint,
                state.get("model", ""),
                state.get("version", ""),
                status,
                time.monotonic() - start,
            )


# --- the app -----------------------------------------------------------------------------


def create_app(
    settings: ServeSettings | None = None,
    *,
    service: InferenceService | None = None,
    load_in_background: bool = True,
) -> FastAPI:
    """Build the FastAPI app over ``service`` (created from ``settings`` if not given).

    Models load when the app starts; with ``load_in_background`` the server answers
    liveness at once and readiness once every model is warm.
    """
    service = service or InferenceService(settings)
    settings = service.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load_in_background:
            start_in_background(service)
        else:
            await asyncio.to_thread(service.start)
        yield
        await asyncio.to_thread(service.stop, True)

    app = FastAPI(
        title="torchship",
        version=__version__,
        summary="PyTorch models served with dynamic batching.",
        description="torchship's REST API, the Open Inference Protocol (V2) and "
        "TorchServe's inference API, over one inference core.",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(TorchshipError)
    @app.exception_handler(Exception)
    async def _errors(request: Request, exc: Exception) -> JSONResponse:
        status, body, headers = error_response(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_errors(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        mapped: TorchshipError
        if exc.status_code == 404:
            mapped = RouteNotFoundError(f"No route {request.method} {request.url.path}.")
        elif exc.status_code == 405:
            mapped = MethodNotAllowedError(
                f"{request.method} is not allowed on {request.url.path}."
            )
        else:
            mapped = TorchshipError(str(exc.detail))
            mapped.status_code = exc.status_code
        status, body, headers = error_response(mapped)
        return JSONResponse(body, status_code=status, headers={**headers, **(exc.headers or {})})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        status, body, headers = error_response(InvalidInputError(f"Invalid request: {details}"))
        return JSONResponse(body, status_code=status, headers=headers)

    # --- torchship API -----------------------------------------------------------

    @app.get("/", tags=["status"])
    async def index() -> dict[str, Any]:
        ready, _ = service.readiness()
        return {
            "name": "torchship",
            "version": __version__,
            "ready": ready,
            "models": service.model_names(),
            "docs": "/docs",
        }

    @app.post(
        "/predict",
        response_model=PredictionResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        openapi_extra=PREDICT_BODY,
        tags=["predict"],
        summary="Classify an image (multipart 'image' or 'file', raw body) or a tensor (JSON, .npy).",
    )
    async def predict(
        request: Request,
        model: str | None = Query(None, description="Model name; default: the first served."),
        version: str | None = Query(None, description="Version or alias."),
        top_k: int | None = Query(None, ge=1, le=1000),
    ) -> PredictionResponse:
        payload, body_top_k = await _read_payload(request)
        result = await service.apredict(
            payload,
            model=model,
            version=version,
            top_k=top_k or body_top_k,
            headers=request.headers,
        )
        _tag(request, result.model, result.version)
        return PredictionResponse.model_validate(result.to_dict())

    @app.get("/models", tags=["status"])
    async def models() -> dict[str, Any]:
        return {"models": [m.info() for m in service.models()]}

    @app.get("/health/live", tags=["status"])
    async def live() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/health/ready", tags=["status"], responses={503: {"model": ErrorResponse}})
    async def ready() -> JSONResponse:
        ok, details = service.readiness()
        return JSONResponse(
            details, status_code=200 if ok else 503, headers={} if ok else {"Retry-After": "1"}
        )

    @app.get("/metrics", tags=["status"])
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    # --- TorchServe inference API ---------------------------------------------------

    @app.get("/ping", tags=["torchserve"])
    async def ping() -> JSONResponse:
        ok, _ = service.readiness()
        return JSONResponse(
            {"status": "Healthy" if ok else "Unhealthy"}, status_code=200 if ok else 503
        )

    @app.post("/predictions/{name}", tags=["torchserve"], openapi_extra=PREDICT_BODY)
    @app.post("/predictions/{name}/{version}", tags=["torchserve"], openapi_extra=PREDICT_BODY)
    async def predictions(request: Request, name: str, version: str | None = None) -> Any:
        payload, top_k = await _read_payload(request)
        result = await service.apredict(
            payload, model=name, version=version, top_k=top_k, headers=request.headers
        )
        _tag(request, result.model, result.version)
        return protocols.torchserve_body(result)

    # --- Open Inference Protocol (V2) -------------------------------------------------

    @app.get("/v2", tags=["v2"])
    async def v2_server() -> dict[str, Any]:
        return protocols.v2_server_metadata()

    @app.get("/v2/health/live", tags=["v2"])
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"])
    async def v2_ready() -> JSONResponse:
        ok, _ = service.readiness()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"])
    async def v2_model(name: str, version: str | None = None) -> dict[str, Any]:
        return protocols.v2_model_metadata(service, service.get(name, version))

    @app.get("/v2/models/{name}/ready", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"])
    async def v2_model_ready(name: str, version: str | None = None) -> JSONResponse:
        loaded = service.get(name, version)
        return JSONResponse({"name": loaded.name, "ready": loaded.ready})

    @app.post("/v2/models/{name}/infer", tags=["v2"])
    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["v2"])
    async def v2_infer(request: Request, name: str, version: str | None = None) -> Response:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        with service.lease(name, version, headers) as (loaded, route):
            _tag(request, loaded.name, loaded.version)
            v2_request, batch = await asyncio.to_thread(
                protocols.v2_decode, loaded, body, headers, max_items=settings.max_queue_size
            )
            outputs = await service.ainfer_tensor(loaded, batch, route)
            content, out_headers = protocols.v2_encode(loaded, v2_request, outputs)
        return Response(content, headers=out_headers)

    _management_routes(app, Management(service))
    app.add_middleware(MetricsMiddleware, service=service)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(PortGateMiddleware, management_port=settings.management_port)
    return app


class Reason(BaseModel):
    reason: str = Field("", description="Recorded in the model's history.")


class PromoteRequest(Reason):
    version: str = Field(examples=["2"])


class RollbackRequest(Reason):
    to: str | None = Field(
        None,
        description="A version; default: undo the rollout in "
        "progress, else the production version before this one.",
    )


POLICY_EXAMPLES = {
    "canary": {
        "summary": "canary 5% -> 25% -> 50% -> 100%, rolled back on SLO breach",
        "value": {
            "kind": "canary",
            "baseline": "1",
            "candidate": "2",
            "steps": [5, 25, 50, 100],
            "advance": "schedule",
            "interval_s": 60,
            "reason": "try v2",
        },
    },
    "split": {
        "summary": "sticky A/B split by X-User-ID",
        "value": {"kind": "split", "weights": {"1": 0.5, "2": 0.5}},
    },
    "shadow": {
        "summary": "mirror 20% to a candidate, never return its answers",
        "value": {"kind": "shadow", "primary": "1", "candidate": "2", "fraction": 0.2},
    },
    "fixed": {"summary": "everything to one version", "value": {"kind": "fixed", "version": "1"}},
}


def _management_routes(app: FastAPI, m: Management) -> None:
    """``/manage/...``: versions, load/unload, traffic policy, promote, rollback, history."""
    tags: list[str | Enum] = ["management"]

    @app.get("/manage/models", tags=tags)
    async def manage_models() -> dict[str, Any]:
        return await asyncio.to_thread(m.overview)

    @app.get("/manage/models/{name}", tags=tags)
    async def manage_model(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(m.model, name)

    @app.get("/manage/models/{name}/versions", tags=tags)
    async def manage_versions(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(m.versions, name)

    @app.post("/manage/models/{name}/versions/{version}/load", tags=tags)
    async def manage_load(name: str, version: str) -> dict[str, Any]:
        return await asyncio.to_thread(m.load, name, version)

    @app.post("/manage/models/{name}/versions/{version}/unload", tags=tags)
    async def manage_unload(name: str, version: str) -> dict[str, Any]:
        return await asyncio.to_thread(m.unload, name, version)

    @app.get("/manage/models/{name}/policy", tags=tags)
    async def manage_policy(name: str) -> dict[str, Any]:
        return m.policy(name)

    @app.put("/manage/models/{name}/policy", tags=tags)
    async def manage_set_policy(
        name: str, body: Annotated[dict[str, Any], Body(openapi_examples=POLICY_EXAMPLES)]
    ) -> dict[str, Any]:
        return await asyncio.to_thread(m.set_policy, name, body)

    @app.post("/manage/models/{name}/advance", tags=tags)
    async def manage_advance(name: str, body: Reason | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(m.advance, name, body.reason if body else "")

    @app.post("/manage/models/{name}/promote", tags=tags)
    async def manage_promote(name: str, body: PromoteRequest) -> dict[str, Any]:
        return await asyncio.to_thread(m.promote, name, body.version, body.reason)

    @app.post("/manage/models/{name}/rollback", tags=tags)
    async def manage_rollback(name: str, body: RollbackRequest | None = None) -> dict[str, Any]:
        body = body or RollbackRequest()
        return await asyncio.to_thread(m.rollback, name, to=body.to, reason=body.reason)

    @app.get("/manage/models/{name}/history", tags=tags)
    async def manage_history(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(m.history, name)


def _tag(request: Request, model: str, version: str) -> None:
    request.state.model = model
    request.state.version = version


async def _read_payload(request: Request) -> tuple[Payload, int | None]:
    """Multipart (image/file field), JSON, or a raw image / .npy body."""
    kind = payloads.media_type(request.headers.get("content-type"))
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=4, max_fields=16)
        except PayloadTooLargeError:
            raise
        except Exception as exc:
            raise InvalidInputError(f"Malformed multipart body: {exc}") from exc
        try:
            for field in (*IMAGE_FIELDS, *form.keys()):
                value = form.get(field)
                if isinstance(value, UploadFile):
                    top_k = form.get("top_k")
                    return payloads.ImagePayload(await value.read()), payloads.parse_top_k(
                        top_k if isinstance(top_k, str) else None
                    )
        finally:
            await form.close()
        raise payloads.no_file_error()
    return payloads.parse_body(await request.body(), kind)


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` worker processes: settings come from the env."""
    from torchship.settings import load_settings

    # Load before accepting: workers share one listening socket, so a worker that
    # accepted while still loading would answer 503 while its siblings could serve.
    return create_app(load_settings(cls=ServeSettings), load_in_background=False)
