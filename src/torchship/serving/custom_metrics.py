"""Metrics that model code defines at run time (TorchServe handlers' ``context.metrics``).

Each distinct name becomes one Prometheus family, ``torchship_handler_<name>``, created on
first use with the labels of that first use (``model``, ``version`` and the metric's own
dimensions, in any order). Model code is not trusted to keep a metric's shape: a later
call with another type or other dimensions, a counter step that is negative, NaN or
infinite, or a name that clashes with another family's series is logged once and
dropped, never raised into the request. Families are capped per model and series per
family, so a handler that puts request ids into dimension values cannot grow the scrape
without bound. A name keeps its first type and labels for the life of the process
(Prometheus has one family per name; across worker processes each checks its own).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("torchship.metrics")

Kind = Literal["counter", "gauge", "histogram"]
KINDS: tuple[Kind, ...] = ("counter", "gauge", "histogram")
PREFIX = "torchship_handler_"
MAX_FAMILIES = 64
"""Per model: the families its handler may create."""
MAX_SERIES = 256
"""Per family: label sets (an id in a dimension value would otherwise grow forever)."""
_RESERVED = {"le", "quantile", "pid"}
_BUCKETS: dict[str, tuple[float, ...]] = {
    "ms": (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000),
    "s": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    "percent": (1, 5, 10, 25, 50, 75, 90, 95, 99, 100),
}
_DECADES = (0.001, 0.01, 0.1, 1, 10, 100, 1000, 10_000, 100_000, 1_000_000)


@dataclass
class _Family:
    kind: Kind
    raw_name: str
    labelnames: tuple[str, ...]
    metric: Any
    series: set[tuple[str, ...]] = field(default_factory=set)


class CustomMetrics:
    """Families created on demand in ``registry``; :meth:`record` is thread-safe."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._families: dict[str, _Family] = {}
        self._refused: set[str] = set()
        self._per_model: Tally[str] = Tally()
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()

    def record(self, kind: str, name: str, unit: str, labels: dict[str, str], value: float) -> None:
        """Add ``value`` (counter), set it (gauge) or observe it (histogram).

        ``labels`` carries ``model`` (and usually ``version``) plus the dimensions.
        """
        if kind not in KINDS:
            raise ValueError(f"Unknown metric kind {kind!r}: one of {KINDS}.")
        full = metric_name(name)
        if not math.isfinite(value):
            self._warn(full, "a value that is NaN or infinite; dropped")
            return
        if kind == "counter" and value < 0:
            self._warn(full, "a counter cannot go down (a negative step); dropped")
            return
        with self._lock:
            family = self._families.get(full)
            if family is None:
                family = self._create(kind, full, str(name), unit, labels)
                if family is None:
                    return
            if family.raw_name != str(name):
                self._warn(full, f"{name!r} and {family.raw_name!r} name the same metric; dropped")
                return
            if family.kind != kind:
                self._warn(full, f"recorded as a {kind}, but it is a {family.kind}; dropped")
                return
            if set(family.labelnames) != set(labels):
                self._warn(
                    full,
                    f"dimensions {sorted(labels)} differ from its first use "
                    f"{sorted(family.labelnames)}; dropped",
                )
                return
            key = tuple(labels[n] for n in family.labelnames)
            if key not in family.series:
                if len(family.series) >= MAX_SERIES:
                    self._warn(full, f"more than {MAX_SERIES} label sets; new ones dropped")
                    return
                family.series.add(key)
            child = family.metric.labels(*key)
        if kind == "counter":
            child.inc(value)
        elif kind == "gauge":
            child.set(value)
        else:
            child.observe(value)

    def forget(self, **match: str) -> None:
        """Drop the series whose labels include ``match`` (an unloaded model version's)."""
        with self._lock:
            for family in self._families.values():
                if not all(k in family.labelnames for k in match):
                    continue
                where = [(family.labelnames.index(k), v) for k, v in match.items()]
                for key in [k for k in family.series if all(k[i] == v for i, v in where)]:
                    family.series.discard(key)
                    family.metric.remove(*key)

    def _create(
        self, kind: Kind, full: str, name: str, unit: str, labels: dict[str, str]
    ) -> _Family | None:
        model = labels.get("model", "")
        if full in self._refused:
            return None
        if self._per_model[model] >= MAX_FAMILIES:
            self._warn(full, f"model {model!r} has {MAX_FAMILIES} handler metrics; dropped")
            return None
        doc = f"Handler metric {name!r}" + (f" ({unit})" if unit else "") + "."
        labelnames = tuple(labels)
        metric: Any
        try:
            if kind == "counter":
                metric = Counter(full, doc, labelnames, registry=self.registry)
            elif kind == "gauge":  # across worker processes: the latest value of a live one
                metric = Gauge(
                    full,
                    doc,
                    labelnames,
                    registry=self.registry,
                    multiprocess_mode="livemostrecent",
                )
            else:
                buckets = _BUCKETS.get(unit, _DECADES)
                metric = Histogram(full, doc, labelnames, registry=self.registry, buckets=buckets)
        except ValueError as exc:  # a series another family writes ("x_total" of counter x)
            self._refused.add(full)
            self._warn(full, f"cannot be registered ({exc}); dropped")
            return None
        self._per_model[model] += 1
        family = self._families[full] = _Family(kind, name, labelnames, metric)
        return family

    def _warn(self, full: str, message: str) -> None:
        if (full, message) not in self._warned:
            self._warned.add((full, message))
            log.warning("handler metric %s: %s", full, message)


def metric_name(name: str) -> str:
    """``torchship_handler_`` + ``name`` with what Prometheus does not allow replaced."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_:]", "_", str(name))


def label_name(name: str) -> str:
    """A dimension name as a Prometheus label; names torchship uses get a ``dim_`` prefix."""
    text = re.sub(r"[^a-zA-Z0-9_]", "_", str(name)).lstrip("_") or "dim"
    if text[0].isdigit() or text in _RESERVED or text in ("model", "version"):
        text = f"dim_{text}"
    return text
