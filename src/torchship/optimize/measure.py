"""Measure every variant the same way, in one interleaved run.

Accuracy first (untimed): top-1 on the held-out test set and agreement with the
reference (the parent), both from the same predictions. Then timing in rounds: each
round gives every variant a short burst at batch 1 (latency samples) and one at batch
32 (throughput samples), in an order that rotates from round to round, so a burst of
background load or a frequency change hits all variants alike. Each burst starts with
one untimed call: the previous variant has just evicted this one's weights from the
CPU caches, and a server running one model would not pay that on every request
(it cost the digits MLP ~30% of its time here). Medians, not means: one descheduled
call must not move the result. Threads are the caller's business: set them once
(``torchship.runtime.set_threads``) before loading the variants.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from torchship.runtime._inputs import fill_batch

Predict = Callable[[torch.Tensor], torch.Tensor]

LATENCY_BATCH = 1
THROUGHPUT_BATCH = 32
BURST = 5  # timed calls per burst for fast models
SLOW_CALL_S = 0.02  # slower calls: one timed call per burst, no untimed one


@dataclass(frozen=True)
class Measurement:
    top1: float | None  # None without labels
    agreement: float  # share of test items classified as the reference classifies them
    p50_ms: float  # batch 1
    p99_ms: float  # batch 1
    items_per_s: float  # batch 32, from the median call
    latency_samples: int
    throughput_samples: int


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linearly interpolated like ``numpy.percentile``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def predicted_classes(predict: Predict, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Arg-max class of every item, computed in batches."""
    with torch.inference_mode():
        return torch.cat(
            [predict(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        )


def measure_variants(
    contenders: Mapping[str, Predict],
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    reference: str,
    budget_s: float = 5.0,
    min_rounds: int = 20,
    max_rounds: int = 100_000,
    warmup: int = 3,
) -> dict[str, Measurement]:
    """Accuracy and speed of each contender on ``x`` (labels ``y``), interleaved."""
    if reference not in contenders:
        raise ValueError(f"reference {reference!r} is not among the contenders")
    names = list(contenders)
    classes = {name: predicted_classes(contenders[name], x) for name in names}
    ref = classes[reference]
    small = [fill_batch(x[i:], LATENCY_BATCH) for i in range(min(len(x), 64))]
    large = [
        fill_batch(torch.roll(x, -i * THROUGHPUT_BATCH, 0), THROUGHPUT_BATCH).contiguous()
        for i in range(max(1, min(8, len(x) // THROUGHPUT_BATCH)))
    ]
    slow: dict[str, bool] = {}
    with torch.inference_mode():
        for name in names:  # first calls: lazy init, allocator, compilation, autotuning
            for _ in range(warmup):
                contenders[name](small[0])
                start = time.perf_counter()
                contenders[name](large[0])
            slow[name] = time.perf_counter() - start > SLOW_CALL_S
    latency: dict[str, list[float]] = {n: [] for n in names}
    throughput: dict[str, list[float]] = {n: [] for n in names}
    deadline = time.monotonic() + budget_s
    rounds = 0
    with torch.inference_mode():
        while rounds < max_rounds and (rounds < min_rounds or time.monotonic() < deadline):
            shift = rounds % len(names)
            for name in names[shift:] + names[:shift]:
                burst = 1 if slow[name] else BURST
                for batches, samples in ((small, latency[name]), (large, throughput[name])):
                    if not slow[name]:
                        contenders[name](batches[rounds % len(batches)])  # caches
                    for i in range(burst):
                        batch = batches[(rounds * burst + i) % len(batches)]
                        start = time.perf_counter()
                        contenders[name](batch)
                        samples.append((time.perf_counter() - start) * 1e3)
            rounds += 1
    results = {}
    for name in names:
        median_ms = statistics.median(throughput[name])
        results[name] = Measurement(
            top1=float((classes[name] == y).float().mean()) if y is not None else None,
            agreement=float((classes[name] == ref).float().mean()),
            p50_ms=percentile(latency[name], 50),
            p99_ms=percentile(latency[name], 99),
            items_per_s=THROUGHPUT_BATCH * 1e3 / median_ms if median_ms > 0 else math.nan,
            latency_samples=len(latency[name]),
            throughput_samples=len(throughput[name]),
        )
    return results
