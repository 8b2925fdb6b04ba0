"""``InferenceService``: the framework-free core every front end adapts.

It owns the loaded models (predictor + handler + dynamic batcher each), resolves
``name[:version]`` to one of them, runs requests through handler -> batcher -> handler,
and answers health questions. FastAPI and Flask routes only translate HTTP to these
calls and back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchship._startup import resume_gc
from torchship.batching import BatchScaling, DynamicBatcher, measure_batch_scaling
from torchship.batching.scaling import BatchMeasurement
from torchship.errors import (
    ConflictError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServiceUnavailableError,
    TorchshipError,
    VersionNotFoundError,
)
from torchship.monitoring.logs import note_model
from torchship.rollout import Route
from torchship.runtime import Predictor, load_predictor, set_threads
from torchship.runtime.tuning import TuningCache, tuning_key
from torchship.serving.handlers import Handler, default_handler, load_handler
from torchship.serving.metrics import ServiceMetrics
from torchship.serving.payloads import ImagePayload, Payload
from torchship.serving.policies.cache import (
    BYPASS,
    HIT,
    MISS,
    ResponseCache,
    cache_control,
    model_fingerprint,
)
from torchship.serving.settings import ServeSettings, archive_spec
from torchship.serving.traffic import Traffic
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
    _leases: int = 0
    _idle: threading.Condition = field(default_factory=threading.Condition)

    @property
    def name(self) -> str:
        return self.predictor.name

    def acquire(self) -> None:
        with self._idle:
            self._leases += 1

    def release(self) -> None:
        with self._idle:
            self._leases -= 1
            if self._leases == 0:
                self._idle.notify_all()

    def retire(self, timeout: float) -> None:
        """After it left routing: let requests that already chose it finish, then stop.

        Zero downtime: a request holds a lease from routing to response, so a swap
        or unload never pulls the batcher from under it.
        """
        self.ready = False
        with self._idle:
            self._idle.wait_for(lambda: self._leases == 0, timeout)
        self.batcher.stop(drain=True, timeout=timeout)
        self.predictor.close()

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
            "batches_on": "event loop" if self.batcher.inline else "worker thread",
            "batch_scaling": self.scaling.as_rows() if self.scaling else None,
            "batch_scaling_remembered": bool(self.scaling and self.scaling.cached),
            "batch_scaling_not_timed": {str(k): v for k, v in self.scaling.skipped.items()}
            if self.scaling
            else {},
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
        self.tuning = TuningCache(
            self.store.root, enabled=self.settings.tuning_cache, refresh=self.settings.retune
        )
        self.metrics = ServiceMetrics()
        self.metrics.readiness = lambda: self.readiness()[0]
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._defaults: dict[str, str] = {}  # name -> default version
        self._order: list[str] = []  # names, first = default model
        self._lock = threading.Lock()
        self._started = False
        self.draining = False  # not ready (SIGTERM seen); still serves until _stopping
        self._stopping = False
        self.cache = ResponseCache.from_settings(self.settings)
        self._fingerprints: dict[tuple[str, str], str] = {}
        self.admin_lock = threading.RLock()  # serialises load/unload/policy changes
        self.traffic = Traffic(self.store, admin_lock=self.admin_lock)
        self.load_errors: dict[str, str] = {}
        self._failed_at_start: set[str] = set()  # configured refs that did not load

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> InferenceService:
        """Load, warm up and start every configured model (blocking).

        A model that fails to load is recorded in ``load_errors`` (readiness and
        ``/status`` show why) and the others still load: the server is not ready, but
        it says so, and serves what it can.
        """
        if self._started:
            return self
        threads = self.settings.threads_per_worker()
        set_threads(threads)
        for ref in self.settings.models:
            if self._stopping:  # stopped while loading (SIGTERM at start-up): no more
                return self
            try:
                self.load(ref, threads=threads)
            except Exception as exc:
                self._failed_at_start.add(ref)
                if isinstance(exc, TorchshipError):
                    self.load_errors[ref] = str(exc)
                    log.error("%s was not loaded: %s", ref, exc)
                else:
                    self.load_errors[ref] = f"{type(exc).__name__}: {exc}"
                    log.exception("%s was not loaded", ref)
        if self._stopping:
            return self
        for name in self._order:
            self.traffic.attach(
                name,
                self._defaults[name],
                functools.partial(self._ensure, name),
                self._archive_state(name),
            )
        self.traffic.start()
        if self.settings.gc_freeze:
            gc.freeze()  # see ServeSettings.gc_freeze: no 100 ms full collections later
        resume_gc()  # paused by the CLI for the start-up (torchship._startup)
        self._started = True
        self.metrics.server_ready.set(1 if self.readiness()[0] else 0)
        return self

    def _runs_inline(
        self,
        predictor: Predictor,
        handler: Handler,
        max_batch: int,
        scaling: BatchScaling | None,
    ) -> bool:
        """Whether this model's batches run on the event loop (see DynamicBatcher).

        Only the stock ``inference`` on a CPU, and only when the largest batch was
        measured under ``inline_batch_ms``: the event loop must never stall on a model.
        """
        limit_s = self.settings.inline_batch_ms / 1000
        if limit_s <= 0 or predictor.device.type != "cpu":
            return False
        if type(handler).inference is not Handler.inference:
            return False  # a custom inference hook may block or take its time
        if scaling is not None:
            timed = [m.seconds_per_batch for m in scaling.measurements if m.batch_size >= max_batch]
            if timed:
                return min(timed) <= limit_s
        sample = predictor.sample_batch(max_batch) if self.settings.warmup else None
        if sample is None:
            return False
        best = math.inf
        try:
            for _ in range(3):
                began = time.perf_counter()
                predictor.predict(sample)
                best = min(best, time.perf_counter() - began)
        except Exception:  # the model's failures are for requests to meet, not start-up
            log.warning(
                "%s: timing a batch failed; batches run on a worker thread",
                predictor.manifest.ref,
                exc_info=True,
            )
            return False
        return best <= limit_s

    def _ensure(self, name: str, version: str) -> bool:
        """Load ``name:version`` if it is not loaded; False (and recorded) if it fails."""
        if (name, version) in self._models:
            return True
        try:
            self.load(f"{name}:{version}")
        except Exception as exc:
            self.load_errors[f"{name}:{version}"] = str(exc)
            log.exception("could not load %s:%s", name, version)
            return False
        return True

    def load(
        self, ref: str, *, threads: int | None = None, handler: Handler | None = None
    ) -> LoadedModel:
        """Load, warm up and put ``ref`` into service; a start-up failure of the same ref
        is forgotten once it loads (e.g. through the management API)."""
        loaded = self._load(ref, threads=threads, handler=handler)
        self._failed_at_start.discard(ref)
        self.load_errors.pop(ref, None)
        return loaded

    def _load(
        self, ref: str, *, threads: int | None = None, handler: Handler | None = None
    ) -> LoadedModel:
        if archive_spec(ref) is not None:  # a TorchServe .mar: its own handler serves it
            from torchship.serving.mar_models import load_archive

            archived = load_archive(self, ref)
            self.install(archived)
            return archived
        s = self.settings
        start = time.monotonic()
        runtime, max_batch_size, max_delay_ms = s.options_for(parse_ref(ref)[0])
        predictor: Predictor | None = None
        try:
            predictor = load_predictor(
                self.store,
                ref,
                runtime=runtime,
                device=s.device,
                threads=threads or s.threads_per_worker(),
                trust_pickle=s.trust_pickle,
                warmup=s.warmup,
                tuning=self.tuning,
            )
            if handler is None:
                custom = s.handlers.get(predictor.name)
                handler = load_handler(custom) if custom else default_handler(predictor)
            handler.setup(predictor, max_image_pixels=s.max_image_pixels)
            scaling = None
            if max_batch_size == "auto":
                scaling = (
                    _measure_scaling(predictor, self.tuning, s.max_batch_ms / 1000)
                    if s.warmup
                    else None
                )
                max_batch = scaling.chosen if scaling else 8
            else:
                max_batch = max_batch_size
        except TorchshipError:
            if predictor is not None:
                predictor.close()
            raise
        except Exception as exc:  # the model itself failed: it never takes traffic
            if predictor is not None:
                predictor.close()
            log.exception("%s failed to load or warm up", ref)
            raise ModelLoadError(
                f"{ref} failed to load or warm up: {type(exc).__name__}: {exc}",
                hint="It was not put into service; fix the model and load it again.",
            ) from exc
        name, version = predictor.name, predictor.version

        def run_batch(items: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
            if len({(t.shape, t.dtype) for t in items}) == 1:
                return list(handler.inference(torch.stack(items)).unbind(0))
            # Only models without an input spec can get mixed shapes: one sub-batch per
            # shape, so one odd request cannot fail the requests batched with it.
            out: list[torch.Tensor | Exception] = [*items]
            groups: dict[tuple[torch.Size, torch.dtype], list[int]] = {}
            for i, t in enumerate(items):
                groups.setdefault((t.shape, t.dtype), []).append(i)
            for idxs in groups.values():
                results: list[torch.Tensor | Exception]
                try:
                    results = [*handler.inference(torch.stack([items[i] for i in idxs])).unbind(0)]
                except Exception as exc:
                    results = [exc] * len(idxs)
                for i, r in zip(idxs, results, strict=True):
                    out[i] = r
            return out

        inline = self._runs_inline(predictor, handler, max_batch, scaling)
        batcher: DynamicBatcher[torch.Tensor, torch.Tensor] = DynamicBatcher(
            run_batch,
            inline=inline,
            max_batch_size=max_batch,
            max_delay_ms=max_delay_ms,
            max_queue_size=s.max_queue_size,
            timeout_s=s.timeout_s,
            name=f"{name}:{version}",
            on_batch=lambda event: self.metrics.on_batch(name, version, event),
        )
        batcher.start()
        loaded = LoadedModel(predictor, handler, batcher, time.monotonic() - start, scaling, True)
        self.install(loaded)
        log.info(
            "loaded %s:%s runtime=%s max_batch_size=%d batches on the %s in %.2fs%s",
            name,
            version,
            predictor.runtime,
            max_batch,
            "event loop" if inline else "worker thread",
            loaded.load_seconds,
            f" ({predictor.selection})" if predictor.selection else "",
        )
        return loaded

    def install(self, loaded: LoadedModel) -> None:
        """Put a loaded version into service (replacing a loaded one of the same version).
        A model name new to a started service gets its traffic router here."""
        name, version = loaded.name, loaded.version
        with self._lock:
            old = self._models.get((name, version))
            self._models[(name, version)] = loaded
            new_name = name not in self._defaults
            if new_name:
                self._defaults[name] = version
                self._order.append(name)
        self._fingerprints[(name, version)] = model_fingerprint(loaded)
        if new_name and self._started:
            self.traffic.attach(
                name, version, functools.partial(self._ensure, name), self._archive_state(name)
            )
        if old is not None:
            old.retire(self.settings.graceful_timeout_s)
            self._invalidate(name, version)
        self.metrics.model_loaded(name, version, loaded.load_seconds)

    def _archive_state(self, name: str) -> Path | None:
        """Where an archive model keeps its traffic policy and history: beside the
        archives, in ``.torchship/NAME`` (hidden from ``--models all``); None for a store
        model (its own folder in the store)."""
        from torchship.serving.mar_models import archive_of

        loaded = self._models.get((name, self._defaults[name]))
        archive = archive_of(loaded) if loaded is not None else None
        if archive is None:
            return None
        base = self.settings.model_store or archive.info.path.parent
        return Path(base) / ".torchship" / name

    def unload(self, name: str, version: str, *, remove_model: bool = False) -> None:
        """Stop serving one version: out of routing first, then its queue drains.

        The last loaded version of a model goes only with ``remove_model`` (TorchServe's
        unregister), and the model with it."""
        with self._lock:
            loaded = self._models.get((name, version))
            if loaded is None:
                raise VersionNotFoundError(f"{name}:{version} is not loaded.")
            others = [v for (n, v) in self._models if n == name and v != version]
            if not others and not remove_model:
                raise ConflictError(
                    f"{name}:{version} is the only loaded version of {name}.",
                    hint="Load another version first.",
                )
            del self._models[(name, version)]
            if not others:
                del self._defaults[name]
                self._order.remove(name)
            elif self._defaults[name] == version:
                self._defaults[name] = others[0]
        loaded.retire(self.settings.graceful_timeout_s)
        self._invalidate(name, version)
        self.metrics.model_stopped(name, version)

    def abandon_start(self) -> None:
        """A start-up on another thread loads no model after the one in hand (see
        ``http.start_in_background``); call :meth:`stop` once that thread is done."""
        self.draining = True
        self._stopping = True

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish the queued ones when ``drain``."""
        self.abandon_start()  # not ready, and a start-up in progress loads no more
        self.traffic.stop()
        with self._lock:
            models = list(self._models.values())
        limit = timeout or self.settings.graceful_timeout_s
        for m in models:
            if drain:
                m.retire(limit)
            else:
                m.ready = False
                m.batcher.stop(drain=False, timeout=limit)
                m.predictor.close()
            self.metrics.model_stopped(m.name, m.version)
        self.metrics.server_ready.set(0)

    # --- lookup ---------------------------------------------------------------------

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def model_names(self) -> list[str]:
        return list(self._order)

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return [v for (n, v) in self._models if n == name]

    def get(
        self, name: str | None = None, version: str | None = None, *, lease: bool = False
    ) -> LoadedModel:
        """Resolve a request's model and version (aliases via the store) to a loaded one.

        With ``lease`` the caller must ``release()`` it when the request is done.
        """
        if name is not None:
            validate_name(name)
        if version is not None:
            validate_name(version, "version or alias")
        with self._lock:
            if not self._order:
                if self._started and self.load_errors:
                    raise ModelNotReadyError(
                        "No model could be loaded: "
                        + "; ".join(f"{r}: {e}" for r, e in self.load_errors.items()),
                        retry_after=30.0,
                        hint="Fix the configuration and restart, or load a model through "
                        "the management API.",
                    )
                raise ModelNotReadyError("No model is loaded yet.", retry_after=1.0)
            if name is None:
                name = self._order[0]
            if name not in self._defaults:
                raise ModelNotFoundError(
                    f"Model {name!r} is not served here.",
                    hint=f"Served models: {', '.join(self._order)}.",
                )
            version = version or self._defaults[name]
            key: str | None = version if (name, version) in self._models else None
        if key is None:  # perhaps an alias: one small file read, outside the lock
            key = self._resolve_alias(name, version)
        with self._lock:
            loaded = self._models.get((name, key)) if key else None
            if loaded is None:
                served = [v for (n, v) in self._models if n == name]
                raise VersionNotFoundError(
                    f"Model {name!r} has no served version {version!r}.",
                    hint=f"Served versions: {', '.join(served)}.",
                )
            if not loaded.ready or self._stopping:
                raise ModelNotReadyError(f"{name}:{loaded.version} is not ready.", retry_after=1.0)
            if lease:  # under the lock, so an unload cannot retire it in between
                loaded.acquire()
        return loaded

    def _resolve_alias(self, name: str, alias: str) -> str | None:
        try:
            return self.store.aliases(name).get(alias)
        except (OSError, ValueError):
            return None

    def get_ref(self, ref: str) -> LoadedModel:
        name, version = parse_ref(ref)
        return self.get(name, version)

    # --- inference ------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(
        self,
        name: str | None,
        version: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[tuple[LoadedModel, Route | None]]:
        """The loaded version for one request, held until the request is done: pinned if
        it names one, else chosen by the model's traffic policy (fixed, split, canary,
        shadow)."""
        route = None
        if version is None:
            if name is None:
                name = self._order[0] if self._order else None
            else:
                validate_name(name)
            route = self.traffic.route(name, headers) if name else None
        loaded = self.get(name, route.version if route else version, lease=True)
        note_model(loaded.name, loaded.version)  # on the request's log lines and metrics
        try:
            yield loaded, route
        finally:
            loaded.release()

    def predict(
        self,
        payload: Payload,
        *,
        model: str | None = None,
        version: str | None = None,
        top_k: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Prediction:
        """Blocking path (Flask/gunicorn threads)."""
        start = time.monotonic()
        with self.lease(model, version, headers) as (loaded, route):
            cached, key, status = self._cached(loaded, payload, top_k, headers, start)
            if cached is not None:
                return cached
            with self._observed(loaded, route, start):
                began = time.monotonic()
                batch = loaded.handler.preprocess(payload)
                self.metrics.observe_preprocess(
                    loaded.name, loaded.version, time.monotonic() - began
                )
                outputs = self._run_items(loaded, batch)
            self._mirror(loaded, route, batch, outputs)
            result = self._finish(loaded, outputs, top_k, start)
            self._remember(key, status, result)
            return result

    async def apredict(
        self,
        payload: Payload,
        *,
        model: str | None = None,
        version: str | None = None,
        top_k: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Prediction:
        """Async path (FastAPI): decoding in a worker thread, inference on the batcher's."""
        start = time.monotonic()
        with self.lease(model, version, headers) as (loaded, route):
            if self.cache is not None and (self.cache.remote or _large(payload)):
                cached, key, status = await asyncio.to_thread(
                    self._cached, loaded, payload, top_k, headers, start
                )
            else:
                cached, key, status = self._cached(loaded, payload, top_k, headers, start)
            if cached is not None:
                return cached
            with self._observed(loaded, route, start):
                began = time.monotonic()
                if loaded.handler.cheap(payload):  # a thread hop would cost more
                    batch = loaded.handler.preprocess(payload)
                else:
                    batch = await asyncio.to_thread(loaded.handler.preprocess, payload)
                self.metrics.observe_preprocess(
                    loaded.name, loaded.version, time.monotonic() - began
                )
                outputs = await self._arun_items(loaded, batch)
            self._mirror(loaded, route, batch, outputs)
            result = self._finish(loaded, outputs, top_k, start)
            if self.cache is not None and self.cache.remote and key is not None:
                await asyncio.to_thread(self._remember, key, status, result)
            else:
                self._remember(key, status, result)
            return result

    def infer_tensor(
        self, loaded: LoadedModel, batch: torch.Tensor, route: Route | None = None
    ) -> torch.Tensor:
        with self._observed(loaded, route, time.monotonic()):
            outputs = self._run_items(loaded, batch)
        self._mirror(loaded, route, batch, outputs)
        return torch.stack(outputs)

    async def ainfer_tensor(
        self, loaded: LoadedModel, batch: torch.Tensor, route: Route | None = None
    ) -> torch.Tensor:
        with self._observed(loaded, route, time.monotonic()):
            outputs = await self._arun_items(loaded, batch)
        self._mirror(loaded, route, batch, outputs)
        return torch.stack(outputs)

    @contextlib.contextmanager
    def _observed(self, loaded: LoadedModel, route: Route | None, start: float) -> Iterator[None]:
        """Feed a routed request's outcome to its policy's SLO guard (server errors only:
        client errors (4xx) say nothing about the version). Error metrics are counted by
        the front ends, from the response each error becomes."""
        router = self.traffic.router(loaded.name) if route is not None else None
        try:
            yield
        except Exception as exc:
            if isinstance(exc, TorchshipError):  # errors say which version answered, too
                exc.details.setdefault("model", loaded.name)
                exc.details.setdefault("version", loaded.version)
            status = exc.status_code if isinstance(exc, TorchshipError) else 500
            if status >= 500 and router is not None:
                router.observe(loaded.version, False, time.monotonic() - start)
            raise
        if router is not None:
            router.observe(loaded.version, True, time.monotonic() - start)

    def _mirror(
        self,
        loaded: LoadedModel,
        route: Route | None,
        batch: torch.Tensor,
        outputs: Sequence[torch.Tensor],
    ) -> None:
        """Shadow traffic: run the same inputs on the candidate in the background, compare
        its top-1 with what was served, never return it, never slow or fail the request."""
        if route is None or route.shadow is None:
            return
        router = self.traffic.router(loaded.name)
        try:
            shadow = self.get(loaded.name, route.shadow)
        except TorchshipError:
            return
        served = torch.stack(list(outputs)).argmax(-1)
        futures: list[concurrent.futures.Future[torch.Tensor]] = []
        try:
            for item in _items(batch):
                futures.append(shadow.batcher.submit_future(item))
        except TorchshipError:  # shadow queue full: skip, the primary matters
            for f in futures:
                f.cancel()
            return
        pending = [len(futures)]
        lock = threading.Lock()

        def compare(_: concurrent.futures.Future[torch.Tensor]) -> None:
            with lock:
                pending[0] -= 1
                if pending[0]:
                    return
            try:
                agree = torch.equal(torch.stack([f.result() for f in futures]).argmax(-1), served)
            except Exception:
                agree = False
            if router is not None:
                router.observe_shadow(agree)

        for f in futures:
            f.add_done_callback(compare)

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
        if len(items) == 1:  # the common case: no task or gather to pay for
            return [await loaded.batcher.asubmit(items[0])]
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

    # --- response cache -------------------------------------------------------------

    def _cached(
        self,
        loaded: LoadedModel,
        payload: Payload,
        top_k: int | None,
        headers: Mapping[str, str] | None,
        start: float,
    ) -> tuple[Prediction | None, str | None, str | None]:
        """(the cached answer, the key to store a fresh one under, the X-Cache status).

        Called after routing chose the version, so the key holds the version served.
        """
        if self.cache is None:
            return None, None, None
        lookup, store = cache_control(headers)
        fingerprint = self._fingerprints.get((loaded.name, loaded.version), "")
        key = ResponseCache.key(loaded, fingerprint, payload, top_k or self.settings.top_k)
        if key is None or not lookup:
            return None, key if store else None, BYPASS
        value = self.cache.get(key, loaded.name, loaded.version)
        if not isinstance(value, dict):
            return None, key, MISS
        return (
            Prediction(
                model=loaded.name,
                version=loaded.version,
                runtime=str(value.get("runtime", loaded.predictor.runtime)),
                predictions=list(value.get("predictions", [])),
                latency_ms=(time.monotonic() - start) * 1000,
                extra={"cache": HIT},
            ),
            None,
            HIT,
        )

    def _remember(self, key: str | None, status: str | None, result: Prediction) -> None:
        if status is not None:
            result.extra["cache"] = status
        if self.cache is not None and key is not None:
            self.cache.put(key, {"runtime": result.runtime, "predictions": result.predictions})

    def _invalidate(self, name: str, version: str) -> None:
        """A version loaded over or unloaded: its cached answers go."""
        if self.cache is not None:
            dropped = self.cache.invalidate(name, version)
            if dropped:
                log.info("dropped %d cached answers of %s:%s", dropped, name, version)

    # --- health ---------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Not ready from now on (load balancers stop sending), still serving: the first
        step of a graceful shutdown with a drain delay."""
        self.draining = True

    def startup(self) -> tuple[bool, dict[str, Any]]:
        """Startup probe: True once the configured models loaded (stays True after)."""
        return self._started, {"started": self._started, "models": self.model_names()}

    def live(self) -> bool:
        return True

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready only when every configured model is loaded and warm, and not draining."""
        models = self.models()
        status = {f"{m.name}:{m.version}": m.ready for m in models}
        ready = (
            self._started
            and not self._failed_at_start  # archives too, which the count below skips
            and not self.draining
            and bool(models)
            and all(status.values())
            and len(self._order)
            >= len({parse_ref(r)[0] for r in self.settings.models if archive_spec(r) is None})
        )
        body: dict[str, Any] = {"ready": ready, "draining": self.draining, "models": status}
        failed = {r: self.load_errors[r] for r in self._failed_at_start if r in self.load_errors}
        if failed:  # why it is not ready; later failures (a typo in a load) are in /status
            body["load_errors"] = failed
        return ready, body

    def check_ready(self) -> None:
        ready, _ = self.readiness()
        if not ready:
            raise ServiceUnavailableError(
                "Not ready: " + ("draining." if self.draining else "models still loading."),
                retry_after=1.0,
            )


def _large(payload: Payload) -> bool:
    """Worth hashing off the event loop (about a millisecond per MB)."""
    size = len(payload.data) if isinstance(payload, ImagePayload) else payload.array.nbytes
    return size > 256 * 1024


def _items(batch: torch.Tensor) -> list[torch.Tensor]:
    if batch.ndim == 0 or len(batch) == 0:
        raise InvalidInputError("The request holds no items.")
    return list(batch.unbind(0))


def _measure_scaling(
    predictor: Predictor, tuning: TuningCache, max_latency_s: float
) -> BatchScaling | None:
    """Measure items/s against batch size on real examples and cap where it stops paying.

    Remembered per model, machine, runtime and thread count (``tuning``), so only the
    first start on a machine pays the second it takes.
    """
    manifest = predictor.manifest
    key = tuning_key(
        manifest,
        device=str(predictor.device),
        threads=torch.get_num_threads(),
        runtime=predictor.runtime,
        sizes=SCALING_SIZES,
        max_latency_s=max_latency_s,
    )
    remembered = _remembered_scaling(tuning.get(manifest, "batch_scaling", key))
    if remembered is not None:
        log.info("%s batch scaling (remembered):\n%s", manifest.ref, remembered.table())
        return remembered
    samples = {n: predictor.sample_batch(n) for n in SCALING_SIZES}
    if any(v is None for v in samples.values()):
        return None

    def run(n: int) -> None:
        predictor.predict(samples[n])  # type: ignore[arg-type]

    scaling = measure_batch_scaling(run, SCALING_SIZES, budget_s=1.0, max_latency_s=max_latency_s)
    log.info("%s batch scaling:\n%s", manifest.ref, scaling.table())
    tuning.put(
        manifest,
        "batch_scaling",
        key,
        {
            "chosen": scaling.chosen,
            "min_gain": scaling.min_gain,
            "rows": [[m.batch_size, m.seconds_per_batch, m.repeats] for m in scaling.measurements],
            "failed": {str(k): v for k, v in scaling.failed.items()},
            "skipped": {str(k): v for k, v in scaling.skipped.items()},
            "max_latency_s": max_latency_s,
        },
    )
    return scaling


def _remembered_scaling(entry: dict[str, Any] | None) -> BatchScaling | None:
    if entry is None:
        return None
    try:
        rows = tuple(BatchMeasurement(int(b), float(s), int(r)) for b, s, r in entry["rows"])
        chosen = int(entry["chosen"])
        if chosen not in {m.batch_size for m in rows}:
            return None
        failed = {int(k): str(v) for k, v in dict(entry.get("failed", {})).items()}
        skipped = {int(k): str(v) for k, v in dict(entry.get("skipped", {})).items()}
        return BatchScaling(
            rows,
            chosen,
            float(entry["min_gain"]),
            None if entry.get("max_latency_s") is None else float(entry["max_latency_s"]),
            failed=failed,
            skipped=skipped,
            cached=True,
        )
    except (KeyError, TypeError, ValueError):
        return None  # an unreadable entry: measure again


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
