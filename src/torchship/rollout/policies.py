"""Traffic policies as validated, JSON-serialisable data.

A policy says which version of one model serves a request: ``fixed`` on one version,
a weighted ``split`` (A/B), a stepped ``canary`` guarded by an ``SLO``, or ``shadow``
(serve one version, mirror some requests to another). They are frozen pydantic models,
a discriminated union on ``kind``, so the management API, the policy file and the
history log all read and write the same JSON. Behaviour lives in ``Router``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from torchship.errors import InvalidInputError, InvalidNameError
from torchship.store._names import validate_name

_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class InvalidPolicyError(InvalidInputError):
    """A traffic policy that does not validate (HTTP 400); ``details['errors']`` lists why."""

    code = "invalid_policy"


def _version(value: str, what: str = "version") -> str:
    # validate_name raises a TorchshipError; pydantic only collects ValueErrors.
    try:
        return validate_name(value, what)
    except InvalidNameError as exc:
        raise ValueError(f"{exc.message} {exc.hint or ''}".strip()) from None


def _header(value: str | None) -> str | None:
    if value is not None and not _HEADER.match(value):
        raise ValueError(f"sticky_header {value!r} is not a header name (letters, digits, '-')")
    return value


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SLO(_Base):
    """How much worse than the baseline a canary candidate may be before it is rolled back.

    Judged over the last ``window_s`` seconds, and only once both versions have at least
    ``min_samples`` requests there, so a handful of early errors cannot decide it.
    """

    max_error_rate_increase: float = Field(0.02, ge=0, le=1)
    """Breach when candidate error rate > baseline error rate + this (absolute)."""
    max_p99_ratio: float = Field(1.5, gt=0)
    """Breach when candidate p99 latency > this × baseline p99 latency."""
    window_s: float = Field(60.0, gt=0)
    min_samples: int = Field(50, ge=1)


class FixedPolicy(_Base):
    """Every request goes to ``version``."""

    kind: Literal["fixed"] = "fixed"
    version: str

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        return _version(value)

    def versions(self) -> tuple[str, ...]:
        return (self.version,)


class SplitPolicy(_Base):
    """Weighted A/B split; sticky per key when the request carries ``sticky_header``.

    Weights are relative (``{"a": 9, "b": 1}`` is 90/10). A request with a key is
    hashed with the model name, so a user keeps their version across requests, worker
    processes and restarts; one without a key is assigned at random.
    """

    kind: Literal["split"] = "split"
    weights: dict[str, float]
    sticky_header: str | None = "X-User-ID"

    @field_validator("sticky_header")
    @classmethod
    def _check_header(cls, value: str | None) -> str | None:
        return _header(value)

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("weights must name at least one version")
        for version, weight in weights.items():
            _version(version)
            if weight < 0 or not math.isfinite(weight):
                raise ValueError(f"weight of {version!r} must be a finite number >= 0")
        if not any(weights.values()):
            raise ValueError("weights must not all be zero")
        return weights

    def versions(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def pick(self, u: float) -> str:
        """The version for a point ``u`` in [0, 1): cumulative weights in sorted order."""
        live = sorted((v, w) for v, w in self.weights.items() if w > 0)
        target = u * sum(w for _, w in live)
        cumulative = 0.0
        for version, weight in live:
            cumulative += weight
            if target < cumulative:
                return version
        return live[-1][0]  # u rounding up to the total


class CanaryPolicy(_Base):
    """``candidate`` gets ``steps[step_index]`` % of the traffic, ``baseline`` the rest.

    ``advance="schedule"`` moves to the next step every ``interval_s`` while the SLO
    holds; ``"manual"`` waits for an explicit advance. Either way an SLO breach rolls
    back to ``baseline``, and reaching 100 % completes the canary (fixed on candidate).
    ``started_at``/``last_step_at`` are filled in by the router (wall clock, for people).
    """

    kind: Literal["canary"] = "canary"
    baseline: str
    candidate: str
    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])
    step_index: int = Field(0, ge=0)
    advance: Literal["manual", "schedule"] = "manual"
    interval_s: float = Field(60.0, gt=0)
    slo: SLO = Field(default_factory=SLO)
    sticky_header: str | None = "X-User-ID"
    started_at: datetime | None = None
    last_step_at: datetime | None = None

    @field_validator("baseline", "candidate")
    @classmethod
    def _check_versions(cls, value: str) -> str:
        return _version(value)

    @field_validator("sticky_header")
    @classmethod
    def _check_header(cls, value: str | None) -> str | None:
        return _header(value)

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: list[float]) -> list[float]:
        if not steps:
            raise ValueError("steps must not be empty")
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError("every step must be a percentage in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must be strictly increasing")
        if steps[-1] != 100:
            raise ValueError("the last step must be 100 (the candidate takes all traffic)")
        return steps

    @model_validator(mode="after")
    def _check_canary(self) -> CanaryPolicy:
        if self.baseline == self.candidate:
            raise ValueError("baseline and candidate must be different versions")
        if self.step_index >= len(self.steps):
            raise ValueError(f"step_index must be below {len(self.steps)} (the number of steps)")
        return self

    @property
    def percent(self) -> float:
        """The candidate's share of the traffic now, in percent."""
        return self.steps[self.step_index]

    def versions(self) -> tuple[str, ...]:
        return (self.baseline, self.candidate)


class ShadowPolicy(_Base):
    """Serve ``primary``; mirror a ``fraction`` of requests to ``candidate`` to compare.

    The candidate's outputs are never returned; the caller compares them with the
    primary's and reports agreement (``Router.observe_shadow``).
    """

    kind: Literal["shadow"] = "shadow"
    primary: str
    candidate: str
    fraction: float = Field(0.1, ge=0, le=1)

    @field_validator("primary", "candidate")
    @classmethod
    def _check_versions(cls, value: str) -> str:
        return _version(value)

    @model_validator(mode="after")
    def _check_shadow(self) -> ShadowPolicy:
        if self.primary == self.candidate:
            raise ValueError("primary and candidate must be different versions")
        return self

    def versions(self) -> tuple[str, ...]:
        return (self.primary, self.candidate)


Policy = Annotated[
    FixedPolicy | SplitPolicy | CanaryPolicy | ShadowPolicy, Field(discriminator="kind")
]
"""Any traffic policy; ``kind`` says which."""

POLICY_ADAPTER: TypeAdapter[Policy] = TypeAdapter(Policy)

_POLICY_TYPES = (FixedPolicy, SplitPolicy, CanaryPolicy, ShadowPolicy)
_KINDS = {"fixed", "split", "canary", "shadow"}


def parse_policy(data: Policy | Mapping[str, Any] | str | bytes) -> Policy:
    """A policy from a model, a dict or JSON text; ``InvalidPolicyError`` (400) if invalid."""
    if isinstance(data, _POLICY_TYPES):
        return data
    try:
        if isinstance(data, str | bytes):
            return POLICY_ADAPTER.validate_json(data)
        return POLICY_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise InvalidPolicyError(
            f"Invalid traffic policy: {_summary(exc)}",
            hint='Send {"kind": "fixed"|"split"|"canary"|"shadow", ...}; see details.errors.',
            errors=_errors(exc),
        ) from None


def _errors(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for e in exc.errors(include_url=False):
        loc = list(e["loc"])
        if loc and loc[0] in _KINDS:  # the union's tag: the user knows which kind they sent
            loc = loc[1:]
        msg = e["msg"].removeprefix("Value error, ")
        out.append({"loc": ".".join(str(p) for p in loc), "msg": msg})
    return out


def _summary(exc: ValidationError) -> str:
    text = "; ".join(f"{e['loc']}: {e['msg']}" if e["loc"] else e["msg"] for e in _errors(exc))
    return text if text.endswith(".") else text + "."


def policy_dict(policy: Policy) -> dict[str, Any]:
    """The policy as plain JSON-ready data."""
    return policy.model_dump(mode="json")


def sticky_bucket(model: str, key: str) -> float:
    """A point in [0, 1) fixed by (model, key): the same in every process and release.

    sha256 rather than ``hash()``, which is salted per process.
    """
    digest = hashlib.sha256(f"{model}\n{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class PolicyRecord(_Base):
    """What is persisted per model: the policy and where a manual rollback would go."""

    model: str
    policy: Policy
    previous_version: str | None = None
    """The last stable version before the current one: ``rollback`` of a fixed or split
    policy returns to it."""
    updated_at: datetime | None = None

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return _version(value, "model name")

    @field_validator("previous_version")
    @classmethod
    def _check_previous(cls, value: str | None) -> str | None:
        return None if value is None else _version(value)
