"""Metrics that model code defines at run time (TorchServe handlers' ``context.metrics``).

Each distinct name becomes one Prometheus family, ``torchship_handler_<name>``, created on
first use with the labels of that first use (``model``, ``version`` and the metric's own
dimensions). Model code is not trusted to keep a metric's shape: a later call with
another type or other dimensions is logged once and dropped, never raised into the
request, and the number of families and series per family is capped so a handler that
puts request ids into dimension values cannot grow the scrape without bound.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("torchship.metrics")

Kind = Literal["counter", "gauge", "histogram"]
KINDS: tuple[Kind, ...] = ("counter", "gauge", "histogram")
PREFIX = "torchship_handler_"
MAX_FAMILIES = 64
MAX_SERIES = 256
_RESERVED = {"le", "quantile", "pid"}


@dataclass
class _Family:
    kind: Kind
    labelnames: tuple[str, ...]
    metric: Any
    series: set[tuple[str, ...]] = field(default_factory=set)


class CustomMetrics:
    """Families created on demand in ``registry``; :meth:`record` is thread-safe."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._families: dict[str, _Family] = {}
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()

    def record(self, kind: str, name: str, unit: str, labels: dict[str, str], value: float) -> None:
        """Add ``value`` (counter), set it (gauge) or observe it (histogram)."""
        if kind not in KINDS:
            raise ValueError(f"Unknown metric kind {kind!r}: one of {KINDS}.")
        full = metric_name(name)
        if kind == "counter" and value < 0:
            self._warn(full, f"a counter cannot go down (got {value}); dropped")
            return
        with self._lock:
            family = self._families.get(full)
            if family is None:
                if len(self._families) >= MAX_FAMILIES:
                    self._warn(full, f"more than {MAX_FAMILIES} handler metrics; dropped")
                    return
                family = self._families[full] = _new_family(
                    self.registry, kind, full, name, unit, tuple(labels)
                )
            if family.kind != kind:
                self._warn(full, f"recorded as a {kind}, but it is a {family.kind}; dropped")
                return
            if family.labelnames != tuple(labels):
                self._warn(
                    full,
                    f"dimensions {list(labels)} differ from its first use "
                    f"{list(family.labelnames)}; dropped",
                )
                return
            key = tuple(labels.values())
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


def _new_family(
    registry: CollectorRegistry,
    kind: Kind,
    full: str,
    name: str,
    unit: str,
    labelnames: tuple[str, ...],
) -> _Family:
    doc = f"Handler metric {name!r}" + (f" ({unit})" if unit else "") + "."
    metric: Any
    if kind == "counter":
        metric = Counter(full, doc, labelnames, registry=registry)
    elif kind == "gauge":  # across worker processes: the latest value of a live one
        metric = Gauge(full, doc, labelnames, registry=registry, multiprocess_mode="livemostrecent")
    else:
        metric = Histogram(full, doc, labelnames, registry=registry)
    return _Family(kind, labelnames, metric)
