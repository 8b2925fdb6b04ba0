"""``num_workers="auto"``: measure preprocessing and the model, then split the cores.

Two costs decide how a CPU batch job should use its cores: ``p``, the seconds one item
takes to read and preprocess (one thread), and ``m``, the seconds per item the model
takes on all ``c`` cores. With no loader workers the main process alternates between
them: ``1 / (p + m)`` items/s, every core used by the model. With ``w`` workers the
two overlap, the model runs on the ``t = c - w`` cores left (see
:func:`~torchship.batch.engine_local.plan_threads`), and the slowest stage sets the
pace: ``min(w / p, t / (m * c), c / (p + m * c))`` (workers, model, total CPU work).

A heavy model on cheap inputs (ResNet-18 on photos) keeps every core for the model;
a light model on costly inputs (the digits CNN on drawings) gets as many workers as
there are cores. Measured, not guessed, like ``runtime="auto"``; the numbers are in
the plan's ``str`` and logged at INFO.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

from torchship.batch.dataset import InferenceDataset
from torchship.runtime import Predictor

logger = logging.getLogger(__name__)

MIN_GAIN = 1.1
"""More workers must promise this much more throughput: processes cost memory and start-up."""

SAMPLE_ITEMS = 16
SAMPLE_BUDGET_S = 0.5
MODEL_BATCH = 8


@dataclass(frozen=True)
class Plan:
    workers: int
    threads: int
    preprocess_ms: float | None = None
    model_ms: float | None = None  # per item, on all cores
    estimate: float | None = None  # items/s

    def __str__(self) -> str:
        workers = f"{self.workers} loader worker{'' if self.workers == 1 else 's'}"
        text = f"{workers}, model on {self.threads} thread{'' if self.threads == 1 else 's'}"
        if self.preprocess_ms is not None and self.model_ms is not None:
            text += (
                f" (measured: preprocessing {self.preprocess_ms:.2f} ms/item, "
                f"model {self.model_ms:.2f} ms/item on all cores; "
                f"expect ~{self.estimate or 0:,.0f} items/s)"
            )
        return text


def estimate(workers: int, cores: int, p: float, m: float) -> float:
    """Predicted items/s with ``workers`` loader processes (see the module doc)."""
    if workers == 0:
        return 1.0 / max(p + m, 1e-9)
    threads = max(1, cores - workers)
    return min(
        workers / max(p, 1e-9),
        threads / max(m * cores, 1e-9),
        cores / max(p + m * cores, 1e-9),
    )


def choose(cores: int, p: float, m: float, items: int) -> tuple[int, float]:
    """(workers, expected items/s): the fewest workers within ``MIN_GAIN`` of the best."""
    best, best_rate = 0, estimate(0, cores, p, m)
    if items * (p + m) < 1.0:  # under a second of work: starting processes costs more
        return best, best_rate
    for w in range(1, cores + 1):
        rate = estimate(w, cores, p, m)
        if rate > best_rate * MIN_GAIN:
            best, best_rate = w, rate
    return best, best_rate


def measure(dataset: InferenceDataset, predictor: Predictor) -> tuple[float, float]:
    """(seconds per item to preprocess, seconds per item of model) on this machine."""
    n = min(SAMPLE_ITEMS, len(dataset))
    took: list[float] = []
    deadline = time.monotonic() + SAMPLE_BUDGET_S
    for i in range(n):
        start = time.perf_counter()
        dataset[i]
        took.append(time.perf_counter() - start)
        if time.monotonic() > deadline:
            break
    p = statistics.median(took) if took else 0.0
    batch = predictor.sample_batch(MODEL_BATCH)
    if batch is None:
        return p, 0.0
    predictor.predict(batch)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        predictor.predict(batch)
        runs.append(time.perf_counter() - start)
    return p, statistics.median(runs) / len(batch)


def plan_auto(dataset: InferenceDataset, predictor: Predictor, cores: int) -> Plan:
    """Measure, then pick the worker count; the model gets the cores that are left."""
    p, m = measure(dataset, predictor)
    workers, rate = choose(cores, p, m, len(dataset))
    plan = Plan(workers, max(1, cores - workers), p * 1e3, m * 1e3, rate)
    logger.info("batch auto plan: %s", plan)
    return plan
