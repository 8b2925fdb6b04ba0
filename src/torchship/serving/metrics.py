"""Prometheus metrics of a serving process, correct with one worker process or several.

One process (the default): each :class:`ServiceMetrics` keeps its values in a registry
of its own, so several services in one Python process (tests, notebooks) never mix.

Several worker processes (``torchship serve --workers N``): the runner points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder per server, every worker writes its values
to memory-mapped files there (prometheus_client's multiprocess mode), and a scrape of
``/metrics`` on whichever worker the kernel hands it to adds them all up: counters and
histograms are summed over workers (a worker that died keeps its counts), gauges follow
their ``multiprocess_mode`` (queue depth and in-flight requests are summed over *live*
workers; a model counts as ready only if it is ready in every live worker). Process
metrics (memory, CPU, open files) come per live worker with a ``pid`` label.

Every metric carries ``model`` and ``version`` labels where a request has them.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from torchship.batching import BatchEvent
from torchship.serving.custom_metrics import SHAPES_DIR, CustomMetrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

__all__ = [
    "MULTIPROC_ENV",
    "PROMETHEUS_CONTENT_TYPE",
    "ServiceMetrics",
    "is_inference_endpoint",
    "mark_worker_dead",
    "multiprocess_dir",
    "prepare_multiprocess_dir",
    "record_cache",
    "record_rate_limited",
]


def multiprocess_dir() -> Path | None:
    """The folder worker processes share their metrics through, or None (one process)."""
    value = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return Path(value) if value else None


def _use_multiprocess_values() -> None:
    """prometheus_client picks its value storage when it is first imported; a process
    that imported it before the runner set the folder (gunicorn forks its workers from
    a master that did) switches to memory-mapped values here, before any are created."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()


def prepare_multiprocess_dir(path: Path) -> None:
    """Make ``path`` an empty metrics folder: values left by an earlier server would be
    added to this one's."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    shutil.rmtree(path / SHAPES_DIR, ignore_errors=True)  # handler metrics' shapes


def mark_worker_dead(pid: int, path: Path | None = None) -> None:
    """A worker exited: drop its live gauges (in-flight, queue depth, readiness, process
    metrics). Its counters and histograms stay: what it served still counts."""
    folder = path or multiprocess_dir()
    if folder is not None:
        multiprocess.mark_process_dead(pid, str(folder))


def is_inference_endpoint(endpoint: str) -> bool:
    """Routes that run a model (torchship, TorchServe and V2 protocols), by route template."""
    return endpoint.startswith("/predict") or endpoint.endswith("/infer")


# --- process-wide counters other layers bump (auth, rate limits, response cache) ---------

_SHARED_REGISTRY = CollectorRegistry()
_CACHE_HITS = Counter(
    "torchship_cache_hits",
    "Response-cache hits by model and version.",
    ["model", "version"],
    registry=_SHARED_REGISTRY,
)
_CACHE_MISSES = Counter(
    "torchship_cache_misses",
    "Response-cache misses by model and version.",
    ["model", "version"],
    registry=_SHARED_REGISTRY,
)
_RATE_LIMITED = Counter(
    "torchship_rate_limited",
    "Requests refused by a rate limit, by scope.",
    ["scope"],
    registry=_SHARED_REGISTRY,
)


def record_cache(model: str, version: str, hit: bool) -> None:
    """Count one response-cache lookup for ``model``/``version``."""
    if multiprocess_dir() is not None:
        _use_multiprocess_values()
    (_CACHE_HITS if hit else _CACHE_MISSES).labels(model, version).inc()


def record_rate_limited(scope: str) -> None:
    """Count one request refused by the rate limit of ``scope`` (e.g. "client", "model")."""
    if multiprocess_dir() is not None:
        _use_multiprocess_values()
    _RATE_LIMITED.labels(scope).inc()


class _Shared(Collector):
    """Renders the process-wide counters with a service's own metrics."""

    def collect(self) -> Iterable[Metric]:
        return _SHARED_REGISTRY.collect()


class _WorkerProcesses(Collector):
    """Process metrics of every live worker, labelled by ``pid`` (multiprocess mode).

    A worker is live while its live-gauge file exists (the supervisor removes it when
    the worker exits) and the process does.
    """

    _FILE = re.compile(r"gauge_livesum_(\d+)\.db$")

    def __init__(self, path: Path) -> None:
        self.path = path

    def pids(self) -> list[int]:
        found = (self._FILE.search(p.name) for p in self.path.glob("gauge_livesum_*.db"))
        return sorted(int(m.group(1)) for m in found if m and Path(f"/proc/{m.group(1)}").exists())

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self.pids():
            collector = ProcessCollector(pid=functools.partial(str, pid), registry=None)
            for family in collector.collect():
                out = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "pid": str(pid)}, s.value)
        yield from merged.values()


class ServiceMetrics:
    """Every metric one serving process exports; ``render()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir is not None:
            _use_multiprocess_values()
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "torchship_requests",
            "HTTP requests by endpoint, model, version and status code.",
            ["endpoint", "model", "version", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "torchship_request_latency_seconds",
            "End-to-end request latency, as the server saw it.",
            ["endpoint", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "torchship_errors",
            "Error responses by model, version and error code (invalid_image, queue_full, "
            "internal_error, ...).",
            ["model", "version", "type"],
            registry=r,
        )
        self.preprocess = Histogram(
            "torchship_preprocess_seconds",
            "Time to decode and prepare one request's inputs.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "torchship_batch_size",
            "Items per inference batch.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "torchship_inference_seconds",
            "Model time per batch.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "torchship_queue_wait_seconds",
            "Time an item waited for its batch.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Before any "live" gauge: a worker becomes visible to a scrape (its live files)
        # with a readiness of 0 already written, so a half-constructed worker never
        # counts as ready while its torchship_workers is still missing.
        self.server_ready = Gauge(
            "torchship_ready",
            "1 when the server is ready (every model loaded and warm, not draining); the "
            "least ready live worker's value.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.queue_depth = Gauge(
            "torchship_queue_depth",
            "Items waiting for a batch (summed over live workers).",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "torchship_in_flight_requests",
            "Requests being served (summed over live workers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.workers = Gauge(
            "torchship_workers",
            "Live worker processes serving this port.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.workers.set(1)
        self.load_seconds = Gauge(
            "torchship_model_load_seconds",
            "Load + warm-up time of a model version (the slowest worker's).",
            ["model", "version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.ready = Gauge(
            "torchship_model_ready",
            "1 when the model version serves (in every live worker).",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemin",
        )
        #: Metrics that model code defines (TorchServe handlers' ``context.metrics``).
        self.custom = CustomMetrics(r, self.multiprocess_dir)
        #: Asked at every scrape, so the scraped worker's readiness is never stale.
        self.readiness: Callable[[], bool] | None = None
        # metric.labels(...) costs a few microseconds per call (validation, locking):
        # the labelled children are kept here, one lookup per recording.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        if self.multiprocess_dir is None:
            ProcessCollector(registry=r)
            r.register(_Shared())

    # --- recording ------------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def on_batch(self, model: str, version: str, event: BatchEvent) -> None:
        if event.size:
            self._child(self.batch_size, model, version).observe(event.size)
            self._child(self.inference, model, version).observe(event.inference_s)
        queue_wait = self._child(self.queue_wait, model, version)
        for wait in event.queue_waits_s:
            queue_wait.observe(wait)
        self._child(self.queue_depth, model, version).set(event.queue_depth)

    def observe_request(
        self,
        endpoint: str,
        model: str,
        version: str,
        code: int,
        seconds: float,
        error: str | None = None,
    ) -> None:
        """One answered request; ``error`` is the error code of an error response."""
        self._child(self.requests, endpoint, model, version, str(code)).inc()
        self._child(self.latency, endpoint, model, version).observe(seconds)
        if error is not None:
            self._child(self.errors, model, version, error).inc()

    def observe_preprocess(self, model: str, version: str, seconds: float) -> None:
        self._child(self.preprocess, model, version).observe(seconds)

    def model_loaded(self, model: str, version: str, seconds: float) -> None:
        self.load_seconds.labels(model, version).set(seconds)
        self.ready.labels(model, version).set(1)

    def model_stopped(self, model: str, version: str) -> None:
        self.ready.labels(model, version).set(0)
        self.queue_depth.labels(model, version).set(0)

    # --- reading --------------------------------------------------------------------

    def collect_registry(self) -> CollectorRegistry:
        """What a scrape reads: this process's registry, or every worker's files."""
        if self.readiness is not None:
            self.server_ready.set(1 if self.readiness() else 0)
        if self.multiprocess_dir is None:
            return self.registry
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, str(self.multiprocess_dir))
        merged.register(_WorkerProcesses(self.multiprocess_dir))
        return merged

    def render(self) -> bytes:
        return generate_latest(self.collect_registry())

    def summary(self) -> dict[str, Any]:
        """Totals for the status page (over all workers): inference requests and errors
        per model version, and the latency histogram's cumulative buckets. Rates and
        percentiles are differences between two summaries, so they are live, not
        averages since start."""
        versions: dict[str, dict[str, float]] = {}
        buckets: dict[str, float] = {}
        latency_sum = latency_count = 0.0
        for family in self.collect_registry().collect():
            for s in family.samples:
                labels = s.labels
                endpoint = labels.get("endpoint", "")
                if s.name == "torchship_requests_total" and is_inference_endpoint(endpoint):
                    key = _version_key(labels)
                    v = versions.setdefault(key, {"requests": 0.0, "errors": 0.0})
                    v["requests"] += s.value
                    if labels.get("code", "").startswith("5"):
                        v["errors"] += s.value
                elif s.name.startswith("torchship_request_latency_seconds") and (
                    is_inference_endpoint(endpoint)
                ):
                    if s.name.endswith("_bucket"):
                        le = labels["le"]
                        buckets[le] = buckets.get(le, 0.0) + s.value
                    elif s.name.endswith("_sum"):
                        latency_sum += s.value
                    elif s.name.endswith("_count"):
                        latency_count += s.value
        return {
            "requests": sum(v["requests"] for v in versions.values()),
            "errors": sum(v["errors"] for v in versions.values()),
            "versions": versions,
            "latency": {
                # "+Inf" stays a string: JSON has no infinity
                "buckets": [[le, n] for le, n in sorted(buckets.items(), key=_bound)],
                "sum": latency_sum,
                "count": latency_count,
            },
        }


def _bound(item: tuple[str, float]) -> float:
    return float(item[0])


def _version_key(labels: dict[str, str]) -> str:
    model, version = labels.get("model", ""), labels.get("version", "")
    return f"{model}:{version}" if model else "(no model)"
