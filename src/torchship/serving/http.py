"""The one place where exceptions become HTTP responses, for every front end."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from torchship.errors import ServiceUnavailableError, TorchshipError

log = logging.getLogger("torchship.serving")

JSON = "application/json"


def error_response(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) for ``exc``; unknown errors are logged once and hidden."""
    if isinstance(exc, TorchshipError):
        headers: dict[str, str] = {}
        if isinstance(exc, ServiceUnavailableError):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return exc.status_code, exc.to_dict(), headers
    log.error("unhandled error while serving a request", exc_info=exc)
    return 500, {"error": "Internal server error.", "code": "internal_error"}, {}


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
