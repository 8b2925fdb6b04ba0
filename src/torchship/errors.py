"""One exception hierarchy for the whole toolkit.

Every error a user can cause is a ``TorchshipError`` subclass that carries its HTTP
status and a stable machine-readable ``code``; the front ends render them in one
place. Anything else reaching a front end is a bug and becomes a generic 500.
"""

from __future__ import annotations

import math
from typing import Any


class TorchshipError(Exception):
    """Base class: ``status_code`` and ``code`` say how a server reports it."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def __str__(self) -> str:
        return f"{self.message} Hint: {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.hint:
            body["hint"] = self.hint
        if self.details:
            body["details"] = self.details
        return body

    def response_headers(self) -> dict[str, str]:
        """HTTP headers a response to this error carries besides the JSON body."""
        return {}


# --- names, models and versions -------------------------------------------------


class InvalidNameError(TorchshipError):
    """A model name, version or alias that could escape the store or confuse a URL."""

    status_code = 400
    code = "invalid_name"


class ModelNotFoundError(TorchshipError):
    status_code = 404
    code = "model_not_found"


class VersionNotFoundError(ModelNotFoundError):
    code = "version_not_found"


class ConflictError(TorchshipError):
    """The change would break what is serving (e.g. unloading a version with traffic)."""

    status_code = 409
    code = "conflict"


class VersionExistsError(TorchshipError):
    status_code = 409
    code = "version_exists"


# --- loading and integrity -------------------------------------------------------


class IntegrityError(TorchshipError):
    """A stored file does not match the checksum its manifest recorded."""

    status_code = 409
    code = "integrity_error"


class UntrustedPickleError(TorchshipError):
    """Loading would unpickle, i.e. run arbitrary code, without the caller's consent."""

    status_code = 403
    code = "untrusted_pickle"


class ModelLoadError(TorchshipError):
    status_code = 422
    code = "model_load_error"


class ExportError(TorchshipError):
    status_code = 422
    code = "export_error"


class ExportVerificationError(ExportError):
    """An exported artifact disagrees with the eager model beyond the tolerance."""

    code = "export_verification_failed"


class ArtifactNotFoundError(TorchshipError):
    status_code = 404
    code = "artifact_not_found"


class MissingDependencyError(TorchshipError):
    """An optional extra is needed for the feature the user chose."""

    status_code = 501
    code = "missing_dependency"

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the '{package}' package, which is not installed.",
            hint=f"pip install 'torchship[{extra}]'",
        )


# --- request input ---------------------------------------------------------------


class InvalidInputError(TorchshipError):
    status_code = 400
    code = "invalid_input"


class InvalidImageError(InvalidInputError):
    code = "invalid_image"


class PayloadTooLargeError(TorchshipError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(TorchshipError):
    status_code = 415
    code = "unsupported_media_type"


class ConfigError(TorchshipError):
    status_code = 400
    code = "config_error"


# --- serving capacity ------------------------------------------------------------


class ServiceUnavailableError(TorchshipError):
    """Temporarily unable to serve (queue full, not ready, draining); retry later."""

    status_code = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class QueueFullError(ServiceUnavailableError):
    code = "queue_full"


class ModelNotReadyError(ServiceUnavailableError):
    code = "model_not_ready"


class InferenceError(TorchshipError):
    """The model failed on a batch: the server's fault, not the client's (logged once)."""

    status_code = 500
    code = "inference_error"


class RequestTimeoutError(TorchshipError):
    status_code = 504
    code = "timeout"


# --- access control --------------------------------------------------------------


class UnauthorizedError(TorchshipError):
    """No API key, or one the server does not know (401)."""

    status_code = 401
    code = "unauthorized"

    def response_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="torchship"'}


class ForbiddenError(TorchshipError):
    """A known key without the scope the route needs, or a refused CORS origin (403)."""

    status_code = 403
    code = "forbidden"


class RateLimitedError(TorchshipError):
    """Over the rate limit (429): ``Retry-After`` says when a token is back."""

    status_code = 429
    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        headers: dict[str, str] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def response_headers(self) -> dict[str, str]:
        return {**self.headers, "Retry-After": str(max(1, math.ceil(self.retry_after)))}


# --- HTTP-level ------------------------------------------------------------------


class RouteNotFoundError(TorchshipError):
    status_code = 404
    code = "not_found"


class MethodNotAllowedError(TorchshipError):
    status_code = 405
    code = "method_not_allowed"
