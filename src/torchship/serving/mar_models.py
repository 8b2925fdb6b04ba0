"""TorchServe model archives served natively: no Java, the archive's own handler.

A ``.mar`` becomes a loaded model like any store version (same routing, traffic
policies, metrics, health), but it answers TorchServe's inference API the way
TorchServe does: each request goes to the handler as TorchServe's ``data`` row, the
handler's ``handle(data, context)`` runs on a *batch* of requests (up to the archive's
``batchSize``, waiting at most ``maxBatchDelay`` ms), and its per-request answer,
status and headers go back as they are.

A *worker* is what TorchServe calls one: a handler instance with its own copy of the
model, taking one batch at a time. TorchServe runs each in a process; torchship runs
each on a thread of the serving process (torch releases the GIL while it computes).
``minWorkers`` workers start with the model; ``PUT /models/NAME?min_worker=N`` scales
them, and requests go to the worker with the shortest queue.

The archive is unpacked (safely: :mod:`torchship.archive.reader`) into a temp folder
that is removed when the model is unloaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from torchship.archive import ArchiveError, ArchiveLimits, MarInfo, extract_archive
from torchship.batching import DynamicBatcher
from torchship.errors import (
    ConflictError,
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    TorchshipError,
)
from torchship.runtime import Predictor
from torchship.serving.handlers import Handler
from torchship.serving.payloads import Payload
from torchship.serving.settings import archive_spec
from torchship.store import Manifest, validate_name
from torchship.store.manifest import InputSpec
from torchship.torchserve.contract import (
    Context,
    EntryPoint,
    archive_imports,
    encode_output,
    load_entry_point,
)

if TYPE_CHECKING:
    from torchship.serving.service import InferenceService, LoadedModel

log = logging.getLogger("torchship.serving")

ARCHIVE_RUNTIME = "torchserve-handler"
MAX_WORKERS = 64


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveConfig:
    """TorchServe's per-model settings, from ``model-config.yaml`` and registration."""

    batch_size: int = 1
    max_batch_delay_ms: int = 100
    min_workers: int = 1
    max_workers: int = 1
    response_timeout_s: int = 120

    @classmethod
    def build(cls, yaml_config: Mapping[str, Any], **overrides: int | None) -> ArchiveConfig:
        keys = {
            "batch_size": "batchSize",
            "max_batch_delay_ms": "maxBatchDelay",
            "min_workers": "minWorkers",
            "max_workers": "maxWorkers",
            "response_timeout_s": "responseTimeout",
        }
        values: dict[str, int] = {}
        for field, key in keys.items():
            raw = overrides.get(field)
            if raw is None:
                raw = yaml_config.get(key)
            if raw is None:
                continue
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ArchiveError(f"{key} must be an integer, got {raw!r}.")
            values[field] = raw
        if "max_workers" not in values and "min_workers" in values:
            values["max_workers"] = max(values["min_workers"], cls.max_workers)
        config = cls(**values)
        if config.batch_size < 1 or config.max_batch_delay_ms < 0 or config.min_workers < 0:
            raise ArchiveError(
                "batchSize must be >= 1, maxBatchDelay and minWorkers >= 0.",
                hint=f"Got {config}.",
            )
        if config.max_workers < config.min_workers:
            raise ArchiveError("maxWorkers cannot be less than minWorkers.")
        if config.min_workers > MAX_WORKERS:
            raise ArchiveError(f"At most {MAX_WORKERS} workers per model.")
        return config


# --- requests and answers -----------------------------------------------------------------


@dataclass
class ArchiveRequest:
    """One request as TorchServe hands it to a handler."""

    data: dict[str, Any]  # parameter name -> value (``body``, form fields, query params)
    headers: dict[str, Any]  # request headers, and {parameter: {"content-type": ...}}
    request_id: str


@dataclass(frozen=True)
class ArchiveAnswer:
    status: int
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class FormField:
    name: str
    value: bytes | str
    content_type: str | None = None


def decode_value(raw: bytes, content_type: str | None) -> Any:
    """TorchServe's decoding of a parameter: JSON parsed, ``text/*`` as str, else bytearray
    (undecodable JSON or text is passed on as bytes, as TorchServe does)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        if kind == "application/json":
            return json.loads(raw)
        if kind.startswith("text"):
            return raw.decode("utf-8")
    except (ValueError, RecursionError):
        pass
    return bytearray(raw)


def archive_request(
    body: bytes,
    content_type: str | None,
    headers: Mapping[str, str],
    query: Iterable[tuple[str, str]] = (),
    form: Iterable[FormField] | None = None,
) -> ArchiveRequest:
    """Build the handler's ``data`` row from an HTTP request: query parameters, then the
    form fields of a multipart/urlencoded body, or the whole body as ``body``."""
    data: dict[str, Any] = {}
    meta: dict[str, Any] = {k.lower(): v for k, v in headers.items()}
    for name, value in query:
        data[name] = value
    if form is not None:
        for f in form:
            if isinstance(f.value, str):
                data[f.name] = f.value
            else:
                data[f.name] = decode_value(f.value, f.content_type)
            meta[f.name] = {"content-type": f.content_type or ""}
    elif body:
        data["body"] = decode_value(body, content_type)
        meta["body"] = {"content-type": content_type or ""}
    if not data:
        raise InvalidInputError("The request carries no input.", hint="Send a body.")
    return ArchiveRequest(data, meta, meta.get("x-request-id") or str(uuid.uuid4()))


class HandlerError(TorchshipError):
    """A handler refused a whole batch with a status (TorchServe's PredictionException)."""

    code = "handler_error"


# --- workers ------------------------------------------------------------------------------


class ArchiveWorker:
    """One handler instance with its model, fed batches by its own dynamic batcher."""

    def __init__(self, archive: ArchivePredictor, number: int) -> None:
        self.archive = archive
        self.id = str(number)
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        m = archive.info.manifest
        self.context = Context(
            archive.name,
            archive.model_dir,
            m.model_dump(by_alias=True, exclude_none=True),
            archive.config.batch_size,
            (archive.device.index or 0) if archive.device.type == "cuda" else None,
            model_yaml_config=archive.yaml_config,
            metrics=archive.record_metric,
        )
        with archive_imports(archive.model_dir):
            self.entry: EntryPoint = load_entry_point(archive.model_dir, archive.handler)
            self.entry.initialize(self.context)
        self.batcher: DynamicBatcher[ArchiveRequest, ArchiveAnswer] = DynamicBatcher(
            self._run,
            max_batch_size=archive.config.batch_size,
            max_delay_ms=archive.config.max_batch_delay_ms,
            max_queue_size=archive.max_queue_size,
            timeout_s=archive.timeout_s,
            name=f"{archive.name}:{archive.version}#{self.id}",
            on_batch=archive.on_batch,
        )
        self.batcher.start()

    def _run(self, requests: list[ArchiveRequest]) -> list[ArchiveAnswer | Exception]:
        ctx = self.context
        ctx.begin_batch([r.request_id for r in requests], [r.headers for r in requests])
        try:
            outputs = self.entry.handle([r.data for r in requests], ctx)
        except TorchshipError:
            raise
        except Exception as exc:
            code = getattr(exc, "error_code", None)  # TorchServe's PredictionException
            if isinstance(code, int) and 400 <= code < 600:
                error = HandlerError(str(getattr(exc, "message", exc)))
                error.status_code = code
                raise error from exc
            raise
        if not isinstance(outputs, list) or len(outputs) != len(requests):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise InferenceError(
                f"{self.entry.description} returned {got} answers for {len(requests)} "
                "requests; handle() must return a list with one answer per request."
            )
        answers: list[ArchiveAnswer | Exception] = []
        for i, value in enumerate(outputs):
            try:
                body, content_type = encode_output(value)
            except TorchshipError as exc:
                log.error("%s: answer %d of a batch: %s", self.entry.description, i, exc)
                answers.append(exc)
                continue
            status, _phrase = ctx.get_response_status(i)
            headers = {k.lower(): str(v) for k, v in ctx.get_response_headers(i).items()}
            headers.setdefault("content-type", content_type)
            answers.append(ArchiveAnswer(status, body, headers))
        return answers

    def stop(self, drain: bool, timeout: float) -> None:
        self.batcher.stop(drain=drain, timeout=timeout)


class ArchivePredictor(Predictor):
    """A loaded archive: its unpacked folder, config and workers. ``predict`` is not how
    it is used (its handler takes whole requests); :meth:`asubmit` is."""

    runtime = ARCHIVE_RUNTIME  # type: ignore[assignment]

    def __init__(
        self,
        info: MarInfo,
        model_dir: Path,
        workdir: Path,
        *,
        name: str,
        url: str,
        handler: str,
        config: ArchiveConfig,
        yaml_config: dict[str, Any],
        service: InferenceService,
        loaded_at_startup: bool,
    ) -> None:
        from torchship.devices import resolve_device

        spec, labels = _spec_and_labels(model_dir)
        manifest = Manifest(
            name=name,
            version=info.manifest.model.version,
            description=f"TorchServe archive {url}",
            input=spec,
            labels=labels,
        )
        # gpu_id for the handler: TorchServe's handlers pick their device from it
        super().__init__(manifest, resolve_device(service.settings.device))
        self.info = info
        self.model_dir = model_dir
        self.workdir = workdir
        self.url = url
        self.handler = handler
        self.config = config
        self.yaml_config = yaml_config
        self.loaded_at_startup = loaded_at_startup
        self.max_queue_size = service.settings.max_queue_size
        self.timeout_s = service.settings.timeout_s
        self.graceful_timeout_s = service.settings.graceful_timeout_s
        metrics = service.metrics
        self.on_batch = lambda event: metrics.on_batch(name, self.version, event)
        self._custom = metrics.custom
        self.workers: list[ArchiveWorker] = []
        self._scale_lock = threading.Lock()
        self._numbers = 0

    def record_metric(
        self, kind: str, metric: str, unit: str, dims: dict[str, str], value: float
    ) -> None:
        """A handler's ``context.metrics`` call, labelled with this archive's model."""
        labels = {"model": self.name, "version": self.version, **dims}
        self._custom.record(kind, metric, unit, labels, value)

    # --- workers ----------------------------------------------------------------------

    def scale(self, count: int, max_count: int | None = None) -> int:
        """Start or stop workers until ``count`` run; returns the new count."""
        if count < 0 or count > MAX_WORKERS:
            raise InvalidInputError(f"Workers must be between 0 and {MAX_WORKERS}, got {count}.")
        with self._scale_lock:
            workers = list(self.workers)
            while len(workers) < count:
                self._numbers += 1
                workers.append(ArchiveWorker(self, self._numbers))
                self.workers = list(workers)
            extra, self.workers = workers[count:], workers[:count]
            self.config = ArchiveConfig(
                self.config.batch_size,
                self.config.max_batch_delay_ms,
                count,
                max(count, max_count or count),
                self.config.response_timeout_s,
            )
        for w in extra:  # out of dispatch already: let their queues drain
            w.stop(drain=True, timeout=self.graceful_timeout_s)
        return count

    def _pick(self) -> ArchiveWorker:
        workers = [w for w in self.workers if w.batcher.running]
        if not workers:
            raise ModelNotReadyError(
                f"{self.name}:{self.version} has no worker running.",
                retry_after=1.0,
                hint=f"Scale it up: PUT /models/{self.name}/{self.version}?min_worker=1 "
                "on the management port.",
            )
        return min(workers, key=lambda w: w.batcher.queue_depth)

    def submit(self, request: ArchiveRequest) -> ArchiveAnswer:
        return self._pick().batcher.submit(request)

    async def asubmit(self, request: ArchiveRequest) -> ArchiveAnswer:
        return await self._pick().batcher.asubmit(request)

    def pending(self) -> int:
        return sum(w.batcher.queue_depth for w in self.workers)

    # --- Predictor ----------------------------------------------------------------------

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        raise _tensor_path_error(self.name)

    def close(self) -> None:
        with self._scale_lock:
            workers, self.workers = self.workers, []
        for w in workers:
            w.stop(drain=False, timeout=self.graceful_timeout_s)
        self._custom.forget(model=self.name, version=self.version)  # no stale series
        shutil.rmtree(self.workdir, ignore_errors=True)


class ArchiveHandler(Handler):
    """Stands in for torchship's tensor handler: an archive's own handler takes whole
    TorchServe requests, so /predict and the V2 API point to /predictions."""

    def preprocess(self, payload: Payload) -> torch.Tensor:
        raise _tensor_path_error(self.predictor.name)


def _tensor_path_error(name: str) -> InvalidInputError:
    return InvalidInputError(
        f"{name} is a TorchServe archive, served by its own handler through TorchServe's "
        "inference API.",
        hint=f"POST the request to /predictions/{name}.",
    )


# --- loading ------------------------------------------------------------------------------


def resolve_archive_path(file: str, model_store: Path | None) -> Path:
    """A spec's archive path (a ``.mar``, ``.tar.gz`` or ``no-archive`` folder): relative
    ones live in the model store (or the working folder when none is set)."""
    path = Path(file).expanduser()
    if not path.is_absolute() and model_store is not None:
        path = model_store / path
    if not path.exists():
        raise ModelNotFoundError(
            f"Model archive {path} does not exist.",
            hint="Relative archive paths are looked up in the model store (--model-store).",
        )
    return path


def load_archive(
    service: InferenceService,
    spec: str | Path,
    *,
    model_name: str | None = None,
    initial_workers: int | None = None,
    batch_size: int | None = None,
    max_batch_delay_ms: int | None = None,
    response_timeout_s: int | None = None,
    handler: str | None = None,
    url: str | None = None,
    loaded_at_startup: bool = True,
) -> LoadedModel:
    """Unpack, check and start one archive (``[NAME=]FILE.mar`` or a path); the caller
    puts it into service (:meth:`InferenceService.install`)."""
    from torchship.serving.service import LoadedModel

    s = service.settings
    parsed = archive_spec(str(spec))
    spec_name, file = parsed if parsed is not None else (None, str(spec))
    path = resolve_archive_path(file, s.model_store)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="torchship-mar-"))
    predictor: ArchivePredictor | None = None
    try:
        info = extract_archive(
            path, workdir / "model", ArchiveLimits(max_total_bytes=s.max_archive_bytes)
        )
        m = info.manifest.model
        name = validate_name(model_name or spec_name or m.model_name)
        _check_free(service, name, m.version)
        yaml_config = _yaml_config(workdir / "model", m.config_file)
        config = ArchiveConfig.build(
            yaml_config,
            batch_size=batch_size,
            max_batch_delay_ms=max_batch_delay_ms,
            response_timeout_s=response_timeout_s,
        )
        predictor = ArchivePredictor(
            info,
            workdir / "model",
            workdir,
            name=name,
            url=url or path.name,
            handler=handler or m.handler,
            config=config,
            yaml_config=yaml_config,
            service=service,
            loaded_at_startup=loaded_at_startup,
        )
        workers = config.min_workers if initial_workers is None else initial_workers
        predictor.scale(workers, max(workers, config.max_workers))
        archive_handler = ArchiveHandler()
        archive_handler.setup(predictor, max_image_pixels=s.max_image_pixels)
        placeholder: DynamicBatcher[torch.Tensor, torch.Tensor] = DynamicBatcher(
            _refuse_tensors(name),
            max_batch_size=config.batch_size,
            max_delay_ms=config.max_batch_delay_ms,
            name=f"{name}:{m.version}",
        )
        placeholder.start()
    except Exception as exc:
        if predictor is not None:
            predictor.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(exc, TorchshipError):
            raise
        log.exception("archive %s failed to load", path.name)
        raise ModelLoadError(
            f"{path.name} failed to load: {type(exc).__name__}: {exc}",
            hint="Its handler's initialize() raised; the archive was not put into service.",
        ) from exc
    log.info(
        "loaded archive %s as %s:%s (handler %s, %d worker%s, batch %d, delay %d ms)",
        path.name,
        name,
        predictor.version,
        predictor.handler,
        len(predictor.workers),
        "" if len(predictor.workers) == 1 else "s",
        config.batch_size,
        config.max_batch_delay_ms,
    )
    return LoadedModel(
        predictor, archive_handler, placeholder, time.monotonic() - started, None, True
    )


def _refuse_tensors(name: str) -> Any:
    def run(items: list[torch.Tensor]) -> list[torch.Tensor]:
        raise _tensor_path_error(name)

    return run


def _check_free(service: InferenceService, name: str, version: str) -> None:
    for loaded in service.models():
        if loaded.name != name:
            continue
        if archive_of(loaded) is None:
            raise ConflictError(
                f"{name!r} is served from the model store; an archive cannot add versions to it.",
                hint="Register the archive under another name (model_name=...).",
            )
        if loaded.version == version:
            raise ConflictError(
                f"Model version {version} is already registered for model {name}.",
                hint=f"Unregister it first: DELETE /models/{name}/{version}.",
            )


def _yaml_config(model_dir: Path, config_file: str | None) -> dict[str, Any]:
    if not config_file:
        return {}
    try:
        data = yaml.safe_load((model_dir / config_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ArchiveError(f"The archive's {config_file} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ArchiveError(f"The archive's {config_file} must hold a mapping.")
    return data


def _spec_and_labels(model_dir: Path) -> tuple[InputSpec | None, list[str] | None]:
    """The input spec torchship's archives carry, and the labels of index_to_name.json."""
    spec = None
    labels = None
    try:
        spec_file = model_dir / "torchship.json"
        if spec_file.is_file():
            raw = json.loads(spec_file.read_text()).get("input")
            spec = InputSpec.model_validate(raw) if raw else None
        labels_file = model_dir / "index_to_name.json"
        if labels_file.is_file():
            mapping = json.loads(labels_file.read_text())
            if isinstance(mapping, dict) and all(str(k).isdigit() for k in mapping):
                labels = [str(mapping[k]) for k in sorted(mapping, key=int)]
    except (ValueError, OSError):
        log.warning("%s: unreadable torchship.json or index_to_name.json; ignored", model_dir)
    return spec, labels


# --- requests -----------------------------------------------------------------------------


def archive_of(loaded: LoadedModel) -> ArchivePredictor | None:
    predictor = loaded.predictor
    return predictor if isinstance(predictor, ArchivePredictor) else None


def serves_archive(service: InferenceService, name: str) -> bool:
    """True when ``name`` is served from TorchServe archives (its requests go whole to
    the archive's handler)."""
    return any(m.name == name and archive_of(m) is not None for m in service.models())


async def apredict(
    service: InferenceService,
    request: ArchiveRequest,
    name: str,
    version: str | None,
    headers: Mapping[str, str] | None = None,
) -> tuple[LoadedModel, ArchiveAnswer]:
    """One TorchServe inference request (async front ends)."""
    started = time.monotonic()
    with service.lease(name, version, headers) as (loaded, route):
        archive = archive_of(loaded)
        if archive is None:
            raise InvalidInputError(f"{name} is not served from an archive.")
        with service._observed(loaded, route, started):
            return loaded, await archive.asubmit(request)


def predict(
    service: InferenceService,
    request: ArchiveRequest,
    name: str,
    version: str | None,
    headers: Mapping[str, str] | None = None,
) -> tuple[LoadedModel, ArchiveAnswer]:
    """One TorchServe inference request (threaded front ends)."""
    started = time.monotonic()
    with service.lease(name, version, headers) as (loaded, route):
        archive = archive_of(loaded)
        if archive is None:
            raise InvalidInputError(f"{name} is not served from an archive.")
        with service._observed(loaded, route, started):
            return loaded, archive.submit(request)


def process_id() -> int:
    return os.getpid()
