"""``InferenceService``: the framework-free core every front end adapts.

It owns the loaded models (predictor + handler + dynamic batcher each), resolves
``name[:version]`` to one of them, runs requests through handler -> batcher -> handler,
and answers health questions. FastAPI and Flask routes only translate HTTP to these
calls and back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torchship.batching import BatchScaling, DynamicBatcher, measure_batch_scaling
from torchship.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServiceUnavailableError,
    TorchshipError,
    VersionNotFoundError,
)
from torchship.runtime import Predictor, load_predictor, set_threads
from torchship.serving.handlers import Handler, default_handler, load_handler
from torchship.serving.metrics import ServiceMetrics
from torchship.serving.payloads import Payload
from torchship.serving.settings import ServeSettings
from torchship.store import ModelStore, parse_ref, validate_name

log = logging.getLogger("torchship.serving")

SCALING_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class LoadedModel:
    """One served model version."""

    predictor: Predictor
    handler: Handler
    batcher: DynamicBatcher[torch.Tensor, torch.Tensor]
    load_seconds: float
    scaling: BatchScaling | None = None
    ready: bool = False

    @property
    def name(self) -> str:
        return self.predictor.name

    @property
    def version(self) -> str:
        return self.predictor.version

    def info(self) -> dict[str, Any]:
        spec = self.predictor.input_spec
        return {
            "name": self.name,
            "version": self.version,
            "ready": self.ready,
            "runtime": self.predictor.runtime,
            "device": str(self.predictor.device),
            "runtime_selection": str(self.predictor.selection)
            if self.predictor.selection
            else None,
            "max_batch_size": self.batcher.max_batch_size,
            "max_delay_ms": self.batcher.max_delay_ms,
            "batch_scaling": self.scaling.as_rows() if self.scaling else None,
            "input": spec.model_dump() if spec else None,
            "labels": self.predictor.labels,
            "metrics": self.predictor.manifest.metrics,
            "load_seconds": round(self.load_seconds, 3),
        }


@dataclass
class Prediction:
    """The answer to one request: which version served it and one result per item."""

    model: str
    version: str
    runtime: str
    predictions: list[dict[str, Any]]
    latency_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "runtime": self.runtime,
            "predictions": self.predictions,
            "latency_ms": round(self.latency_ms, 3),
        }


class InferenceService:
    def __init__(self, settings: ServeSettings | None = None, store: ModelStore | None = None):
        self.settings = settings or ServeSettings()
        self.store = store or ModelStore(self.settings.store)
        self.metrics = ServiceMetrics()
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._defaults: dict[str, str] = {}  # name -> default version
        self._order: list[str] = []  # names, first = default model
        self._lock = threading.Lock()
        self._started = False
        self.draining = False

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> InferenceService:
        """Load, warm up and start every configured model (blocking)."""
        if self._started:
            return self
        threads = self.settings.threads_per_worker()
        set_threads(threads)
        for ref in self.settings.models:
            self.load(ref, threads=threads)
        self._started = True
        return self

    def load(
        self, ref: str, *, threads: int | None = None, handler: Handler | None = None
    ) -> LoadedModel:
        s = self.settings
        start = time.monotonic()
        runtime, max_batch_size, max_delay_ms = s.options_for(parse_ref(ref)[0])
        predictor = load_predictor(
            self.store,
            ref,
            runtime=runtime,
            device=s.device,
            threads=threads or s.threads_per_worker(),
            trust_pickle=s.trust_pickle,
            warmup=s.warmup,
        )
        if handler is None:
            custom = s.handlers.get(predictor.name)
            handler = load_handler(custom) if custom else default_handler(predictor)
        handler.setup(predictor, max_image_pixels=s.max_image_pixels)
        scaling = None
        if max_batch_size == "auto":
            scaling = _measure_scaling(predictor) if s.warmup else None
            max_batch = scaling.chosen if scaling else 8
        else:
            max_batch = max_batch_size
        name, version = predictor.name, predictor.version

        def run_batch(items: list[torch.Tensor]) -> list[torch.Tensor]:
            return list(handler.inference(torch.stack(items)).unbind(0))

        batcher: DynamicBatcher[torch.Tensor, torch.Tensor] = DynamicBatcher(
            run_batch,
            max_batch_size=max_batch,
            max_delay_ms=max_delay_ms,
            max_queue_size=s.max_queue_size,
            timeout_s=s.timeout_s,
            name=f"{name}:{version}",
            on_batch=lambda event: self.metrics.on_batch(name, version, event),
        )
        batcher.start()
        loaded = LoadedModel(predictor, handler, batcher, time.monotonic() - start, scaling, True)
        with self._lock:
            old = self._models.get((name, version))
            self._models[(name, version)] = loaded
            if name not in self._defaults:
                self._defaults[name] = version
                self._order.append(name)
        if old is not None:
            old.batcher.stop(drain=True)
        self.metrics.load_seconds.labels(name, version).set(loaded.load_seconds)
        self.metrics.ready.labels(name, version).set(1)
        log.info(
            "loaded %s:%s runtime=%s max_batch_size=%d in %.2fs%s",
            name,
            version,
            predictor.runtime,
            max_batch,
            loaded.load_seconds,
            f" ({predictor.selection})" if predictor.selection else "",
        )
        return loaded

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish the queued ones when ``drain``."""
        self.draining = True
        with self._lock:
            models = list(self._models.values())
        for m in models:
            m.ready = False
            m.batcher.stop(drain=drain, timeout=timeout or self.settings.graceful_timeout_s)
            self.metrics.ready.labels(m.name, m.version).set(0)
            m.predictor.close()

    # --- lookup ---------------------------------------------------------------------

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def model_names(self) -> list[str]:
        return list(self._order)

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return [v for (n, v) in self._models if n == name]

    def get(self, name: str | None = None, version: str | None = None) -> LoadedModel:
        """Resolve a request's model and version (aliases via the store) to a loaded one."""
        if name is not None:
            validate_name(name)
        if version is not None:
            validate_name(version, "version or alias")
        with self._lock:
            if not self._order:
                raise ModelNotReadyError("No model is loaded yet.", retry_after=1.0)
            if name is None:
                name = self._order[0]
            if name not in self._defaults:
                raise ModelNotFoundError(
                    f"Model {name!r} is not served here.",
                    hint=f"Served models: {', '.join(self._order)}.",
                )
            version = version or self._defaults[name]
            loaded = self._models.get((name, version))
            if loaded is None:
                aliased = self._resolve_alias(name, version)
                loaded = self._models.get((name, aliased)) if aliased else None
            if loaded is None:
                served = [v for (n, v) in self._models if n == name]
                raise VersionNotFoundError(
                    f"Model {name!r} has no served version {version!r}.",
                    hint=f"Served versions: {', '.join(served)}.",
                )
        if not loaded.ready or self.draining:
            raise ModelNotReadyError(f"{name}:{loaded.version} is not ready.", retry_after=1.0)
        return loaded

    def _resolve_alias(self, name: str, alias: str) -> str | None:
        try:
            return self.store.resolve(name, alias)
        except TorchshipError:
            return None

    def get_ref(self, ref: str) -> LoadedModel:
        name, version = parse_ref(ref)
        return self.get(name, version)

    # --- inference ------------------------------------------------------------------

    def predict(
        self,
        payload: Payload,
        *,
        model: str | None = None,
        version: str | None = None,
        top_k: int | None = None,
    ) -> Prediction:
        """Blocking path (Flask/gunicorn threads)."""
        start = time.monotonic()
        loaded = self.get(model, version)
        batch = loaded.handler.preprocess(payload)
        return self._finish(loaded, self._run_items(loaded, batch), top_k, start)

    async def apredict(
        self,
        payload: Payload,
        *,
        model: str | None = None,
        version: str | None = None,
        top_k: int | None = None,
    ) -> Prediction:
        """Async path (FastAPI): decoding in a worker thread, inference on the batcher's."""
        start = time.monotonic()
        loaded = self.get(model, version)
        batch = await asyncio.to_thread(loaded.handler.preprocess, payload)
        return self._finish(loaded, await self._arun_items(loaded, batch), top_k, start)

    def infer_tensor(self, loaded: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._run_items(loaded, batch))

    async def ainfer_tensor(self, loaded: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack(await self._arun_items(loaded, batch))

    def _run_items(self, loaded: LoadedModel, batch: torch.Tensor) -> list[torch.Tensor]:
        """Queue every item of one request, then wait for all under one deadline."""
        items = self._split(batch)
        timeout = self.settings.timeout_s
        deadline = time.monotonic() + timeout
        futures: list[concurrent.futures.Future[torch.Tensor]] = []
        try:
            for item in items:
                futures.append(loaded.batcher.submit_future(item, timeout))
            return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
        except concurrent.futures.TimeoutError:
            raise RequestTimeoutError(f"The request took longer than {timeout:g} s.") from None
        finally:
            for f in futures:
                f.cancel()  # no-op for finished ones; withdraws the rest on failure

    async def _arun_items(self, loaded: LoadedModel, batch: torch.Tensor) -> list[torch.Tensor]:
        items = self._split(batch)
        tasks = [asyncio.ensure_future(loaded.batcher.asubmit(item)) for item in items]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()  # no-op for finished ones; withdraws the rest on failure/disconnect

    def _split(self, batch: torch.Tensor) -> list[torch.Tensor]:
        items = _items(batch)
        if len(items) > self.settings.max_queue_size:
            raise InvalidInputError(
                f"The request holds {len(items)} items; at most "
                f"{self.settings.max_queue_size} are accepted per request.",
                hint="Split it, or use torchship batch for offline jobs.",
            )
        return items

    def _finish(
        self,
        loaded: LoadedModel,
        outputs: Sequence[torch.Tensor],
        top_k: int | None,
        start: float,
    ) -> Prediction:
        k = top_k or self.settings.top_k
        if k < 1:
            raise InvalidInputError("top_k must be at least 1.")
        results = loaded.handler.postprocess(torch.stack(list(outputs)), top_k=k)
        return Prediction(
            model=loaded.name,
            version=loaded.version,
            runtime=loaded.predictor.runtime,
            predictions=results,
            latency_ms=(time.monotonic() - start) * 1000,
        )

    # --- health ---------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready only when every configured model is loaded and warm, and not draining."""
        models = self.models()
        status = {f"{m.name}:{m.version}": m.ready for m in models}
        ready = (
            self._started
            and not self.draining
            and bool(models)
            and all(status.values())
            and len(self._order) >= len({parse_ref(r)[0] for r in self.settings.models})
        )
        return ready, {"ready": ready, "draining": self.draining, "models": status}

    def check_ready(self) -> None:
        ready, _ = self.readiness()
        if not ready:
            raise ServiceUnavailableError(
                "Not ready: " + ("draining." if self.draining else "models still loading."),
                retry_after=1.0,
            )


def _items(batch: torch.Tensor) -> list[torch.Tensor]:
    if batch.ndim == 0 or len(batch) == 0:
        raise InvalidInputError("The request holds no items.")
    return list(batch.unbind(0))


def _measure_scaling(predictor: Predictor) -> BatchScaling | None:
    """Measure items/s against batch size on real examples and cap where it stops paying."""
    samples = {n: predictor.sample_batch(n) for n in SCALING_SIZES}
    if any(v is None for v in samples.values()):
        return None

    def run(n: int) -> None:
        predictor.predict(samples[n])  # type: ignore[arg-type]

    scaling = measure_batch_scaling(run, SCALING_SIZES, budget_s=1.0)
    log.info("%s batch scaling:\n%s", predictor.manifest.ref, scaling.table())
    return scaling


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
