"""Scale-out on Ray Serve: the same predictors and handlers, Ray's replicas and batching.

``torchship serve --engine ray`` (or :func:`serve_ray`) runs one Ray Serve application:
``replicas`` copies of :class:`TorchshipDeployment`, each loading the configured models
with :func:`torchship.runtime.load_predictor` and their handlers, exactly as the
torchship server does. Requests are decoded by the handler in the replica, queued into
Ray's ``@serve.batch`` (max_batch_size and max_delay_ms from the settings), run as one
batch per model and input shape, and answered in torchship's JSON shape. On a cluster,
``RAY_ADDRESS`` (or ``address=``) connects to it instead of starting a local Ray.

``max_batch_size`` "auto" (measured at warm-up by torchship's own server) is 8 here;
each replica gets ``threads`` intra-op threads (default: the cluster's cores shared out
over the replicas).

Endpoints: ``POST /predict`` (same payloads, query and answer as the torchship server),
``GET /models``, ``GET /health/live``, ``GET /health/ready``. Each answer names the
model version and, in ``X-Replica`` and ``X-Batch-Size``, the replica and the batch that
served it.
"""

# No ``from __future__ import annotations`` here: Ray ships the deployment class to its
# workers by value, and FastAPI must find real types (Request, Query) in the route
# signatures there, not names it cannot resolve.
import asyncio
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from torchship.errors import (
    InvalidInputError,
    MissingDependencyError,
    ModelNotFoundError,
    TorchshipError,
)
from torchship.runtime import Predictor, load_predictor, set_threads
from torchship.serving.handlers import Handler, default_handler, load_handler
from torchship.serving.settings import ServeSettings
from torchship.store import ModelStore, parse_ref

log = logging.getLogger("torchship.serving")

APP_NAME = "torchship"


def _require_ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise MissingDependencyError("ray[serve]", "ray", "Serving on Ray Serve") from None
    return ray


@dataclass
class _Item:
    """One input item of one request, waiting in Ray's batch queue."""

    model: str
    tensor: torch.Tensor


@dataclass
class _Served:
    predictor: Predictor
    handler: Handler


def _run_batch(models: dict[str, _Served], items: Sequence[_Item]) -> list[tuple[Any, int]]:
    """Run a Ray batch: one forward pass per (model, shape, dtype) group; each item's
    output (or the exception its group raised) and the size of the batch it ran in."""
    out: list[tuple[Any, int]] = [(None, 0)] * len(items)
    groups: dict[tuple[str, torch.Size, torch.dtype], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.model, item.tensor.shape, item.tensor.dtype), []).append(i)
    for (model, _, _), idxs in groups.items():
        try:
            batch = torch.stack([items[i].tensor for i in idxs])
            results: list[Any] = list(models[model].handler.inference(batch).unbind(0))
        except Exception as exc:  # this group's items fail; other groups are unaffected
            results = [exc] * len(idxs)
        for i, result in zip(idxs, results, strict=True):
            out[i] = (result, len(idxs))
    return out


def _deployment_class(settings: ServeSettings) -> Any:
    """The Ray Serve deployment, defined once Ray is imported (it is an optional extra)."""
    _require_ray()
    from ray import serve

    from torchship.serving.fastapi_app import _read_payload
    from torchship.serving.http import error_response

    api = FastAPI(title="torchship on Ray Serve")
    max_batch = settings.max_batch_size if isinstance(settings.max_batch_size, int) else 8

    @api.exception_handler(TorchshipError)
    @api.exception_handler(Exception)
    async def _errors(request: Request, exc: Exception) -> JSONResponse:
        status, body, headers = error_response(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    # A replica takes at most one batch of requests at a time; the rest go to other replicas.
    @serve.deployment(name="torchship", max_ongoing_requests=max_batch)
    @serve.ingress(api)
    class TorchshipDeployment:
        def __init__(self, config: dict[str, Any]) -> None:
            self.settings = ServeSettings.model_validate(config)
            threads = self.settings.threads_per_worker()
            set_threads(threads)
            store = ModelStore(self.settings.store)
            self.models: dict[str, _Served] = {}
            for ref in self.settings.models:
                runtime, _, _ = self.settings.options_for(parse_ref(ref)[0])
                predictor = load_predictor(
                    store,
                    ref,
                    runtime=runtime,
                    device=self.settings.device,
                    threads=threads,
                    trust_pickle=self.settings.trust_pickle,
                    warmup=self.settings.warmup,
                )
                custom = self.settings.handlers.get(predictor.name)
                handler = load_handler(custom) if custom else default_handler(predictor)
                handler.setup(predictor, max_image_pixels=self.settings.max_image_pixels)
                self.models[predictor.name] = _Served(predictor, handler)
            self.default = next(iter(self.models))
            self.infer.set_max_batch_size(max_batch)  # type: ignore[attr-defined]
            self.infer.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
                self.settings.max_delay_ms / 1000
            )
            self.replica = serve.get_replica_context().replica_id.unique_id

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
        async def infer(self, items: list[_Item]) -> list[tuple[Any, int]]:
            return await asyncio.to_thread(_run_batch, self.models, items)

        def _served(self, name: str | None) -> _Served:
            served = self.models.get(name or self.default)
            if served is None:
                raise ModelNotFoundError(
                    f"Model {name!r} is not served here.",
                    hint=f"Served models: {', '.join(self.models)}.",
                )
            return served

        @api.post("/predict")
        async def predict(
            self,
            request: Request,
            model: str | None = None,
            top_k: int | None = Query(None, ge=1, le=1000),
        ) -> JSONResponse:
            start = time.monotonic()
            served = self._served(model)
            payload, body_top_k = await _read_payload(request)
            batch = await asyncio.to_thread(served.handler.preprocess, payload)
            if batch.ndim == 0 or len(batch) == 0:
                raise InvalidInputError("The request holds no items.")
            if len(batch) > self.settings.max_queue_size:
                raise InvalidInputError(
                    f"The request holds {len(batch)} items; at most "
                    f"{self.settings.max_queue_size} are accepted per request."
                )
            name = served.predictor.name
            answers = await asyncio.gather(*(self.infer(_Item(name, t)) for t in batch.unbind(0)))
            for output, _ in answers:
                if isinstance(output, Exception):
                    raise output
            k = top_k or body_top_k or self.settings.top_k
            predictions = served.handler.postprocess(
                torch.stack([output for output, _ in answers]), top_k=k
            )
            version = served.predictor.version
            body = {
                "model": name,
                "version": version,
                "runtime": served.predictor.runtime,
                "predictions": predictions,
                "latency_ms": round((time.monotonic() - start) * 1000, 3),
            }
            headers = {
                "X-Model-Name": name,
                "X-Model-Version": version,
                "X-Replica": self.replica,
                "X-Batch-Size": str(max(size for _, size in answers)),
            }
            return JSONResponse(body, headers=headers)

        @api.get("/models")
        async def list_models(self) -> dict[str, Any]:
            return {
                "models": [
                    {
                        "name": s.predictor.name,
                        "version": s.predictor.version,
                        "runtime": s.predictor.runtime,
                        "labels": s.predictor.labels,
                    }
                    for s in self.models.values()
                ],
                "replica": self.replica,
            }

        @api.get("/health/live")
        async def live(self) -> dict[str, str]:
            return {"status": "alive"}

        @api.get("/health/ready")
        async def ready(self) -> dict[str, Any]:
            # Ray routes only to replicas whose constructor finished: loaded and warm.
            return {
                "ready": True,
                "models": {f"{n}:{s.predictor.version}": True for n, s in self.models.items()},
            }

    return TorchshipDeployment


def build_app(settings: ServeSettings, *, replicas: int = 1, num_cpus: float = 1.0) -> Any:
    """The Ray Serve application: ``replicas`` copies, each reserving ``num_cpus``."""
    deployment = _deployment_class(settings)
    options = deployment.options(num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus})
    return options.bind(settings.model_dump(mode="json"))


def serve_ray(
    settings: ServeSettings,
    *,
    replicas: int = 1,
    address: str | None = None,
    num_cpus: int | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Start Ray (or connect to ``address``), run the application on settings.host:port,
    and block until SIGTERM/SIGINT (or ``stop``); then drain the replicas and shut down."""
    ray = _require_ray()
    from ray import serve

    if replicas < 1:
        raise InvalidInputError("replicas must be at least 1.")
    stop = stop or threading.Event()
    ray.init(
        address=address,
        num_cpus=num_cpus if address is None else None,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    # after ray.init, which installs its own SIGTERM handler in this process
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        # the cluster's cores shared out over the replicas, as workers share a machine's
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        threads = settings.threads or max(1, int(cpus // replicas))
        settings = settings.model_copy(update={"threads": threads})
        per_replica = round(max(0.1, min(float(threads), cpus / replicas)), 2)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(
            build_app(settings, replicas=replicas, num_cpus=per_replica),
            name=APP_NAME,
            route_prefix="/",
        )
        log.warning(
            "torchship serving %s on Ray Serve at http://%s:%d (%d replica%s, %.2g CPU and "
            "%d thread%s each)",
            ", ".join(settings.models),
            settings.host,
            settings.port,
            replicas,
            "s" if replicas > 1 else "",
            per_replica,
            threads,
            "s" if threads > 1 else "",
        )
        stop.wait()
        log.warning("stopping: draining the Ray Serve replicas")
        serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()
