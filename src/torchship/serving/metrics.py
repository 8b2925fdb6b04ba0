"""Prometheus metrics of one serving process, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

from torchship.batching import BatchEvent

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

__all__ = ["PROMETHEUS_CONTENT_TYPE", "ServiceMetrics"]


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "torchship_requests",
            "HTTP requests by endpoint, model, version and status code.",
            ["endpoint", "model", "version", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "torchship_request_latency_seconds",
            "End-to-end request latency.",
            ["endpoint", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "torchship_errors", "Errors by type.", ["model", "version", "type"], registry=r
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
        self.queue_depth = Gauge(
            "torchship_queue_depth", "Items waiting for a batch.", ["model", "version"], registry=r
        )
        self.in_flight = Gauge("torchship_in_flight_requests", "Requests being served.", registry=r)
        self.load_seconds = Gauge(
            "torchship_model_load_seconds", "Load + warm-up time.", ["model", "version"], registry=r
        )
        self.ready = Gauge(
            "torchship_model_ready", "1 when the model serves.", ["model", "version"], registry=r
        )

    def on_batch(self, model: str, version: str, event: BatchEvent) -> None:
        labels = (model, version)
        if event.size:
            self.batch_size.labels(*labels).observe(event.size)
            self.inference.labels(*labels).observe(event.inference_s)
        for wait in event.queue_waits_s:
            self.queue_wait.labels(*labels).observe(wait)
        self.queue_depth.labels(*labels).set(event.queue_depth)

    def observe_request(
        self, endpoint: str, model: str, version: str, code: int, seconds: float
    ) -> None:
        self.requests.labels(endpoint, model, version, str(code)).inc()
        self.latency.labels(endpoint, model, version).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
