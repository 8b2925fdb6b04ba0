"""Structured request logs: one request id on every line of a request, JSON or text lines,
and access lines with sampled, truncated and redacted request/response bodies.

The front ends open a :class:`RequestContext` per request (``X-Request-ID`` when the
client sent a sane one, else a fresh id; echoed in the response). Every log record made
while it is open (by torchship, uvicorn, a custom handler) gets ``request_id`` and, once
the request is routed, ``model`` and ``version`` through :class:`RequestContextFilter`.
:func:`configure_logging` installs that filter with a JSON or text formatter on the root
logger; :class:`AccessLog` writes the one line per request on ``torchship.access``.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import random
import re
import sys
import time
import traceback
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO
from urllib.parse import parse_qsl, urlencode

REQUEST_ID_HEADER = "X-Request-ID"
REDACTED = "[REDACTED]"
DEFAULT_REDACT_FIELDS = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api_key",
    "apikey",
    "password",
    "token",
    "secret",
)
ACCESS_LOGGER = "torchship.access"

LogFormat = Literal["text", "json"]

# Printable, no spaces or quotes, bounded: safe to echo in a header and a log line.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

__all__ = [
    "ACCESS_LOGGER",
    "REQUEST_ID_HEADER",
    "AccessLog",
    "JsonFormatter",
    "RequestContext",
    "RequestContextFilter",
    "TextFormatter",
    "configure_logging",
    "current_request",
    "end_request",
    "new_request_id",
    "note_model",
    "redact",
    "start_request",
]


# --- the request context ---------------------------------------------------------------


@dataclass
class RequestContext:
    """What every log line of one request carries. Mutable: routing fills in the model,
    and copies of the context (worker threads) see it."""

    request_id: str
    model: str | None = None
    version: str | None = None


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "torchship_request", default=None
)


def new_request_id(incoming: str | None = None) -> str:
    """The client's ``X-Request-ID`` when it is sane (<= 128 printable characters without
    spaces or quotes), else a fresh random id: an id goes into headers and logs as is."""
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    # Unique, not secret: 128 random bits without uuid4's system call per request.
    return f"{random.getrandbits(128):032x}"


def start_request(incoming_id: str | None = None) -> tuple[RequestContext, contextvars.Token[Any]]:
    """Open a request's context in the current (async task's or thread's) context;
    hand the token to :func:`end_request`."""
    ctx = RequestContext(new_request_id(incoming_id))
    return ctx, _current.set(ctx)


def end_request(token: contextvars.Token[Any]) -> None:
    _current.reset(token)


def current_request() -> RequestContext | None:
    return _current.get()


def note_model(model: str, version: str) -> None:
    """Called once a request is routed: later log lines (and metrics) name the version."""
    ctx = _current.get()
    if ctx is not None:
        ctx.model, ctx.version = model, version


# --- formatting ------------------------------------------------------------------------

_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's coloured duplicate of the message
    "request_id",
    "model",
    "version",
}


class RequestContextFilter(logging.Filter):
    """Adds ``request_id``, ``model`` and ``version`` of the open request (or None)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get()
        if not hasattr(record, "request_id"):
            record.request_id = ctx.request_id if ctx else None
        if not getattr(record, "model", None):
            record.model = ctx.model if ctx else None
        if not getattr(record, "version", None):
            record.version = ctx.version if ctx else None
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, model,
    version, every ``extra=`` field, and the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "model", "version"):
            value = getattr(record, key, None)
            if value:
                out[key] = value
        out.update(_extras(record))
        if record.exc_info and record.exc_info[1] is not None:
            out["error_type"] = type(record.exc_info[1]).__name__
            out["traceback"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id] message key=value ...``, traceback below.

    Built in one pass, with one ``strftime`` per second, rather than through
    ``logging.Formatter``'s template: it runs once per request for the access line, where
    the template's extra passes cost about 3% of a small request (digits JSON, in-process).
    """

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")  # (whole second, its formatted time)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:  # one strftime per second, not per line
            cached = (second, time.strftime(self.default_time_format, self.converter(second)))
            self._second = cached
        return f"{cached[1]},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        rid = getattr(record, "request_id", None)
        kv = "".join(
            f" {k}={_short(v)}"
            for k, v in record.__dict__.items()
            if k not in _STANDARD_ATTRS and v is not None
        )
        line = (
            f"{record.asctime} {record.levelname} {record.name}"
            f"{f' [{rid}]' if rid else ''} {record.message}{kv}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}{_newline(line)}{record.exc_text}"
        if record.stack_info:
            line = f"{line}{_newline(line)}{self.formatStack(record.stack_info)}"
        return line


def _newline(text: str) -> str:
    """What ``logging.Formatter`` puts before a traceback: a line break, unless one ends
    the text already."""
    return "" if text.endswith("\n") else "\n"


def _short(value: Any) -> str:
    kind = type(value)
    if kind is int or kind is float:
        return str(value)
    if kind is str and value and " " not in value and '"' not in value:
        return value  # type: ignore[no-any-return]
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or " " in text or '"' in text) else text


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs (and replaces on a second call)."""


def configure_logging(
    log_format: LogFormat = "text",
    *,
    access_log: bool = True,
    level: int | str | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log line of this process to ``stream`` (stderr) as JSON or text, with
    the request context on each. ``access_log`` turns the per-request lines on
    (``torchship.access`` at INFO, whatever the root level). Safe to call again: it
    replaces its own handler and the plain one ``logging.basicConfig`` installs."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler) or type(h) is logging.StreamHandler:
            root.removeHandler(h)
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestContextFilter())
    root.addHandler(handler)
    if level is not None:
        root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_log else logging.WARNING)
    return handler


# --- redaction and truncation ----------------------------------------------------------


def redact(value: Any, fields: Collection[str]) -> Any:
    """A copy of a JSON-like ``value`` with the values of ``fields`` (keys compared
    case-insensitively, at any depth) replaced by ``[REDACTED]``."""
    if isinstance(value, Mapping):
        return {
            k: REDACTED if str(k).lower() in fields else redact(v, fields) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, fields) for v in value]
    return value


def _redact_text(text: str, fields: Iterable[str]) -> str:
    """Redact ``"field": value`` pairs in text that is not whole JSON (cut off, or not
    JSON at all): the value up to the next quote, comma or brace."""
    for f in fields:
        text = re.sub(
            rf'("{re.escape(f)}"\s*:\s*)("(?:[^"\\]|\\.)*"?|[^,}}\]\s]+)',
            rf'\1"{REDACTED}"',
            text,
            flags=re.IGNORECASE,
        )
    return text


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...(+{len(text) - limit} chars)"


# --- access lines ------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessRecord:
    """What a front end saw of one request."""

    method: str
    path: str
    query: str
    status: int
    seconds: float
    endpoint: str
    client: str | None = None
    model: str | None = None
    version: str | None = None
    error: str | None = None
    request_headers: Mapping[str, str] | None = None
    request_body: bytes | None = None
    request_type: str | None = None
    request_bytes: int | None = None
    response_body: bytes | None = None
    response_type: str | None = None
    response_bytes: int | None = None
    request_complete: bool = True  # False when only the first bytes were kept


class AccessLog:
    """One line per request on ``torchship.access``, JSON-ready fields in ``extra``.

    ``sample_rate``: the fraction of successful requests logged; error responses
    (status >= 400) always are. ``log_bodies``: add request headers and both bodies,
    each cut at ``max_body_chars``, with ``redact_fields`` (JSON keys at any depth,
    header and query names) replaced by ``[REDACTED]``. Binary bodies are described
    (``<3,481 bytes image/png>``), never dumped.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        sample_rate: float = 1.0,
        log_bodies: bool = False,
        max_body_chars: int = 1000,
        redact_fields: Iterable[str] = DEFAULT_REDACT_FIELDS,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError("sample_rate must be between 0 and 1")
        self.enabled = enabled
        self.sample_rate = sample_rate
        self.log_bodies = log_bodies
        self.max_body_chars = max_body_chars
        self.redact_fields = frozenset(f.lower() for f in redact_fields)
        self._rng = rng or random.Random()
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    @property
    def capture_bytes(self) -> int:
        """How much of a body to keep for the log: enough to fill the line."""
        return max(4096, 4 * self.max_body_chars) if self.log_bodies else 0

    def wants(self, status: int) -> bool:
        if not self.enabled or not self.logger.isEnabledFor(logging.INFO):
            return False
        return status >= 400 or self.sample_rate >= 1.0 or self._rng.random() < self.sample_rate

    def log(self, r: AccessRecord) -> None:
        if not self.wants(r.status):
            return
        fields: dict[str, Any] = {
            "method": r.method,
            "path": r.path,
            "endpoint": r.endpoint,
            "status": r.status,
            "latency_ms": round(r.seconds * 1000, 3),
        }
        if r.query:
            fields["query"] = self._query(r.query)
        for key in ("model", "version", "error", "client", "request_bytes", "response_bytes"):
            value = getattr(r, key)
            if value is not None and value != "":
                fields[key] = value
        if self.log_bodies:
            if r.request_headers is not None:
                fields["request_headers"] = {
                    k: REDACTED if k.lower() in self.redact_fields else v
                    for k, v in r.request_headers.items()
                }
            if r.request_body is not None:
                fields["request_body"] = self.body(
                    r.request_body, r.request_type, r.request_bytes, r.request_complete
                )
            if r.response_body is not None:
                fields["response_body"] = self.body(
                    r.response_body, r.response_type, r.response_bytes, True
                )
        where = f" {r.model}:{r.version}" if r.model else ""
        level = _level(r.status, r.path)
        # makeRecord + handle, as Logger.log would, minus its caller lookup (a walk up
        # the stack for a file and line that are always this one): a share of a small
        # request. Filters, handlers and formatters apply as usual.
        record = self.logger.makeRecord(
            self.logger.name,
            level,
            __file__,
            0,
            "%s %s %d %.1fms%s",
            (r.method, r.path, r.status, r.seconds * 1000, where),
            None,
            "log",
            fields,
        )
        self.logger.handle(record)

    def body(
        self, data: bytes, content_type: str | None, size: int | None, complete: bool = True
    ) -> str:
        """A body as one log field: JSON redacted and compacted, text as is, binary
        described; cut at ``max_body_chars``."""
        kind = (content_type or "").split(";")[0].strip().lower()
        total = size if size is not None else len(data)
        textual = kind.startswith("text/") or kind.endswith(
            ("json", "+json", "/xml", "x-www-form-urlencoded")
        )
        if not data:
            return ""
        if not textual:
            return f"<{total:,} bytes {kind or 'unknown type'}>"
        text = data.decode("utf-8", errors="replace")
        if kind.endswith("json") and complete:
            try:
                text = json.dumps(
                    redact(json.loads(text), self.redact_fields), separators=(",", ":")
                )
            except ValueError:
                text = _redact_text(text, self.redact_fields)
        elif kind.endswith("x-www-form-urlencoded"):
            text = self._query(text)
        else:
            text = _redact_text(text, self.redact_fields)
        if not complete:
            return _truncate(text, self.max_body_chars) + f" (of {total:,} bytes)"
        return _truncate(text, self.max_body_chars)

    def _query(self, query: str) -> str:
        pairs = parse_qsl(query, keep_blank_values=True)
        return urlencode(
            [(k, REDACTED if k.lower() in self.redact_fields else v) for k, v in pairs]
        )


def error_code(body: bytes | None) -> str | None:
    """The ``code`` of a torchship error body (``{"error": ..., "code": ...}``)."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    code = data.get("code") if isinstance(data, dict) else None
    return code if isinstance(code, str) and len(code) <= 64 else None


_PROBES = ("/health/", "/v2/health/", "/ping")


def _level(status: int, path: str) -> int:
    """An access line's level: errors are the server's faults. A 503 is a state, not a
    fault (warming up, draining, a full queue): a warning, and for a health probe, which
    asks exactly that, plain information."""
    if status == 503:
        return logging.INFO if path.startswith(_PROBES) else logging.WARNING
    return logging.ERROR if status >= 500 else logging.INFO
