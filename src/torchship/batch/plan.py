"""``num_workers="auto"``: measure preprocessing and the model, then split the cores.

Two costs decide how a CPU batch job should use its cores: ``p``, the seconds one item
takes to read and preprocess (one thread), and the model's seconds per item, ``m_c`` on
all ``c`` cores and ``m_1`` on one thread. With no loader workers the main process
alternates between them: ``1 / (p + m_c)`` items/s. With ``w`` workers the two overlap,
the model runs on the ``t = c - w`` cores left (see
:func:`~torchship.batch.engine_local.plan_threads`; its speed on ``t`` threads is
interpolated between the two measurements) and the slowest stage sets the pace:
``min(w / p, model rate on t threads, c / (p + m_1))`` (workers, model, all CPU work).

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

import torch

from torchship.batch.dataset import InferenceDataset
from torchship.runtime import Predictor

logger = logging.getLogger(__name__)

MIN_GAIN = 1.1
"""More workers must promise this much more throughput: processes cost memory and start-up."""

SAMPLE_ITEMS = 16
SAMPLE_BUDGET_S = 0.5
MODEL_BATCH = 8


@dataclass(frozen=True)
class Costs:
    """Seconds per item, measured on this machine with the job's own inputs and model."""

    preprocess: float  # read + decode + preprocess, one thread
    model_all: float  # the model on all cores
    model_one: float  # the model on one thread (estimated as model_all * cores if unmeasured)

    def model_rate(self, threads: int, cores: int) -> float:
        """Model items/s on ``threads``: between the two measured points, linearly."""
        one, all_ = 1.0 / max(self.model_one, 1e-9), 1.0 / max(self.model_all, 1e-9)
        if cores <= 1:
            return all_
        return one + (all_ - one) * (min(threads, cores) - 1) / (cores - 1)


@dataclass(frozen=True)
class Plan:
    workers: int
    threads: int
    costs: Costs | None = None
    estimate: float | None = None  # items/s

    def __str__(self) -> str:
        workers = f"{self.workers} loader worker{'' if self.workers == 1 else 's'}"
        text = f"{workers}, model on {self.threads} thread{'' if self.threads == 1 else 's'}"
        if self.costs is not None:
            c = self.costs
            text += (
                f" (measured per item: preprocessing {c.preprocess * 1e3:.2f} ms, model "
                f"{c.model_all * 1e3:.2f} ms on all cores, {c.model_one * 1e3:.2f} ms on one; "
                f"expect ~{self.estimate or 0:,.0f} items/s)"
            )
        return text


def estimate(workers: int, cores: int, costs: Costs) -> float:
    """Predicted items/s with ``workers`` loader processes (see the module doc)."""
    p = max(costs.preprocess, 1e-9)
    if workers == 0:
        return 1.0 / (p + costs.model_all)
    threads = max(1, cores - workers)
    return min(workers / p, costs.model_rate(threads, cores), cores / (p + costs.model_one))


def choose(cores: int, costs: Costs, items: int) -> tuple[int, float]:
    """(workers, expected items/s): the fewest workers within ``MIN_GAIN`` of the best."""
    best, best_rate = 0, estimate(0, cores, costs)
    if items * (costs.preprocess + costs.model_all) < 1.0:  # not worth starting processes
        return best, best_rate
    for w in range(1, cores + 1):
        rate = estimate(w, cores, costs)
        if rate > best_rate * MIN_GAIN:
            best, best_rate = w, rate
    return best, best_rate


def measure(dataset: InferenceDataset, predictor: Predictor, cores: int) -> Costs:
    """Time preprocessing on the first items and the model on a small batch.

    Torch runtimes are timed on all cores and on one thread (thread scaling is rarely
    linear, and on a busy machine more threads can even be slower); an ONNX Runtime
    session's threads are fixed, so its one-thread time is estimated.
    """
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
        return Costs(p, 0.0, 0.0)
    model_all = _time(predictor, batch)
    model_one = model_all * cores
    if cores > 1 and predictor.runtime != "onnxruntime":
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model_one = _time(predictor, batch)
        finally:
            torch.set_num_threads(before)
    return Costs(p, model_all, model_one)


def _time(predictor: Predictor, batch: torch.Tensor, runs: int = 3) -> float:
    predictor.predict(batch)
    took = []
    for _ in range(runs):
        start = time.perf_counter()
        predictor.predict(batch)
        took.append(time.perf_counter() - start)
    return statistics.median(took) / len(batch)


def plan_auto(dataset: InferenceDataset, predictor: Predictor, cores: int) -> Plan:
    """Measure, then pick the worker count; the model gets the cores that are left."""
    costs = measure(dataset, predictor, cores)
    workers, rate = choose(cores, costs, len(dataset))
    plan = Plan(workers, max(1, cores - workers), costs, rate)
    logger.info("batch auto plan: %s", plan)
    return plan
