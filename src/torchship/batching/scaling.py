"""Pick ``max_batch_size`` by measuring, not guessing.

At warm-up the server times one batch of each candidate size and keeps the smallest
size after which throughput stops improving meaningfully: larger batches only add
queueing latency once the hardware is saturated. The measurements come back with the
choice so the server can report why it chose what it did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchship.errors import ConfigError

logger = logging.getLogger("torchship.batching")

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class BatchMeasurement:
    batch_size: int
    seconds_per_batch: float
    """Best of ``repeats`` timed calls: noise only ever adds time."""
    repeats: int

    @property
    def items_per_s(self) -> float:
        return self.batch_size / max(self.seconds_per_batch, 1e-12)


@dataclass(frozen=True)
class BatchScaling:
    """Throughput per batch size, and the batch size chosen from it."""

    measurements: tuple[BatchMeasurement, ...]
    chosen: int
    min_gain: float
    max_latency_s: float | None = None
    failed: dict[int, str] = field(default_factory=dict)
    """Batch size -> the error that stopped measuring there (e.g. out of memory)."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Batch size -> why it and larger sizes were not timed (over ``max_latency_s``)."""
    cached: bool = False
    """True when measured at an earlier start and remembered (see runtime.tuning)."""

    def as_rows(self) -> list[dict[str, Any]]:
        """One JSON-ready row per measured batch size, for a server's status page."""
        return [
            {
                "batch_size": m.batch_size,
                "ms_per_batch": round(m.seconds_per_batch * 1000, 3),
                "items_per_s": round(m.items_per_s, 1),
                "chosen": m.batch_size == self.chosen,
            }
            for m in self.measurements
        ]

    def table(self) -> str:
        """A small text table for logs and lessons."""
        lines = [f"{'batch':>6} {'ms/batch':>10} {'items/s':>10}"]
        for m in self.measurements:
            mark = "  <- chosen" if m.batch_size == self.chosen else ""
            lines.append(
                f"{m.batch_size:>6} {m.seconds_per_batch * 1000:>10.3f} {m.items_per_s:>10.1f}{mark}"
            )
        for size, reason in self.failed.items():
            lines.append(f"{size:>6} failed: {reason}")
        for size, reason in self.skipped.items():
            lines.append(f"{size:>6} not timed: {reason}")
        return "\n".join(lines)


def choose_max_batch_size(
    measurements: Iterable[BatchMeasurement],
    *,
    min_gain: float = 0.10,
    max_latency_s: float | None = None,
) -> int:
    """The smallest batch size that no larger one beats by more than ``min_gain``.

    Comparing against *every* larger size, not just the next one, keeps one noisy
    measurement from stopping the search early. Sizes whose batch takes longer than
    ``max_latency_s`` are not considered (the smallest size is the fallback).
    """
    ordered = sorted(measurements, key=lambda m: m.batch_size)
    if not ordered:
        raise ConfigError("No batch sizes were measured.", hint="Measure at least one batch size.")
    if min_gain < 0:
        raise ConfigError(f"min_gain must not be negative, got {min_gain}.", hint="e.g. 0.10")
    candidates = [
        m for m in ordered if max_latency_s is None or m.seconds_per_batch <= max_latency_s
    ]
    if not candidates:
        return ordered[0].batch_size
    for i, m in enumerate(candidates):
        best_later = max((later.items_per_s for later in candidates[i + 1 :]), default=0.0)
        if best_later < m.items_per_s * (1 + min_gain):
            return m.batch_size
    raise AssertionError("unreachable: the largest candidate always qualifies")


def measure_batch_scaling(
    predict_batch: Callable[[int], object],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    budget_s: float = 2.0,
    warmup: int = 1,
    min_gain: float = 0.10,
    max_latency_s: float | None = None,
    max_repeats: int = 1000,
    clock: Callable[[], float] = time.perf_counter,
) -> BatchScaling:
    """Time ``predict_batch(n)`` for each ``n`` in ``batch_sizes`` and choose a size.

    ``predict_batch(n)`` must run one batch of ``n`` items end to end; build its input
    outside the timed call, e.g. ``lambda n: model(x[:n])`` under
    ``torch.inference_mode()``, and on a GPU return only after the work is done (copy
    the output to the CPU).

    Each size first gets ``warmup`` untimed calls, in ascending order; if a size
    larger than the first fails (say, out of memory), that size and larger ones are
    dropped and the error recorded. A size larger than the first whose batch takes
    longer than ``max_latency_s`` (twice in a row, so one slow first call does not
    count) is dropped with the larger ones before they cost anything: it could never
    be chosen, and for a large model on a small CPU those are most of the start-up
    time. Then the sizes are timed in rounds, one call each in rotating order, until
    ``budget_s`` of timed calls is spent (at least one round, at most ``max_repeats``),
    so a burst of background load hits every size alike.
    """
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ConfigError(
            f"batch_sizes must be positive integers, got {list(batch_sizes)}.",
            hint="e.g. (1, 2, 4, 8, 16, 32)",
        )
    if budget_s <= 0:
        raise ConfigError(f"budget_s must be positive, got {budget_s}.", hint="e.g. 2.0")
    failed: dict[int, str] = {}
    skipped: dict[int, str] = {}
    ready: list[int] = []

    def give_up_from(n: int, exc: Exception) -> None:
        if n == sizes[0]:
            raise exc
        failed[n] = f"{type(exc).__name__}: {exc}"
        logger.warning("batch size %d failed during measurement, stopping there: %s", n, exc)
        del ready[ready.index(n) :]

    def timed(n: int) -> float:
        started = clock()
        predict_batch(n)
        return clock() - started

    def over_budget(n: int, last_warmup: float | None) -> str | None:
        """Why ``n`` is over the budget (two calls in a row over it), or None."""
        if max_latency_s is None or n == sizes[0]:
            return None
        elapsed = timed(n) if last_warmup is None else last_warmup
        if elapsed <= max_latency_s:
            return None
        elapsed = timed(n)  # confirm: a first call of a new shape can be slow once
        if elapsed <= max_latency_s:
            return None
        return (
            f"one batch took {elapsed * 1000:.3g} ms, over the "
            f"{max_latency_s * 1000:g} ms budget (larger sizes not tried)"
        )

    for n in sizes:
        ready.append(n)
        try:
            last = None
            for _ in range(warmup):
                last = timed(n)
            reason = over_budget(n, last)
        except Exception as exc:
            give_up_from(n, exc)
            break
        if reason is not None:
            skipped[n] = reason
            ready.pop()
            break

    times: dict[int, list[float]] = {n: [] for n in ready}
    spent = 0.0
    rounds = 0
    while rounds < max_repeats and (rounds == 0 or spent < budget_s):
        shift = rounds % len(ready)
        for n in ready[shift:] + ready[:shift]:
            started = clock()
            try:
                predict_batch(n)
            except Exception as exc:
                give_up_from(n, exc)
                break
            elapsed = clock() - started
            times[n].append(elapsed)
            spent += elapsed
        rounds += 1

    measurements = [
        BatchMeasurement(batch_size=n, seconds_per_batch=min(times[n]), repeats=len(times[n]))
        for n in ready
        if times[n]
    ]
    chosen = choose_max_batch_size(measurements, min_gain=min_gain, max_latency_s=max_latency_s)
    return BatchScaling(
        measurements=tuple(measurements),
        chosen=chosen,
        min_gain=min_gain,
        max_latency_s=max_latency_s,
        failed=failed,
        skipped=skipped,
    )
