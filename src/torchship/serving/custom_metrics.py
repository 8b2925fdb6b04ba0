"""Metrics that model code defines at run time (TorchServe handlers' ``context.metrics``).

Each distinct name becomes one Prometheus family, ``torchship_handler_<name>``, created on
first use with the labels of that first use (``model``, ``version`` and the metric's own
dimensions, in any order). Model code is not trusted to keep a metric's shape: a later
call with another type or other dimensions, a counter step that is negative, NaN or
infinite, or a name that clashes with another family's series is logged once and
dropped, never raised into the request. Families are capped per model and series per
family, so a handler that puts request ids into dimension values cannot grow the scrape
without bound. A name keeps its first type and labels for the life of the server
(Prometheus has one family per name): with several worker processes, the first to
create a family records its shape in the shared metrics folder (:data:`SHAPES_DIR`),
and the others refuse a different one, so a merged scrape never holds one name twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import uuid
from collections import Counter as Tally
from dataclasses import dataclass, field
from pathlib import Path
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
SHAPES_DIR = "handler-metrics"
"""In the multiprocess metrics folder: one ``<family>.json`` per handler metric, written
once by the worker that created it first."""
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

    def __init__(self, registry: CollectorRegistry, shared_dir: Path | None = None) -> None:
        self.registry = registry
        self.shapes = shared_dir / SHAPES_DIR if shared_dir is not None else None
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
        labelnames = tuple(labels)
        conflict = self._claim(full, kind, name, labelnames)
        if conflict is not None:
            self._refused.add(full)
            self._warn(full, f"{conflict}; dropped")
            return None
        doc = f"Handler metric {name!r}" + (f" ({unit})" if unit else "") + "."
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

    def _claim(self, full: str, kind: Kind, name: str, labelnames: tuple[str, ...]) -> str | None:
        """Fix the family's shape for every worker process (the first one's wins); the
        reason to refuse this one, or None. Without a shared folder: nothing to agree."""
        if self.shapes is None:
            return None
        shape = {"kind": kind, "name": name, "labels": sorted(labelnames)}
        target = self.shapes / f"{full}.json"
        tmp = self.shapes / f".{full}.{uuid.uuid4().hex}.tmp"
        try:
            self.shapes.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(shape))
            os.link(tmp, target)  # atomic, and fails if another process was first
            return None
        except FileExistsError:
            pass
        except OSError as exc:  # an unwritable folder: this process decides alone
            self._warn(full, f"its shape cannot be shared with other workers ({exc})")
            return None
        finally:
            tmp.unlink(missing_ok=True)
        try:
            first = json.loads(target.read_text())
        except (OSError, ValueError):
            return "its shape in another worker process cannot be read"
        if first == shape:
            return None
        return (
            f"another worker process made it a {first.get('kind')} named "
            f"{first.get('name')!r} with labels {first.get('labels')}, not a {kind} named "
            f"{name!r} with labels {sorted(labelnames)}"
        )

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
