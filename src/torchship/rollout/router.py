"""``Router``: the live traffic policy of one served model.

It answers "which version serves this request?" (``route``), collects per-version
outcomes over a sliding window (``observe``), and changes the policy: by hand
(``set_policy``, ``advance``, ``rollback``) or by itself on ``tick`` (a scheduled canary
step, completion at 100 %, rollback on an SLO breach). Every change is a
``RolloutEvent``, handed to ``on_event`` (log it, persist the policy) and returned.

Framework-free and thread-safe: one re-entrant lock guards everything, request threads
and an event loop may call it at once. Time comes from an injected monotonic ``clock``
and randomness from an injected ``random.Random``, so tests need no sleeps.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from torchship.errors import InvalidInputError, TorchshipError
from torchship.rollout.policies import (
    CanaryPolicy,
    FixedPolicy,
    Policy,
    PolicyRecord,
    ShadowPolicy,
    SplitPolicy,
    parse_policy,
    policy_dict,
    sticky_bucket,
)
from torchship.rollout.window import SlidingWindow, Verdict, WindowStats, judge
from torchship.store._names import validate_name

log = logging.getLogger("torchship.rollout")

DEFAULT_WINDOW_S = 60.0
"""Window of the per-version stats when the policy has no SLO of its own."""


class RolloutConflictError(TorchshipError):
    """The operation does not apply to the current policy (e.g. advance a fixed one)."""

    status_code = 409
    code = "rollout_conflict"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """UTC ISO-8601 with milliseconds, the one timestamp format of the history."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Route:
    """Where one request goes: serve ``version``; also mirror it to ``shadow`` if set."""

    version: str
    shadow: str | None = None


class RolloutEvent(BaseModel):
    """One change of a model's policy: what, why, when, with the numbers behind it."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["set", "advance", "complete", "rollback"]
    model: str
    from_policy: Policy
    to_policy: Policy
    reason: str
    at: str
    """Wall-clock UTC ISO time."""
    details: dict[str, Any] = Field(default_factory=dict)
    previous_version: str | None = None
    """Where a manual rollback of ``to_policy`` would go (persisted with the policy)."""

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict for the history log (``source`` tells it from store records)."""
        return {"source": "router", **self.model_dump(mode="json")}

    def policy_record(self) -> PolicyRecord:
        """The state to persist after this event."""
        return PolicyRecord(
            model=self.model,
            policy=self.to_policy,
            previous_version=self.previous_version,
            updated_at=datetime.fromisoformat(self.at),
        )


@dataclass
class ShadowStats:
    """Counts of the current (or last) shadow run."""

    mirrored: int = 0
    """Requests ``route`` asked to mirror."""
    compared: int = 0
    """Comparisons reported by ``observe_shadow``."""
    disagreed: int = 0

    def to_dict(self) -> dict[str, Any]:
        rate = self.disagreed / self.compared if self.compared else None
        return {
            "mirrored": self.mirrored,
            "compared": self.compared,
            "agreed": self.compared - self.disagreed,
            "disagreed": self.disagreed,
            "disagreement_rate": None if rate is None else round(rate, 6),
        }


EventCallback = Callable[[RolloutEvent], None]


class Router:
    """The traffic policy of model ``model`` and the live outcomes it is judged on.

    ``on_event`` is called for every change, in order, while the router's lock is held
    (so the policy it persists is the latest); keep it short and do not wait on other
    threads in it. Its exceptions propagate from manual operations (the caller learns
    the change was not persisted; the in-memory change stands) and are logged from
    ``tick``. ``max_samples`` bounds each version's window (memory is O(versions ×
    max_samples)).
    """

    def __init__(
        self,
        model: str,
        policy: Policy | Mapping[str, Any],
        *,
        previous_version: str | None = None,
        on_event: EventCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        window_s: float = DEFAULT_WINDOW_S,
        max_samples: int = 10_000,
    ) -> None:
        if window_s <= 0 or max_samples < 1:
            raise InvalidInputError("window_s must be > 0 and max_samples >= 1.")
        self.model = validate_name(model)
        self.on_event = on_event
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._default_window_s = window_s
        self._max_samples = max_samples
        self._lock = threading.RLock()
        self._windows: dict[str, SlidingWindow] = {}
        self._shadow = ShadowStats()
        self._policy: Policy
        self._previous: str | None
        self._last_step: float
        self._adopt(parse_policy(policy), previous_version)

    @classmethod
    def from_record(cls, record: PolicyRecord, **kwargs: Any) -> Router:
        """A router resuming a persisted policy (see ``restore``)."""
        return cls(record.model, record.policy, previous_version=record.previous_version, **kwargs)

    # --- reading ---------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def previous_version(self) -> str | None:
        return self._previous

    @property
    def sticky_header(self) -> str | None:
        """The request header whose value the caller should pass to ``route`` as key."""
        policy = self._policy
        return policy.sticky_header if isinstance(policy, SplitPolicy | CanaryPolicy) else None

    def record(self) -> PolicyRecord:
        with self._lock:
            return PolicyRecord(
                model=self.model,
                policy=self._policy,
                previous_version=self._previous,
                updated_at=self._wall_clock(),
            )

    # --- the request path ------------------------------------------------------------

    def route(self, key: str | None = None) -> Route:
        """The version for one request; ``key`` (e.g. a user id) makes it sticky."""
        with self._lock:
            policy = self._policy
            if isinstance(policy, FixedPolicy):
                return Route(policy.version)
            if isinstance(policy, ShadowPolicy):
                mirror = self._rng.random() < policy.fraction
                if mirror:
                    self._shadow.mirrored += 1
                return Route(policy.primary, policy.candidate if mirror else None)
            u = self._point(key if policy.sticky_header else None)
            if isinstance(policy, SplitPolicy):
                return Route(policy.pick(u))
            return Route(policy.candidate if u * 100 < policy.percent else policy.baseline)

    def _point(self, key: str | None) -> float:
        return sticky_bucket(self.model, key) if key else self._rng.random()

    def observe(self, version: str, ok: bool, latency_s: float) -> None:
        """Record one request's outcome (O(1) amortised, bounded memory)."""
        with self._lock:
            window = self._windows.get(version)
            if window is None:
                window = self._windows[version] = SlidingWindow(self._max_samples)
            window.add(self._clock(), ok, max(0.0, latency_s), self._window_s())

    def observe_shadow(self, agree: bool) -> None:
        """Report whether a mirrored request's candidate output matched the served one."""
        with self._lock:
            self._shadow.compared += 1
            if not agree:
                self._shadow.disagreed += 1

    # --- changes ---------------------------------------------------------------------

    def set_policy(
        self, policy: Policy | Mapping[str, Any], reason: str = "set by hand"
    ) -> list[RolloutEvent]:
        """Replace the policy (``InvalidPolicyError`` for a bad one); one ``set`` event."""
        new = parse_policy(policy)
        with self._lock:
            return self._emit([self._change(new, "set", reason, {})], raise_errors=True)

    def advance(self, reason: str = "advanced by hand") -> list[RolloutEvent]:
        """Move a canary to its next step, or complete it when that step is 100 %."""
        with self._lock:
            policy = self._policy
            if not isinstance(policy, CanaryPolicy):
                raise RolloutConflictError(
                    f"{self.model!r} is on a {policy.kind} policy; only a canary advances.",
                    hint="Set a canary policy first.",
                )
            return self._emit([self._step(policy, reason, {})], raise_errors=True)

    def rollback(self, reason: str = "rolled back by hand") -> list[RolloutEvent]:
        """Fix traffic on the safe version: a canary's baseline, a shadow's primary, or
        the version before the current fixed/split policy."""
        with self._lock:
            target = self._rollback_target()
            if target is None:
                raise RolloutConflictError(
                    f"{self.model!r} has no earlier version to roll back to.",
                    hint="Set a fixed policy on the version you want.",
                )
            details: dict[str, Any] = {"automatic": False, "to_version": target}
            if isinstance(self._policy, CanaryPolicy):
                details["verdict"] = self._verdict(self._policy, self._clock()).to_dict()
            event = self._change(FixedPolicy(version=target), "rollback", reason, details)
            return self._emit([event], raise_errors=True)

    def tick(self) -> list[RolloutEvent]:
        """Judge a canary: roll back on an SLO breach, else take a scheduled step if due.

        Call it every second or so (a timer thread or an event-loop task); it is cheap
        for every other policy.
        """
        with self._lock:
            policy = self._policy
            if not isinstance(policy, CanaryPolicy):
                return []
            now = self._clock()
            verdict = self._verdict(policy, now)
            details: dict[str, Any] = {"verdict": verdict.to_dict()}
            if verdict.status == "breach":
                details.update(automatic=True, to_version=policy.baseline, slo=policy.slo)
                reason = "SLO breach: " + "; ".join(verdict.breaches)
                event = self._change(
                    FixedPolicy(version=policy.baseline), "rollback", reason, details
                )
            elif (
                policy.advance == "schedule"
                and verdict.status == "healthy"
                and now - self._last_step >= policy.interval_s
            ):
                reason = f"scheduled: {policy.interval_s:g} s at {policy.percent:g}% within SLO"
                event = self._step(policy, reason, details)
            else:
                return []
            return self._emit([event], raise_errors=False)

    def restore(self, record: PolicyRecord) -> None:
        """Adopt a persisted policy silently (no event): at start-up, or when another
        worker process changed the policy file. A canary's next scheduled step is then
        ``interval_s`` from now, and it is judged only on samples this process sees."""
        if record.model != self.model:
            raise InvalidInputError(
                f"The policy record is for {record.model!r}, not {self.model!r}."
            )
        with self._lock:
            self._adopt(record.policy, record.previous_version)

    # --- state -----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The policy and live window stats per version, JSON-ready (management API)."""
        with self._lock:
            now = self._clock()
            policy = self._policy
            window_s = self._window_s()
            names = list(dict.fromkeys([*policy.versions(), *sorted(self._windows)]))
            out: dict[str, Any] = {
                "model": self.model,
                "policy": policy_dict(policy),
                "previous_version": self._previous,
                "sticky_header": self.sticky_header,
                "window_s": window_s,
                "versions": {v: self._stats(v, now).to_dict() for v in names},
            }
            if isinstance(policy, CanaryPolicy):
                due = max(0.0, policy.interval_s - (now - self._last_step))
                out["canary"] = {
                    "percent": policy.percent,
                    "step_index": policy.step_index,
                    "steps": list(policy.steps),
                    "next_step_in_s": round(due, 3) if policy.advance == "schedule" else None,
                    "verdict": self._verdict(policy, now).to_dict(),
                }
            shadowing = isinstance(policy, ShadowPolicy) or self._shadow.mirrored
            out["shadow"] = self._shadow.to_dict() if shadowing else None
            return out

    # --- internals (called with the lock held) ---------------------------------------

    def _window_s(self) -> float:
        policy = self._policy
        return policy.slo.window_s if isinstance(policy, CanaryPolicy) else self._default_window_s

    def _stats(self, version: str, now: float) -> WindowStats:
        window = self._windows.get(version)
        return window.stats(now, self._window_s()) if window else WindowStats(0, 0)

    def _verdict(self, policy: CanaryPolicy, now: float) -> Verdict:
        return judge(
            policy.slo, self._stats(policy.baseline, now), self._stats(policy.candidate, now)
        )

    def _rollback_target(self) -> str | None:
        policy = self._policy
        if isinstance(policy, CanaryPolicy):
            return policy.baseline
        if isinstance(policy, ShadowPolicy):
            return policy.primary
        if isinstance(policy, FixedPolicy) and self._previous == policy.version:
            return None
        return self._previous

    def _adopt(self, policy: Policy, previous: str | None) -> None:
        if isinstance(policy, CanaryPolicy) and policy.started_at is None:
            wall = self._wall_clock()
            policy = policy.model_copy(update={"started_at": wall, "last_step_at": wall})
        self._policy = policy
        self._previous = None if previous is None else validate_name(previous, "version")
        self._last_step = self._clock()

    def _step(self, policy: CanaryPolicy, reason: str, details: dict[str, Any]) -> RolloutEvent:
        details = {**details, "from_percent": policy.percent}
        if policy.step_index >= len(policy.steps) - 2:  # the next step is 100 %: done
            details.update(to_percent=100.0, to_version=policy.candidate)
            done = FixedPolicy(version=policy.candidate)
            return self._change(done, "complete", reason, details)
        nxt = policy.step_index + 1
        details.update(to_percent=policy.steps[nxt], step_index=nxt)
        return self._change(
            policy.model_copy(update={"step_index": nxt}), "advance", reason, details
        )

    def _change(
        self,
        new: Policy,
        kind: Literal["set", "advance", "complete", "rollback"],
        reason: str,
        details: dict[str, Any],
    ) -> RolloutEvent:
        old = self._policy
        wall = self._wall_clock()
        if isinstance(new, CanaryPolicy):
            started = wall
            if isinstance(old, CanaryPolicy) and _pair(old) == _pair(new):
                started = old.started_at or wall  # a step or an edit of the same canary
            elif new.candidate in self._windows:
                # A new canary judges the candidate only on traffic since it started.
                self._windows[new.candidate].clear()
            new = new.model_copy(update={"started_at": started, "last_step_at": wall})
            self._last_step = self._clock()
        if isinstance(new, ShadowPolicy) and not (
            isinstance(old, ShadowPolicy) and _pair(old) == _pair(new)
        ):
            self._shadow = ShadowStats()
        before, after = _stable(old), _stable(new)
        if before is not None and before != after:
            self._previous = before
        self._policy = new
        return RolloutEvent(
            kind=kind,
            model=self.model,
            from_policy=old,
            to_policy=new,
            reason=reason,
            at=iso(wall),
            details=_jsonable(details),
            previous_version=self._previous,
        )

    def _emit(self, events: list[RolloutEvent], *, raise_errors: bool) -> list[RolloutEvent]:
        for event in events:
            log.info("%s %s: %s", self.model, event.kind, event.reason)
            if self.on_event is None:
                continue
            try:
                self.on_event(event)
            except Exception:
                if raise_errors:
                    raise
                log.exception("on_event failed for %s %s", self.model, event.kind)
        return events


def _stable(policy: Policy) -> str | None:
    """The version a policy falls back on: what rollback bookkeeping remembers."""
    if isinstance(policy, FixedPolicy):
        return policy.version
    if isinstance(policy, CanaryPolicy):
        return policy.baseline
    if isinstance(policy, ShadowPolicy):
        return policy.primary
    return None


def _pair(policy: CanaryPolicy | ShadowPolicy) -> tuple[str, str]:
    return policy.versions()[0], policy.versions()[1]


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in details.items()
    }
