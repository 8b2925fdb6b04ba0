"""What both front ends do when a request ends: count it, time it, log it.

Framework-free: the FastAPI middleware and the Flask hooks collect an
:class:`~torchship.monitoring.logs.AccessRecord` each and hand it to
:meth:`RequestObserver.finish`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torchship.monitoring.logs import AccessLog, AccessRecord, error_code

if TYPE_CHECKING:
    from torchship.serving.metrics import ServiceMetrics
    from torchship.serving.settings import ServeSettings

#: Error bodies are small JSON objects; this much is kept to read their ``code``.
ERROR_BODY_BYTES = 4096


class RequestObserver:
    def __init__(self, metrics: ServiceMetrics, access_log: AccessLog) -> None:
        self.metrics = metrics
        self.access_log = access_log

    @classmethod
    def from_settings(cls, metrics: ServiceMetrics, settings: ServeSettings) -> RequestObserver:
        return cls(
            metrics,
            AccessLog(
                enabled=settings.access_log,
                sample_rate=settings.log_sample_rate,
                log_bodies=settings.log_bodies,
                max_body_chars=settings.log_max_body_chars,
                redact_fields=settings.log_redact_fields,
            ),
        )

    @property
    def request_capture_bytes(self) -> int:
        """How much of each request body the front end keeps (0: none)."""
        return self.access_log.capture_bytes

    @property
    def response_capture_bytes(self) -> int:
        return max(self.access_log.capture_bytes, ERROR_BODY_BYTES)

    def finish(self, record: AccessRecord) -> None:
        """Metrics for every request; an access line when the log wants one."""
        error = None
        if record.status >= 400:
            error = error_code(record.response_body) or f"http_{record.status}"
        self.metrics.observe_request(
            record.endpoint,
            record.model or "",
            record.version or "",
            record.status,
            record.seconds,
            error,
        )
        if error is not None and record.error is None:
            record = replace(record, error=error)
        self.access_log.log(record)
