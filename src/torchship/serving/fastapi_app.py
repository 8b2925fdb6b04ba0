"""FastAPI front end: routes translate HTTP to :class:`InferenceService` calls and back."""

from __future__ import annotations

import asyncio
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
from starlette.routing import Route

from torchship import __version__
from torchship.errors import (
    InvalidInputError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    RouteNotFoundError,
    TorchshipError,
)
from torchship.monitoring.asgi import RequestMonitorMiddleware
from torchship.monitoring.requests import RequestObserver
from torchship.serving import docs_page, mar_models, payloads, protocols, status_page, v2
from torchship.serving.http import dumps, error_response, start_in_background, stop_loading
from torchship.serving.management import Management
from torchship.serving.metrics import PROMETHEUS_CONTENT_TYPE
from torchship.serving.payloads import IMAGE_FIELDS, Payload
from torchship.serving.policies import Gate
from torchship.serving.policies.asgi import EdgeMiddleware
from torchship.serving.policies.lifecycle import install_drain_delay
from torchship.serving.service import InferenceService
from torchship.serving.settings import ServeSettings
from torchship.serving.torchserve_api import PREFIX as TS_PREFIX
from torchship.serving.torchserve_api import TorchServeManagement, TorchServePathsASGI

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


_V2_TENSOR: dict[str, Any] = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": sorted(v2.DATATYPES)},
        "data": {"type": "array", "description": "Row-major values (nested or flat)."},
        "parameters": {"type": "object"},
    },
}
V2_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            v2.JSON_CONTENT_TYPE: {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _V2_TENSOR, "minItems": 1},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                },
                "examples": {
                    "digit": {
                        "summary": "one 1x8x8 digit for the digits model, FP32 row-major",
                        "value": {
                            "inputs": [
                                {
                                    "name": "input",
                                    "shape": [1, 1, 8, 8],
                                    "datatype": "FP32",
                                    "data": [0.0] * 64,
                                }
                            ]
                        },
                    }
                },
            },
            v2.BINARY_CONTENT_TYPE: {
                "schema": {"type": "string", "format": "binary"},
                "description": "Triton's binary tensor extension: the JSON header, then the "
                "raw tensors; the Inference-Header-Content-Length header gives its length.",
            },
        },
    }
}


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
        loader = None
        if load_in_background:
            loader = start_in_background(service)
        else:
            await asyncio.to_thread(service.start)
        install_drain_delay(service.begin_drain, settings.drain_delay_s)
        yield
        if loader is not None:  # stopped while the models load: see start_in_background
            await asyncio.to_thread(stop_loading, service, loader)
        await asyncio.to_thread(service.stop, True)

    app = FastAPI(
        title="torchship",
        version=__version__,
        summary="PyTorch models served with dynamic batching.",
        description="torchship's REST API, the Open Inference Protocol (V2) and "
        "TorchServe's inference API, over one inference core.",
        lifespan=lifespan,
        docs_url=None,  # ours below: FastAPI's load their scripts from a CDN
        redoc_url=None,
        openapi_url=docs_page.OPENAPI_PATH,
        telemetry=None
        if settings.opentelemetry
        else {"tracing": False, "metrics": False, "logs": False},
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
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):  # not the body.0 field path
            (first,) = [e for e in errors if e.get("type") == "json_invalid"][:1]
            details = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'syntax')})"
        else:
            details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        status, body, headers = error_response(InvalidInputError(f"Invalid request: {details}"))
        return JSONResponse(body, status_code=status, headers=headers)

    # --- torchship API -----------------------------------------------------------

    @app.get("/", tags=["status"], summary="The status page for browsers; JSON otherwise.")
    async def index(request: Request) -> Response:
        # every Accept header, joined as the gate saw them: it let a page request in
        if status_page.wants_html(", ".join(request.headers.getlist("accept"))):
            return Response(status_page.page(), media_type=status_page.HTML)
        return JSONResponse(status_page.index(service))

    @app.get(status_page.STATUS_PATH, tags=["status"])
    async def status() -> dict[str, Any]:
        return await asyncio.to_thread(status_page.status, service)

    @app.get(status_page.STATIC_PREFIX + "{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        found = status_page.asset(name)
        if found is None:
            raise RouteNotFoundError(f"No asset {name!r}.")
        return Response(
            found[0],
            media_type=found[1],
            headers={"Cache-Control": status_page.ASSET_CACHE_CONTROL},
        )

    @app.get(docs_page.DOCS_PATH, include_in_schema=False)
    @app.get(docs_page.REDOC_PATH, include_in_schema=False)
    async def docs(request: Request) -> Response:
        return Response(docs_page.page(request.url.path), media_type=status_page.HTML)

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
    ) -> Response:
        return await predict_request(request)

    async def predict_request(request: Request) -> Response:
        query = request.query_params
        payload, body_top_k = await _read_payload(request)
        result = await service.apredict(
            payload,
            model=query.get("model"),
            version=query.get("version"),
            top_k=payloads.parse_top_k(query.get("top_k")) or body_top_k,
            headers=request.headers,
        )
        _tag(request, result.model, result.version, result.extra.get("cache"))
        # Serialised directly: the dict already has the documented shape, and
        # re-validating it through the response model costs ~5% of a small request.
        return Response(dumps(result.to_dict()), media_type="application/json")

    # The hot path skips FastAPI's dependency solving (a tenth of a small request):
    # a plain Starlette route ahead of the documented one answers /predict; the
    # APIRoute above stays for the OpenAPI schema and parses the same query itself.
    app.router.routes.insert(
        0, Route("/predict", predict_request, methods=["POST"], include_in_schema=False)
    )

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

    @app.get("/health/startup", tags=["status"], responses={503: {"model": ErrorResponse}})
    async def startup() -> JSONResponse:
        ok, details = service.startup()
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
        if mar_models.serves_archive(service, name):  # the archive's own handler answers
            raw = await _read_archive_request(request)
            loaded, answer = await mar_models.apredict(service, raw, name, version, request.headers)
            _tag(request, loaded.name, loaded.version)
            return Response(answer.body, status_code=answer.status, headers=answer.headers)
        payload, top_k = await _read_payload(request)
        result = await service.apredict(
            payload, model=name, version=version, top_k=top_k, headers=request.headers
        )
        _tag(request, result.model, result.version, result.extra.get("cache"))
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
        return JSONResponse({"ready": ok}, status_code=200 if ok else protocols.V2_NOT_READY)

    @app.get("/v2/models/{name}", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"])
    async def v2_model(name: str, version: str | None = None) -> dict[str, Any]:
        return protocols.v2_model_metadata(service, service.get(name, version))

    @app.get("/v2/models/{name}/ready", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"])
    async def v2_model_ready(name: str, version: str | None = None) -> JSONResponse:
        body, status = protocols.v2_model_ready(service, name, version)
        return JSONResponse(body, status_code=status)

    @app.post("/v2/models/{name}/infer", tags=["v2"], openapi_extra=V2_INFER_BODY)
    @app.post(
        "/v2/models/{name}/versions/{version}/infer", tags=["v2"], openapi_extra=V2_INFER_BODY
    )
    async def v2_infer(request: Request, name: str, version: str | None = None) -> Response:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        with service.lease(name, version, headers) as (loaded, route):
            _tag(request, loaded.name, loaded.version)
            began = time.monotonic()
            v2_request, batch = await asyncio.to_thread(
                protocols.v2_decode, loaded, body, headers, max_items=settings.max_queue_size
            )
            service.metrics.observe_preprocess(
                loaded.name, loaded.version, time.monotonic() - began
            )
            outputs = await service.ainfer_tensor(loaded, batch, route)
            content, out_headers = protocols.v2_encode(loaded, v2_request, outputs)
        return Response(content, headers=out_headers)

    _management_routes(app, Management(service))
    _torchserve_routes(app, TorchServeManagement(service))
    gate = Gate.from_settings(settings)
    app.add_middleware(  # CORS, security headers, management port, 413, auth, rate limits
        EdgeMiddleware,
        gate=gate,
        draining=lambda: service.draining,
        max_body_bytes=settings.max_body_bytes,
        management_port=settings.management_port,
    )
    # Outermost: request id, metrics and access line for every request, also those the
    # middleware above refuses; unexpected errors become one logged 500 here.
    app.add_middleware(
        RequestMonitorMiddleware, observer=RequestObserver.from_settings(service.metrics, settings)
    )
    # TorchServe's management paths (/models...) on the management port -> /manage/torchserve
    app.add_middleware(TorchServePathsASGI, management_port=settings.management_port)
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


def _tag(request: Request, model: str, version: str, cache: str | None = None) -> None:
    request.state.model = model
    request.state.version = version
    if cache:  # X-Cache: HIT / MISS / BYPASS
        request.state.cache = cache


def _torchserve_routes(app: FastAPI, ts: TorchServeManagement) -> None:
    """TorchServe's management API under ``/manage/torchserve`` (and, on the management
    port, at TorchServe's own ``/models...`` paths)."""
    tags: list[str | Enum] = ["torchserve management"]
    models = f"{TS_PREFIX}/models"

    def answer(result: tuple[int, dict[str, str]]) -> JSONResponse:
        return JSONResponse(result[1], status_code=result[0])

    @app.get(models, tags=tags)
    async def ts_list(limit: str | None = None, next_page_token: str | None = None) -> Any:
        return ts.list_models(limit, next_page_token)

    @app.post(models, tags=tags)
    async def ts_register(request: Request) -> JSONResponse:
        return answer(await asyncio.to_thread(ts.register, dict(request.query_params)))

    @app.get(models + "/{name}", tags=tags)
    @app.get(models + "/{name}/{version}", tags=tags)
    async def ts_describe(name: str, version: str | None = None) -> Any:
        return ts.describe(name, version)

    @app.put(models + "/{name}", tags=tags)
    @app.put(models + "/{name}/{version}", tags=tags)
    async def ts_scale(request: Request, name: str, version: str | None = None) -> JSONResponse:
        params = dict(request.query_params)
        return answer(await asyncio.to_thread(ts.scale, name, version, params))

    @app.put(models + "/{name}/{version}/set-default", tags=tags)
    async def ts_set_default(name: str, version: str) -> Any:
        return await asyncio.to_thread(ts.set_default, name, version)

    @app.delete(models + "/{name}", tags=tags)
    @app.delete(models + "/{name}/{version}", tags=tags)
    async def ts_unregister(name: str, version: str | None = None) -> Any:
        return await asyncio.to_thread(ts.unregister, name, version)


async def _read_archive_request(request: Request) -> mar_models.ArchiveRequest:
    """The request as TorchServe hands it to a handler (form fields, or the body)."""
    kind = payloads.media_type(request.headers.get("content-type"))
    form = None
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields = []
        try:
            parsed = await request.form(max_files=16, max_fields=64)
        except Exception as exc:
            raise InvalidInputError(f"Malformed form body: {exc}") from exc
        try:
            for field, value in parsed.multi_items():
                if isinstance(value, UploadFile):
                    fields.append(
                        mar_models.FormField(field, await value.read(), value.content_type)
                    )
                else:
                    fields.append(mar_models.FormField(field, value))
        finally:
            await parsed.close()
        form = fields
    body = b"" if form is not None else await request.body()
    return mar_models.archive_request(
        body,
        request.headers.get("content-type"),
        request.headers,
        request.query_params.multi_items(),
        form,
    )


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
    from torchship.monitoring.logs import configure_logging
    from torchship.settings import load_settings

    settings = load_settings(cls=ServeSettings)
    configure_logging(settings.log_format, access_log=settings.access_log)
    # Load before accepting: workers share one listening socket, so a worker that
    # accepted while still loading would answer 503 while its siblings could serve.
    return create_app(settings, load_in_background=False)
