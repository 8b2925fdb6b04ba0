"""Per-version request outcomes over a sliding time window, and the SLO verdict on them.

Plain data structures with no locking of their own: ``Router`` holds the lock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from torchship.rollout.policies import SLO


@dataclass(frozen=True)
class WindowStats:
    """Outcomes of one version in the window; latencies in seconds (None without data)."""

    requests: int
    errors: int
    p50_s: float | None = None
    p99_s: float | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def to_dict(self) -> dict[str, Any]:
        rate = self.error_rate
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": None if rate is None else round(rate, 6),
            "p50_ms": _ms(self.p50_s),
            "p99_ms": _ms(self.p99_s),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of a non-empty sorted list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class SlidingWindow:
    """(time, ok, latency) samples of the last ``window_s`` seconds, at most ``max_samples``.

    ``add`` is O(1) amortised: it evicts what fell out of the window (and the oldest
    sample beyond ``max_samples``, which bounds memory under any request rate: at high
    rates the window then covers the most recent ``max_samples`` requests instead).
    The error count is kept running; percentiles are computed when asked for.
    """

    __slots__ = ("_errors", "_samples", "max_samples")

    def __init__(self, max_samples: int = 10_000) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self.max_samples = max_samples
        self._samples: deque[tuple[float, bool, float]] = deque()
        self._errors = 0

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, now: float, ok: bool, latency_s: float, window_s: float) -> None:
        self.prune(now, window_s)
        if len(self._samples) >= self.max_samples:
            self._evict()
        self._samples.append((now, ok, latency_s))
        if not ok:
            self._errors += 1

    def prune(self, now: float, window_s: float) -> None:
        """Drop samples older than ``window_s`` before ``now``."""
        horizon = now - window_s
        samples = self._samples
        while samples and samples[0][0] <= horizon:
            self._evict()

    def _evict(self) -> None:
        _, ok, _ = self._samples.popleft()
        if not ok:
            self._errors -= 1

    def clear(self) -> None:
        self._samples.clear()
        self._errors = 0

    def stats(self, now: float, window_s: float) -> WindowStats:
        self.prune(now, window_s)
        n = len(self._samples)
        if not n:
            return WindowStats(0, 0)
        latencies = sorted(s[2] for s in self._samples)
        return WindowStats(
            n, self._errors, percentile(latencies, 0.50), percentile(latencies, 0.99)
        )


@dataclass(frozen=True)
class Verdict:
    """The SLO judgement of a canary candidate against its baseline."""

    status: Literal["insufficient", "healthy", "breach"]
    baseline: WindowStats
    candidate: WindowStats
    breaches: tuple[str, ...] = ()
    """One sentence per breached limit, with the numbers."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "breaches": list(self.breaches),
            "baseline": self.baseline.to_dict(),
            "candidate": self.candidate.to_dict(),
        }


def judge(slo: SLO, baseline: WindowStats, candidate: WindowStats) -> Verdict:
    """Compare candidate with baseline; no verdict until both have ``min_samples``."""
    if baseline.requests < slo.min_samples or candidate.requests < slo.min_samples:
        return Verdict("insufficient", baseline, candidate)
    breaches: list[str] = []
    base_rate = baseline.error_rate or 0.0
    cand_rate = candidate.error_rate or 0.0
    if cand_rate > base_rate + slo.max_error_rate_increase:
        breaches.append(
            f"candidate error rate {cand_rate:.4f} > baseline {base_rate:.4f} "
            f"+ {slo.max_error_rate_increase:g}"
        )
    base_p99 = baseline.p99_s or 0.0
    cand_p99 = candidate.p99_s or 0.0
    if cand_p99 > slo.max_p99_ratio * base_p99:
        breaches.append(
            f"candidate p99 {cand_p99 * 1000:.1f} ms > {slo.max_p99_ratio:g} × "
            f"baseline p99 {base_p99 * 1000:.1f} ms"
        )
    return Verdict("breach" if breaches else "healthy", baseline, candidate, tuple(breaches))
