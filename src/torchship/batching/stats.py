"""What a batcher did, as plain data a metrics layer (Prometheus, logs) can read.

Two views: ``BatchEvent`` is handed to the ``on_batch`` observer once per batch, from
the worker thread (use it for histograms: batch size, queue wait, inference time);
``BatcherStats`` is a snapshot of running counters (use it for gauges and counters at
scrape time). Neither imports a metrics library.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BatchEvent:
    """One batch the worker took from the queue."""

    batcher: str
    size: int
    """Requests passed to ``predict_fn`` (0 if every request in it was skipped)."""
    skipped: int
    """Requests dropped without inference: cancelled, timed out or aborted by ``stop``."""
    failed: int
    """Requests of this batch that got an exception (the whole batch, or per item)."""
    queue_waits_s: tuple[float, ...]
    """Per request that ran: seconds from ``submit`` to the start of inference."""
    inference_s: float
    """Seconds spent inside ``predict_fn``."""
    queue_depth: int
    """Requests still waiting in the queue when this batch started."""
    error: BaseException | None = None
    """What ``predict_fn`` raised for the whole batch, if it did."""


@dataclass(frozen=True)
class BatcherStats:
    """A consistent snapshot of a batcher's counters since it was created."""

    name: str
    running: bool
    queue_depth: int
    max_queue_size: int
    max_batch_size: int
    submitted: int = 0
    rejected: int = 0
    """Refused at ``submit``: queue full or batcher not running."""
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    """Callers that gave up waiting (``RequestTimeoutError``)."""
    cancelled: int = 0
    """``asubmit`` calls whose task was cancelled (e.g. the client disconnected)."""
    skipped: int = 0
    """Requests the worker dropped without running them."""
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    """Histogram data: batch size -> number of batches of that size."""
    inference_s_total: float = 0.0
    queue_wait_s_total: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        ran = sum(size * count for size, count in self.batch_sizes.items())
        return ran / self.batches if self.batches else 0.0

    @property
    def mean_inference_s(self) -> float:
        return self.inference_s_total / self.batches if self.batches else 0.0


class _StatsRecorder:
    """Thread-safe counters behind ``DynamicBatcher.stats``."""

    _EWMA_WEIGHT = 0.2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._batch_sizes: Counter[int] = Counter()
        self._inference_s_total = 0.0
        self._queue_wait_s_total = 0.0
        self._recent_batch_s: float | None = None

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self._counts[what] += n

    def record_batch(self, event: BatchEvent) -> None:
        with self._lock:
            self._counts["skipped"] += event.skipped
            self._counts["failed"] += event.failed
            self._counts["completed"] += event.size - min(event.failed, event.size)
            if event.size == 0:
                return
            self._counts["batches"] += 1
            self._batch_sizes[event.size] += 1
            self._inference_s_total += event.inference_s
            self._queue_wait_s_total += sum(event.queue_waits_s)
            if self._recent_batch_s is None:
                self._recent_batch_s = event.inference_s
            else:
                w = self._EWMA_WEIGHT
                self._recent_batch_s = (1 - w) * self._recent_batch_s + w * event.inference_s

    @property
    def recent_batch_s(self) -> float | None:
        """Moving average of recent batch inference times, None before the first batch."""
        with self._lock:
            return self._recent_batch_s

    def snapshot(
        self,
        *,
        name: str,
        running: bool,
        queue_depth: int,
        max_queue_size: int,
        max_batch_size: int,
    ) -> BatcherStats:
        with self._lock:
            c = self._counts
            return BatcherStats(
                name=name,
                running=running,
                queue_depth=queue_depth,
                max_queue_size=max_queue_size,
                max_batch_size=max_batch_size,
                submitted=c["submitted"],
                rejected=c["rejected"],
                completed=c["completed"],
                failed=c["failed"],
                timed_out=c["timed_out"],
                cancelled=c["cancelled"],
                skipped=c["skipped"],
                batches=c["batches"],
                batch_sizes=dict(sorted(self._batch_sizes.items())),
                inference_s_total=self._inference_s_total,
                queue_wait_s_total=self._queue_wait_s_total,
            )
