"""Reading a Prometheus ``/metrics`` answer without a Prometheus server: sums by label
and percentiles from histogram buckets, the way PromQL's ``sum`` and
``histogram_quantile`` compute them (for lessons, scripts and tests)."""

from __future__ import annotations

import math
from collections import defaultdict

import requests
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Scrape", "histogram_quantile", "scrape"]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The ``q`` quantile (0-1) of cumulative ``(upper bound, count)`` buckets, linearly
    interpolated inside the bucket it falls in; NaN without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower  # above the highest finite bucket: its bound is all we know
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


class Scrape:
    """One scrape, queried by sample name and a subset of labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels``."""
        return sum(v for _, _, v in self._matching(name, labels))

    def by(self, name: str, *keys: str, **labels: str) -> dict[tuple[str, ...], float]:
        """``sum by (keys)``: totals per combination of the ``keys`` labels."""
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for _, lab, v in self._matching(name, labels):
            out[tuple(lab.get(k, "") for k in keys)] += v
        return dict(out)

    def quantile(self, q: float, histogram: str, **labels: str) -> float:
        """``histogram_quantile(q, sum by (le) (histogram_bucket{labels}))``."""
        per_bound = self.by(f"{histogram}_bucket", "le", **labels)
        return histogram_quantile(q, [(float(le), n) for (le,), n in per_bound.items()])

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [lab for n, lab, _ in self.samples if n == name]

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples}

    def _matching(
        self, name: str, labels: dict[str, str]
    ) -> list[tuple[str, dict[str, str], float]]:
        return [
            s
            for s in self.samples
            if s[0] == name and all(s[1].get(k) == want for k, want in labels.items())
        ]


def scrape(base_url: str, timeout: float = 10.0) -> Scrape:
    """GET ``base_url/metrics`` and parse it."""
    r = requests.get(f"{base_url.rstrip('/')}/metrics", timeout=timeout)
    r.raise_for_status()
    return Scrape(r.text)
