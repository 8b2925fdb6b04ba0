"""Errors of ``torchship.optimize``; all are ``TorchshipError`` subclasses."""

from __future__ import annotations

from torchship.errors import TorchshipError


class OptimizeError(TorchshipError):
    """A method could not produce a working variant of this model."""

    status_code = 422
    code = "optimize_error"


class NoVariantQualifiesError(OptimizeError):
    """``--accuracy-budget`` was given but no variant is both within it and faster."""

    code = "no_variant_qualifies"


class MethodSkipped(Exception):
    """Raised by a method that does not apply here (no CUDA, no training data, ...).

    Not an error: the report shows ``skipped: <reason>`` for it and goes on.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
