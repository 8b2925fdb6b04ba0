"""TorchServe's management API over the serving core, framework-free.

The shapes and status codes are TorchServe 0.12's (``GET /models`` with pagination,
describe, register, scale workers, set-default, unregister), so TorchServe's clients
and scripts work against torchship. It serves store models and archives alike;
registering loads archives (``.mar``, ``.tar.gz``, ``no-archive`` folders) from the
model store only (a URL only when ``allow_url_registration`` is on). Errors use torchship's one JSON error shape.

It lives with the rest of the management API: under ``/manage/torchserve`` on any
server, and at TorchServe's own paths (``/models...``) on the management port, where
:class:`TorchServePathsASGI` / :class:`TorchServePathsWSGI` map those paths onto it.

What "workers" means natively: for an archive, handler instances (threads, see
:mod:`torchship.serving.mar_models`); a store model has one dynamic batcher per server
process, so it reports one worker and cannot be scaled here (use ``--workers``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from torchship.archive.sources import is_archive_name
from torchship.errors import (
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    ModelNotFoundError,
    TorchshipError,
    VersionNotFoundError,
)
from torchship.rollout.policies import CanaryPolicy, FixedPolicy, ShadowPolicy, SplitPolicy
from torchship.serving import mar_models
from torchship.serving.management import Management
from torchship.serving.service import InferenceService, LoadedModel
from torchship.store import validate_name

log = logging.getLogger("torchship.serving")

PREFIX = "/manage/torchserve"
DEFAULT_LIMIT = 100
DOWNLOAD_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 60.0


class ArchiveDownloadError(TorchshipError):
    status_code = 400
    code = "download_failed"


def status(message: str) -> dict[str, str]:
    return {"status": message}


class TorchServeManagement:
    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.management = Management(service)

    # --- reading ------------------------------------------------------------------------

    def list_models(
        self, limit: str | None = None, next_page_token: str | None = None
    ) -> dict[str, Any]:
        """``{"models": [{"modelName", "modelUrl"}], "nextPageToken"?}``, by name; the
        URL is the default version's."""
        size = _int(limit, "limit", DEFAULT_LIMIT)
        offset = _int(next_page_token, "next_page_token", 0)
        if size < 0 or size > DEFAULT_LIMIT:
            size = DEFAULT_LIMIT  # as TorchServe does
        offset = max(0, offset)
        names = sorted(self.service.model_names())
        page = names[offset : offset + size]
        body: dict[str, Any] = {}
        if offset + size <= len(names):  # TorchServe's rule, kept for its clients
            body["nextPageToken"] = str(offset + size)
        body["models"] = [
            {"modelName": n, "modelUrl": self._url(self._loaded(n, self.default_version(n)))}
            for n in page
        ]
        return body

    def describe(self, name: str, version: str | None = None) -> list[dict[str, Any]]:
        """One entry per version: the default (``version`` None), one, or ``"all"``."""
        self._require_model(name)
        if version == "all":
            versions = sorted(self.service.versions(name))
        else:
            versions = [version or self.default_version(name)]
        return [self._describe(self._loaded(name, v)) for v in versions]

    def default_version(self, name: str) -> str:
        router = self.service.traffic.router(name)
        policy = router.policy if router is not None else None
        loaded = self.service.versions(name)
        if isinstance(policy, FixedPolicy):
            candidate = policy.version
        elif isinstance(policy, CanaryPolicy):
            candidate = policy.baseline
        elif isinstance(policy, ShadowPolicy):
            candidate = policy.primary
        elif isinstance(policy, SplitPolicy):
            candidate = max(policy.weights, key=lambda v: policy.weights[v])
        else:
            candidate = ""
        if candidate in loaded:
            return candidate
        if not loaded:
            raise ModelNotFoundError(f"Model not found: {name}")
        return loaded[0]

    # --- changing -----------------------------------------------------------------------

    def register(self, params: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        """``POST /models?url=FILE.mar[&model_name=..&initial_workers=N&batch_size=..]``."""
        self._one_process("register")
        url = params.get("url")
        if not url:
            raise InvalidInputError("Parameter url is required.", hint="POST /models?url=NAME.mar")
        initial = _int(params.get("initial_workers"), "initial_workers", 0)
        batch_size = _opt_int(params.get("batch_size"), "batch_size")
        delay = _opt_int(params.get("max_batch_delay"), "max_batch_delay")
        timeout = _opt_int(params.get("response_timeout"), "response_timeout")
        runtime = params.get("runtime")
        if runtime and runtime.lower() not in ("python", "python3"):
            raise InvalidInputError(f"Runtime {runtime!r} is not supported; use python.")
        model_name = params.get("model_name")
        if model_name:
            validate_name(model_name)
        with self.service.admin_lock:
            path, shown = self._archive_path(url)
            loaded = mar_models.load_archive(
                self.service,
                str(path),
                model_name=model_name,
                initial_workers=initial,
                batch_size=batch_size,
                max_batch_delay_ms=delay,
                response_timeout_s=timeout,
                handler=params.get("handler") or None,
                url=shown,
                loaded_at_startup=False,
            )
            self.service.install(loaded)
        message = (
            f'Model "{loaded.name}" Version: {loaded.version} registered with {initial} '
            "initial workers"
        )
        if initial == 0:
            message += ". Use scale workers API to add workers for the model."
        return 200, status(message)

    def scale(
        self, name: str, version: str | None, params: Mapping[str, str]
    ) -> tuple[int, dict[str, str]]:
        """``PUT /models/{name}[/{version}]?min_worker=N[&max_worker=M&synchronous=true]``."""
        self._require_model(name)
        self._one_process("scale")
        min_worker = _int(params.get("min_worker"), "min_worker", 1)
        max_worker = _int(params.get("max_worker"), "max_worker", min_worker)
        if not 0 <= min_worker <= mar_models.MAX_WORKERS:
            raise InvalidInputError(
                f"min_worker must be between 0 and {mar_models.MAX_WORKERS}, got {min_worker}."
            )
        if max_worker < min_worker:
            raise InvalidInputError("max_worker cannot be less than min_worker.")
        synchronous = _flag(params.get("synchronous"))  # checked before a 202 is promised
        loaded = self._loaded(name, version or self.default_version(name))
        archive = mar_models.archive_of(loaded)
        if archive is None:
            if min_worker != 1:
                raise InvalidInputError(
                    f"{name} is served from the model store: one dynamic batcher per server "
                    "process, which cannot be scaled here.",
                    hint="Run more server processes instead (torchship serve --workers N).",
                )
        elif synchronous:
            archive.scale(min_worker, max_worker)
        else:
            threading.Thread(
                target=self._scale_in_background,
                args=(archive, min_worker, max_worker),
                name=f"torchship-scale-{name}",
                daemon=True,
            ).start()
            return 202, status("Processing worker updates...")
        message = f"Workers scaled to {min_worker} for model: {name}"
        if version:
            message += f", version: {version}"
        return 200, status(message)

    def set_default(self, name: str, version: str) -> dict[str, str]:
        self._require_model(name)
        self._loaded(name, version)
        self.management.set_policy(
            name,
            {
                "policy": {"kind": "fixed", "version": version},
                "reason": "set-default through TorchServe's management API",
            },
        )
        return status(f'Default version successfully updated for model "{name}" to "{version}"')

    def unregister(self, name: str, version: str | None) -> dict[str, str]:
        """``DELETE /models/{name}[/{version}]``: a version that is not the default, or
        the last one (the model goes with it)."""
        self._one_process("unregister")
        with self.service.admin_lock:
            self._require_model(name)
            default = self.default_version(name)
            version = version or default
            loaded = self._loaded(name, version)
            versions = self.service.versions(name)
            if version == default and len(versions) > 1:
                raise ForbiddenError(
                    f"Cannot remove default version for model {name}",
                    hint=f"Set another default first: PUT /models/{name}/VERSION/set-default.",
                )
            if len(versions) == 1:
                if mar_models.archive_of(loaded) is None:
                    raise ConflictError(
                        f"{name}:{version} is the model store's only loaded version of {name}.",
                        hint="Store models stay served; load another version first.",
                    )
                self.service.unload(name, version, remove_model=True)
            else:
                self.management.unload(name, version)
        return status(f'Model "{name}" unregistered')

    # --- helpers ------------------------------------------------------------------------

    def _scale_in_background(self, archive: mar_models.ArchivePredictor, n: int, m: int) -> None:
        try:
            archive.scale(n, m)
        except Exception:
            log.exception("scaling %s:%s to %d workers failed", archive.name, archive.version, n)

    def _one_process(self, what: str) -> None:
        """Loading and unloading change one server process; with several, refuse."""
        processes = self.service.settings.worker_count()
        if processes > 1:
            raise ConflictError(
                f"This server runs {processes} worker processes; {what} would change only "
                "the one that got this request.",
                hint="Name the archives at start (--models), or run one worker process.",
            )

    def _require_model(self, name: str) -> None:
        validate_name(name)
        if name not in self.service.model_names():
            raise ModelNotFoundError(f"Model not found: {name}")

    def _loaded(self, name: str, version: str) -> LoadedModel:
        validate_name(version, "model version")
        for m in self.service.models():
            if m.name == name and m.version == version:
                return m
        raise VersionNotFoundError(f"Model version {version} does not exist for model {name}")

    def _url(self, loaded: LoadedModel) -> str:
        archive = mar_models.archive_of(loaded)
        if archive is not None:
            return archive.url
        return str(self.service.store.path(loaded.name, loaded.version))

    def _describe(self, loaded: LoadedModel) -> dict[str, Any]:
        archive = mar_models.archive_of(loaded)
        if archive is not None:
            c = archive.config
            workers = [
                _worker(w.id, w.started_at, "READY" if w.batcher.running else "UNLOADING")
                for w in archive.workers
            ]
            batch, delay = c.batch_size, c.max_batch_delay_ms
            min_w, max_w, timeout = c.min_workers, c.max_workers, c.response_timeout_s
            pending, at_startup = archive.pending(), archive.loaded_at_startup
        else:
            workers = [_worker("1", "", "READY" if loaded.ready else "UNLOADING")]
            batch, delay = loaded.batcher.max_batch_size, round(loaded.batcher.max_delay_ms)
            min_w = max_w = 1
            timeout = round(self.service.settings.timeout_s)
            pending, at_startup = loaded.batcher.queue_depth, True
        return {
            "modelName": loaded.name,
            "modelVersion": loaded.version,
            "modelUrl": self._url(loaded),
            "runtime": "python",
            "minWorkers": min_w,
            "maxWorkers": max_w,
            "batchSize": batch,
            "maxBatchDelay": delay,
            "responseTimeout": timeout,
            "deviceType": loaded.predictor.device.type,
            "loadedAtStartup": at_startup,
            "torchshipRuntime": loaded.predictor.runtime,
            "workers": workers,
            "jobQueueStatus": {
                "remainingCapacity": max(0, self.service.settings.max_queue_size - pending),
                "pendingRequests": pending,
            },
        }

    def _archive_path(self, url: str) -> tuple[Path, str]:
        """The local archive ``url`` names (downloaded first if it is an allowed URL)."""
        store = self.service.settings.model_store
        if store is None:
            raise InvalidInputError(
                "This server has no model store, so it registers no archives.",
                hint="Start it with --model-store DIR.",
            )
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme in ("http", "https"):
            return self._download(url, store), url
        if parsed.scheme:
            raise InvalidInputError(
                f"Unsupported URL scheme {parsed.scheme!r}.",
                hint="Name a .mar file in the model store, or an http(s) URL.",
            )
        if ".." in Path(url).parts:
            raise ModelNotFoundError(f"Relative path is not allowed in url: {url}")
        path = Path(url)
        candidate = path if path.is_absolute() else store / path
        try:
            resolved = candidate.resolve(strict=True)
        except OSError:
            raise ModelNotFoundError(f"Model not found at: {url}") from None
        if resolved.parent != store.resolve() or not (resolved.is_file() or resolved.is_dir()):
            raise ModelNotFoundError(
                f"Model not found at: {url}",
                hint="Archives (.mar, .tar.gz, no-archive folders) register from the model "
                "store folder itself, not elsewhere.",
            )
        return resolved, path.name

    def _download(self, url: str, store: Path) -> Path:
        if not self.service.settings.allow_url_registration:
            raise ForbiddenError(
                "Registering models from a URL is turned off.",
                hint="Copy the .mar into the model store, or start the server with "
                "allow_url_registration (TORCHSHIP_ALLOW_URL_REGISTRATION=true).",
            )
        import requests

        filename = Path(urllib.parse.urlparse(url).path).name
        try:
            validate_name(filename, "archive file name")
        except TorchshipError:
            raise InvalidInputError(f"The URL {url} does not end in a usable .mar name.") from None
        if not is_archive_name(filename):
            raise InvalidInputError(f"The URL {url} does not name a .mar or .tar.gz file.")
        target = store / filename
        if target.exists():
            raise ConflictError(
                f"{filename} already exists in the model store.",
                hint=f"Register it by name: POST /models?url={filename}",
            )
        limit = self.service.settings.max_archive_bytes
        tmp = store / f".{filename}.{uuid.uuid4().hex}.download"
        try:
            with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as r:
                r.raise_for_status()
                size = 0
                with tmp.open("wb") as out:
                    for block in r.iter_content(DOWNLOAD_CHUNK):
                        size += len(block)
                        if size > limit:
                            raise ArchiveDownloadError(
                                f"{url} is larger than {limit} bytes.",
                                hint="Raise max_archive_bytes.",
                            )
                        out.write(block)
            tmp.rename(target)
        except requests.RequestException as exc:
            raise ArchiveDownloadError(f"Failed to download archive from: {url} ({exc})") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return target


def _worker(wid: str, started: str, state: str) -> dict[str, Any]:
    return {
        "id": wid,
        "startTime": started,
        "status": state,
        "memoryUsage": 0,
        "pid": mar_models.process_id(),
        "gpu": False,
        "gpuUsage": "N/A",
    }


def _int(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"{name} must be an integer, got {value!r}.") from None


def _opt_int(value: str | None, name: str) -> int | None:
    return None if value is None or value == "" else _int(value, name, 0)


def _flag(value: str | None, name: str = "synchronous") -> bool:
    text = (value or "false").lower()
    if text not in ("true", "1", "yes", "false", "0", "no"):
        raise InvalidInputError(f"{name} must be true or false, got {value!r}.")
    return text in ("true", "1", "yes")


# --- TorchServe's paths on the management port ---------------------------------------------


def torchserve_path(path: str, port: int | None, management_port: int | None) -> str | None:
    """``/models...`` on the management port, mapped to where the API lives; else None."""
    if management_port is None or port != management_port:
        return None
    if path == "/models" or path.startswith("/models/"):
        return PREFIX + path
    return None


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class TorchServePathsASGI:
    """Pure ASGI middleware: TorchServe's management paths on the management port."""

    def __init__(self, app: ASGIApp, management_port: int | None) -> None:
        self.app = app
        self.management_port = management_port

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            server = scope.get("server") or (None, None)
            mapped = torchserve_path(scope["path"], server[1], self.management_port)
            if mapped is not None:
                scope = {**scope, "path": mapped, "raw_path": mapped.encode()}
        await self.app(scope, receive, send)


class TorchServePathsWSGI:
    """The same for WSGI (Flask under gunicorn)."""

    def __init__(self, app: Callable[..., Any], management_port: int | None) -> None:
        self.app = app
        self.management_port = management_port

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        port = None
        with contextlib.suppress(TypeError, ValueError):
            port = int(environ.get("SERVER_PORT", ""))
        mapped = torchserve_path(environ.get("PATH_INFO", ""), port, self.management_port)
        if mapped is not None:
            environ = {**environ, "PATH_INFO": mapped}
        return self.app(environ, start_response)
