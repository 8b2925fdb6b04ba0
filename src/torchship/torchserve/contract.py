"""TorchServe's handler contract, emulated so torchship runs TorchServe handlers itself.

TorchServe calls a handler as ``handle(data, context)``: ``data`` is a list with one
dict per request of the batch (parameter name -> value: ``"body"`` for a raw body,
the field names of a multipart form, the query parameters), values decoded by
content type (JSON parsed, ``text/*`` as ``str``, anything else ``bytearray``), and it
answers with a list of one response per request. ``context`` carries the manifest,
``system_properties`` (``model_dir``, ``gpu_id``, ``batch_size`` ...), the model's
YAML config, per-request headers and the per-request response status and headers.

This module is that contract as torchship implements it (its own code, TorchServe's
facts): :class:`Context`, entry-point loading with TorchServe's rules, and the
encoding of handler outputs into HTTP bodies.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchship import __version__
from torchship.errors import (
    InferenceError,
    InvalidInputError,
    MissingDependencyError,
    ModelLoadError,
)
from torchship.runtime import Predictor
from torchship.serving.custom_metrics import KINDS, label_name
from torchship.serving.handlers import Handler
from torchship.serving.payloads import ImagePayload, Payload, TensorPayload

log = logging.getLogger("torchship.torchserve")

HandleFn = Callable[[Any, Any], Any]


class RequestProcessor:
    """One request's headers in, its response status and headers out."""

    def __init__(self, request_header: Mapping[str, Any]) -> None:
        self._request_header = dict(request_header)
        self._status_code = 200
        self._reason_phrase: str | None = None
        self._response_header: dict[str, str] = {}

    def get_request_property(self, key: str) -> Any:
        return self._request_header.get(key, self._request_header.get(key.lower()))

    def get_request_properties(self) -> dict[str, Any]:
        return self._request_header

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        self._status_code = int(code)
        self._reason_phrase = reason_phrase

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self) -> str | None:
        return self._reason_phrase

    def add_response_property(self, key: str, value: str) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict[str, str]:
        return self._response_header

    def get_response_header(self, key: str) -> str | None:
        return self._response_header.get(key)


MetricSink = Callable[[str, str, str, dict[str, str], float], None]
"""``(kind, name, unit, dimensions, value)``: where handler metrics go (see
:class:`torchship.serving.custom_metrics.CustomMetrics`)."""

_TIME_UNITS = ("ms", "s")
_SIZE_UNITS = ("MB", "kB", "GB", "B")
_DEFAULT_DIMENSIONS = ("ModelName", "Level")  # TorchServe's own; torchship labels the model


class MetricNotFoundError(KeyError):
    """``context.metrics.get_metric`` of a name never added (TorchServe raises here too)."""


class CachedMetric:
    """What ``add_metric_to_cache`` / ``get_metric`` return: ``add_or_update`` records."""

    def __init__(
        self, owner: HandlerMetrics, name: str, unit: str, dimension_names: list[str], kind: str
    ) -> None:
        self.owner = owner
        self.name = name
        self.unit = unit
        self.dimension_names = list(dimension_names)
        self.kind = kind

    def add_or_update(
        self, value: float, dimension_values: list[str] | None = None, request_id: Any = None
    ) -> None:
        values = list(dimension_values or [])
        if len(values) != len(self.dimension_names):  # TorchServe logs this and goes on
            self.owner._drop(
                self.name,
                f"has dimensions {self.dimension_names}, got {len(values)} values",
            )
            return
        dims = dict(zip(self.dimension_names, values, strict=True))
        self.owner._emit(self.kind, self.name, self.unit, dims, value)

    # TorchServe's older metric objects
    def update(self, value: float, request_id: Any = None, dimensions: Any = None) -> None:
        self.owner._emit(self.kind, self.name, self.unit, _dimensions(dimensions), value)


class HandlerMetrics:
    """``context.metrics``: TorchServe's custom metrics API.

    Exported on ``/metrics`` as ``torchship_handler_<name>`` with ``model`` and
    ``version`` labels plus the metric's own dimensions, typed as TorchServe types them:
    ``add_counter``/``add_error``/``add_metric`` count, ``add_time``/``add_size``/
    ``add_percent`` are gauges, and ``metric_type`` chooses (counter, gauge, histogram).
    The last value per name is also kept in ``values`` for handlers' own tests.
    """

    def __init__(self, model_name: str = "", sink: MetricSink | None = None) -> None:
        self.model_name = model_name
        self.sink = sink
        self.values: dict[str, float] = {}
        self.request_ids: Any = None
        self._cache: dict[tuple[str, str], CachedMetric] = {}
        self._dropped: set[tuple[str, str]] = set()

    def _emit(self, kind: str, name: str, unit: str, dims: dict[str, str], value: Any) -> None:
        name = str(name)
        if (name, kind) not in self._cache:  # as in TorchServe: add_* also caches it
            self._cache[(name, kind)] = CachedMetric(self, name, unit, list(dims), kind)
        try:
            number = float(value)
        except (TypeError, ValueError):
            self._drop(name, f"value {value!r} is not a number")
            return
        self.values[name] = self.values.get(name, 0.0) + number if kind == "counter" else number
        if self.sink is None:
            return
        labels: dict[str, str] = {}
        for key, text in dims.items():
            if str(key) in _DEFAULT_DIMENSIONS:
                continue
            label = label_name(key)
            if label in labels:
                self._drop(name, f"dimensions {list(dims)} give the label {label!r} twice")
                return
            labels[label] = str(text)
        try:
            self.sink(kind, name, unit, labels, number)
        except Exception:  # a metric must never fail the request that recorded it
            self._drop(name, "the metrics registry refused it", exc_info=True)

    def _drop(self, name: str, why: str, *, exc_info: bool = False) -> None:
        """Log a metric call that cannot be recorded, once per metric and reason."""
        if (name, why) not in self._dropped:
            self._dropped.add((name, why))
            log.warning("handler metric %s: %s; dropped", name, why, exc_info=exc_info)

    def add_metric(
        self,
        name: str,
        value: float,
        unit: str = "",
        idx: Any = None,
        dimensions: Any = None,
        metric_type: Any = "counter",
    ) -> None:
        self._emit(_kind(metric_type), name, unit, _dimensions(dimensions), value)

    def add_counter(self, name: str, value: float, idx: Any = None, dimensions: Any = None) -> None:
        self._emit("counter", name, "count", _dimensions(dimensions), value)

    def add_time(
        self,
        name: str,
        value: float,
        idx: Any = None,
        unit: str = "ms",
        dimensions: Any = None,
        metric_type: Any = "gauge",
    ) -> None:
        unit = _unit(unit, _TIME_UNITS, "time")
        self._emit(_kind(metric_type), name, unit, _dimensions(dimensions), value)

    def add_size(
        self,
        name: str,
        value: float,
        idx: Any = None,
        unit: str = "MB",
        dimensions: Any = None,
        metric_type: Any = "gauge",
    ) -> None:
        unit = _unit(unit, _SIZE_UNITS, "size")
        self._emit(_kind(metric_type), name, unit, _dimensions(dimensions), value)

    def add_percent(
        self,
        name: str,
        value: float,
        idx: Any = None,
        dimensions: Any = None,
        metric_type: Any = "gauge",
    ) -> None:
        self._emit(_kind(metric_type), name, "percent", _dimensions(dimensions), value)

    def add_error(self, name: str, value: float = 1, dimensions: Any = None) -> None:
        self._emit("counter", name, "", _dimensions(dimensions), value)

    def add_metric_to_cache(
        self,
        metric_name: str,
        unit: str = "",
        dimension_names: list[str] | None = None,
        metric_type: Any = "counter",
    ) -> CachedMetric:
        kind = _kind(metric_type)
        metric = CachedMetric(self, str(metric_name), unit, list(dimension_names or []), kind)
        self._cache[(metric.name, kind)] = metric
        return metric

    def get_metric(self, metric_name: str, metric_type: Any = "counter") -> CachedMetric:
        try:
            return self._cache[(str(metric_name), _kind(metric_type))]
        except KeyError:
            raise MetricNotFoundError(
                f"No {_kind(metric_type)} metric {metric_name!r}: add_metric_to_cache it first."
            ) from None


def _unit(unit: str, allowed: tuple[str, ...], what: str) -> str:
    """TorchServe refuses other units for time and size metrics; so does torchship."""
    if unit not in allowed:
        raise ValueError(f"The unit of a {what} metric is one of {list(allowed)}.")
    return unit


def _kind(metric_type: Any) -> str:
    """TorchServe's ``MetricTypes`` (an enum of "counter", "gauge", "histogram") or a str."""
    text = str(getattr(metric_type, "value", metric_type)).lower()
    if text not in KINDS:
        raise ValueError(f"Unknown metric type {metric_type!r}: counter, gauge or histogram.")
    return text


def _dimensions(dimensions: Any) -> dict[str, str]:
    """TorchServe ``Dimension`` objects (``.name``, ``.value``), pairs, or a mapping."""
    if not dimensions:
        return {}
    if isinstance(dimensions, Mapping):
        return {str(k): str(v) for k, v in dimensions.items()}
    out: dict[str, str] = {}
    for d in dimensions:
        name, value = (d.name, d.value) if hasattr(d, "name") else d
        out[str(name)] = str(value)
    return out


class Context:
    """The ``context`` a TorchServe handler receives, with TorchServe's attributes."""

    def __init__(
        self,
        model_name: str,
        model_dir: str | Path,
        manifest: Mapping[str, Any],
        batch_size: int,
        gpu: int | None = None,
        *,
        model_yaml_config: Mapping[str, Any] | None = None,
        limit_max_image_pixels: bool = True,
        metrics: MetricSink | None = None,
    ) -> None:
        self.model_name = model_name
        self.manifest = dict(manifest)
        self._system_properties = {
            "model_dir": str(model_dir),
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": "torchship",
            "server_version": __version__,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.model_yaml_config: dict[str, Any] = dict(model_yaml_config or {})
        self.metrics = HandlerMetrics(model_name, metrics)
        self.request_ids: dict[int, str] | None = None
        self.request_processor: list[RequestProcessor] = []
        self.stopping_criteria: Any = None

    @property
    def system_properties(self) -> dict[str, Any]:
        return self._system_properties

    def get_request_id(self, idx: int = 0) -> str | None:
        return None if self.request_ids is None else self.request_ids.get(idx)

    def get_request_header(self, idx: int, key: str) -> Any:
        return self.request_processor[idx].get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        return self.request_processor[idx].get_request_properties()

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> str | None:
        return self.get_response_headers(idx).get("content-type")

    def get_response_status(self, idx: int) -> tuple[int, str | None]:
        rp = self.request_processor[idx]
        return rp.get_response_status_code(), rp.get_response_status_phrase()

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        if 0 <= idx < len(self.request_processor):
            self.request_processor[idx].report_status(code, phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for rp in self.request_processor:
            rp.report_status(code, phrase)

    def get_response_headers(self, idx: int) -> dict[str, str]:
        return self.request_processor[idx].get_response_headers()

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.request_processor[idx].add_response_property(key, value)

    def get_sequence_id(self, idx: int) -> Any:
        return self.request_processor[idx].get_request_property("ts_request_sequence_id")

    def begin_batch(self, request_ids: list[str], headers: list[Mapping[str, Any]]) -> None:
        """Set the per-request state for one batch (TorchServe does this per predict)."""
        self.request_ids = dict(enumerate(request_ids))
        self.request_processor = [RequestProcessor(h) for h in headers]
        self.metrics.request_ids = self.request_ids


# --- entry points -------------------------------------------------------------------------


@dataclass
class EntryPoint:
    """A loaded handler: ``handle(data, context)`` and what initialises it."""

    handle: HandleFn
    initialize: Callable[[Context], Any]
    service: Any  # the handler instance (class entry points) or the module
    description: str


_IMPORT_LOCK = threading.Lock()


@contextlib.contextmanager
def archive_imports(model_dir: Path) -> Iterator[None]:
    """``model_dir`` first on ``sys.path`` while its handler imports and initialises (as
    TorchServe's worker runs inside it), and its top-level modules forgotten afterwards,
    so the next archive's ``model.py`` or ``handler.py`` is its own, not a cached one."""
    local = {p.stem for p in model_dir.glob("*.py")}
    local |= {p.name for p in model_dir.iterdir() if (p / "__init__.py").is_file()}
    with _IMPORT_LOCK:
        saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in local}
        for n in saved:
            del sys.modules[n]
        sys.path.insert(0, str(model_dir))
        importlib.invalidate_caches()
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(model_dir))
            for n in [n for n in sys.modules if n.split(".")[0] in local]:
                del sys.modules[n]
            sys.modules.update(saved)


def load_entry_point(model_dir: Path, handler: str) -> EntryPoint:
    """Resolve a manifest's ``handler`` with TorchServe's rules: ``module[.py][:function]``
    imported from the model folder, else a TorchServe built-in (``image_classifier`` ...,
    which needs the ``ts`` package); a module-level ``function`` (default ``handle``)
    wins, else the module's one class, instantiated. Call inside :func:`archive_imports`.
    """
    module_part, _, function = handler.partition(":")
    stem = module_part[:-3] if module_part.endswith(".py") else module_part
    stem = stem.rsplit("/", 1)[-1]
    if not stem.isidentifier():
        raise ModelLoadError(f"Handler {handler!r} does not name a Python module.")
    local = (model_dir / f"{stem}.py").is_file() or (model_dir / stem / "__init__.py").is_file()
    try:
        module = importlib.import_module(stem) if local else _builtin(stem, handler)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "ts":
            raise MissingDependencyError(
                "torchserve", "torchserve", f"The archive's handler {handler!r} (it imports ts)"
            ) from exc
        raise ModelLoadError(f"Handler {handler!r} could not be imported: {exc}") from exc
    function = function or "handle"
    entry = getattr(module, function, None)
    if callable(entry) and not isinstance(entry, type):
        fn = entry
        return EntryPoint(fn, lambda ctx: fn(None, ctx), module, f"{module.__name__}:{function}")
    classes = [
        c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__
    ]
    if len(classes) != 1:
        raise ModelLoadError(
            f"Handler module {module.__name__!r} must define a '{function}' function or "
            f"exactly one class; it defines {len(classes)} classes.",
            hint="TorchServe has the same rule: keep helper classes in another module.",
        )
    service = classes[0]()
    if not callable(getattr(service, "handle", None)):
        raise ModelLoadError(f"{classes[0].__name__} has no handle(data, context) method.")
    init = getattr(service, "initialize", None)
    return EntryPoint(
        service.handle,
        init if callable(init) else (lambda ctx: None),
        service,
        f"{module.__name__}.{classes[0].__name__}",
    )


def _builtin(stem: str, handler: str) -> Any:
    try:
        return importlib.import_module(f"ts.torch_handler.{stem}")
    except ModuleNotFoundError as exc:
        if exc.name in ("ts", "ts.torch_handler"):
            raise MissingDependencyError(
                "torchserve", "torchserve", f"TorchServe's built-in handler {handler!r}"
            ) from exc
        if exc.name == f"ts.torch_handler.{stem}":
            raise ModelLoadError(
                f"Handler {handler!r} is neither a file in the archive nor a TorchServe "
                "built-in handler."
            ) from exc
        raise


# --- outputs ------------------------------------------------------------------------------


def encode_output(value: Any) -> tuple[bytes, str]:
    """One handler response as TorchServe encodes it, and its default content type:
    bytes as they are, ``str`` as UTF-8, tensors as ``torch.save`` bytes, the rest JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "application/octet-stream"
    if isinstance(value, str):
        return value.encode(), "text/plain; charset=utf-8"
    if isinstance(value, torch.Tensor):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue(), "application/octet-stream"
    try:
        return json.dumps(value, indent=2).encode(), "application/json"
    except (TypeError, ValueError) as exc:
        raise InferenceError(
            f"The handler returned a {type(value).__name__}, which is not JSON-serialisable.",
            hint="Return dicts/lists of numbers and strings, str, or bytes per request.",
        ) from exc


# --- a TorchServe handler class over a store model ----------------------------------------


class _PredictorModel:
    """What a TorchServe handler calls as ``self.model``: the store version's predictor."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def __call__(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.predictor.predict(batch.float())

    def eval(self) -> _PredictorModel:
        return self

    def to(self, *args: Any, **kwargs: Any) -> _PredictorModel:
        return self


class ContractHandler(Handler):
    """A TorchServe-contract handler class serving a *store* model
    (``--handler NAME=file.py:Class``), with torchship's dynamic batching.

    The store already loaded the model, so the handler's ``initialize`` is not called;
    it gets what ``BaseHandler.initialize`` would set instead: ``model`` (the version's
    predictor, callable on a batch), ``device``, ``mapping`` (index -> label),
    ``manifest``, ``context`` and ``initialized``; and ``torchship_setup(predictor)`` is
    called if it defines one. Per request, ``preprocess([{"body": ...}])`` runs on the
    request's thread (an image's bytes, or ``{"inputs": [...]}`` for tensors);
    ``inference`` runs on dynamic batches; ``postprocess`` answers one item each.
    """

    def __init__(self, service: Any) -> None:
        self.service = service

    def setup(self, predictor: Predictor, *, max_image_pixels: int | None = None) -> None:
        super().setup(predictor, max_image_pixels=max_image_pixels)
        svc = self.service
        manifest = {"model": {"modelName": predictor.name, "modelVersion": predictor.version}}
        context = Context(predictor.name, "", manifest, 1)
        context.begin_batch(["0"], [{}])
        svc.model = _PredictorModel(predictor)
        svc.device = torch.device("cpu")  # predictors take and return CPU tensors
        svc.mapping = {str(i): label for i, label in enumerate(predictor.labels or [])} or None
        svc.manifest = manifest
        svc.context = context
        svc.initialized = True
        hook = getattr(svc, "torchship_setup", None)
        if callable(hook):
            hook(predictor)

    def preprocess(self, payload: Payload) -> torch.Tensor:
        if isinstance(payload, ImagePayload):
            row: dict[str, Any] = {"body": bytearray(payload.data)}
        elif isinstance(payload, TensorPayload):
            row = {"body": {"inputs": payload.array.tolist()}}
        else:
            raise InvalidInputError(f"Unsupported payload {type(payload).__name__}.")
        batch = self.service.preprocess([row])
        if not isinstance(batch, torch.Tensor):
            raise InferenceError(
                f"{type(self.service).__name__}.preprocess returned "
                f"{type(batch).__name__}, not a tensor."
            )
        return batch

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.service.inference(batch)
        return out[0] if isinstance(out, (tuple, list)) else out

    def postprocess(self, outputs: torch.Tensor, *, top_k: int) -> list[dict[str, Any]]:
        answers = self.service.postprocess(outputs)
        return [a if isinstance(a, dict) else {"output": a} for a in answers]
