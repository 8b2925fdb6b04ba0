"""What both front ends share: exceptions to responses (one place), background start."""

from __future__ import annotations

import atexit
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from torchship.errors import ServiceUnavailableError, TorchshipError

if TYPE_CHECKING:
    from torchship.serving.service import InferenceService

log = logging.getLogger("torchship.serving")

JSON = "application/json"


def error_response(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) for ``exc``; unknown errors are logged once and hidden."""
    if isinstance(exc, TorchshipError):
        headers: dict[str, str] = exc.response_headers()
        if isinstance(exc, ServiceUnavailableError):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        if "version" in exc.details and "model" in exc.details:
            headers["X-Model-Name"] = str(exc.details["model"])
            headers["X-Model-Version"] = str(exc.details["version"])
        return exc.status_code, exc.to_dict(), headers
    log.error("unhandled error while serving a request", exc_info=exc)
    return 500, {"error": "Internal server error.", "code": "internal_error"}, {}


def dumps(body: Any) -> bytes:
    """Compact JSON; orjson, a fraction of ``json.dumps``'s cost on every answer.

    orjson would write NaN as null: handlers refuse non-finite outputs before this. Keys
    that are not strings (ints, in a handler's or a status field's dict) are written as
    strings, as ``json.dumps`` does; only answers that hold one pay for the second try.
    """
    try:
        return orjson.dumps(body)
    except TypeError:
        return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)


async def send_asgi_error(
    send: Callable[[dict[str, Any]], Awaitable[None]],
    exc: BaseException,
    extra: dict[str, str] | None = None,
) -> None:
    """``exc`` as the JSON error response, straight to an ASGI ``send`` (middleware that
    answers before, or instead of, the app)."""
    status, body, headers = error_response(exc)
    payload = dumps(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in {**headers, **(extra or {})}.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def start_in_background(service: InferenceService) -> threading.Thread:
    """Load the models on a thread so liveness answers at once and readiness when warm.

    A process that exits while it loads (Ctrl-C on the dev server, SIGTERM at start-up)
    first lets it finish the model in hand and load no more: the interpreter must not
    shut down under a runtime's native threads (that aborts the process).
    """

    def finish_loading() -> None:  # one per loader: atexit.unregister drops by identity
        stop_loading(service, thread)

    def run() -> None:
        try:
            service.start()
        except Exception:
            log.exception("loading the models failed; the server stays not-ready")
        finally:
            atexit.unregister(finish_loading)

    thread = threading.Thread(target=run, name="torchship-loader", daemon=True)
    atexit.register(finish_loading)
    thread.start()
    return thread


def stop_loading(service: InferenceService, loader: threading.Thread) -> None:
    """Let ``loader`` finish the model in hand and load no more (then ``service.stop``)."""
    if loader.is_alive():
        service.abandon_start()
        loader.join(service.settings.graceful_timeout_s)


MANAGEMENT_PREFIX = "/manage"
_SHARED = ("/health/", "/metrics")


def is_management(path: str) -> bool:
    """True for the management API's routes: they need the admin scope when auth is on,
    and live on the management port when one is set."""
    return path == MANAGEMENT_PREFIX or path.startswith(MANAGEMENT_PREFIX + "/")


def port_refuses(path: str, port: int | None, management_port: int | None) -> bool:
    """True when ``path`` must not be answered on ``port``: with a management port set,
    management routes live only there and inference routes only elsewhere (health and
    metrics answer on both)."""
    if management_port is None or port is None or path.startswith(_SHARED):
        return False
    return is_management(path) != (port == management_port)
