"""Stages (staging, production, archived), promotion and rollback, with an audit trail.

The ``production`` alias is the default pointer: what ``store.resolve(name)`` and a
server without a traffic policy use. Every change is appended to
``<name>/history.jsonl`` (when, what, why) and never rewritten.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from torchship.errors import InvalidInputError, VersionNotFoundError
from torchship.rollout import HistoryLog
from torchship.store._atomic import file_lock, read_json, write_json_atomic
from torchship.store._names import validate_name
from torchship.store.store import DEFAULT_ALIAS, ModelStore

Stage = Literal["staging", "production", "archived"]
STAGES: tuple[Stage, ...] = ("staging", "production", "archived")
STAGES_FILE = "stages.json"
HISTORY_FILE = "history.jsonl"


def history_log(store: ModelStore, name: str) -> HistoryLog:
    return HistoryLog(store.root / name / HISTORY_FILE)


def history(store: ModelStore, name: str) -> list[dict[str, Any]]:
    store.resolve(name)  # validates the name, 404 if unknown
    return history_log(store, name).read()


def stages(store: ModelStore, name: str) -> dict[str, Stage]:
    """Every version's stage; versions never promoted are ``staging``."""
    validate_name(name)
    recorded = read_json(store.root / name / STAGES_FILE, default={})
    return {v: recorded.get(v, "staging") for v in store.versions(name)}


def promote(
    store: ModelStore, name: str, version: str, *, stage: Stage = "production", reason: str = ""
) -> dict[str, Any]:
    """Move ``version`` to ``stage``; to production means the default pointer moves too.

    The version it replaces in production is archived. Returns the history record.
    """
    if stage not in STAGES:
        raise InvalidInputError(f"Unknown stage {stage!r}; use one of {', '.join(STAGES)}.")
    version = store.resolve(name, version)
    with file_lock(store.root / name / ".stages.lock"):
        return _promote_locked(store, name, version, stage, reason)


def promote_unless_production(
    store: ModelStore,
    name: str,
    version: str,
    *,
    reason: str = "",
    unless_changed_since: datetime | None = None,
) -> dict[str, Any] | None:
    """:func:`promote` to production, or nothing (None) if ``version`` already is, or if
    production was promoted or rolled back at or after ``unless_changed_since``.

    Why: every worker process of a server may decide the same canary completion, one
    of them late (after its next policy sync); the checks run under the lock, so one
    writes the record at most, and an operator's rollback in between stands.
    """
    version = store.resolve(name, version)
    with file_lock(store.root / name / ".stages.lock"):
        if store.aliases(name).get(DEFAULT_ALIAS) == version:
            return None
        if unless_changed_since is not None and _changed_since(
            history_log(store, name).read(), unless_changed_since
        ):
            return None
        return _promote_locked(store, name, version, "production", reason)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _changed_since(records: list[dict[str, Any]], moment: datetime) -> bool:
    """Whether a promote or rollback record is dated at or after ``moment``."""
    moment = _aware(moment)
    for record in reversed(records):  # appended in time order: stop at the first older
        try:
            at = _aware(datetime.fromisoformat(str(record["at"])))
        except (KeyError, ValueError):
            continue
        if at < moment:
            return False
        if record.get("action") in ("promote", "rollback"):
            return True
    return False


def _promote_locked(
    store: ModelStore, name: str, version: str, stage: Stage, reason: str
) -> dict[str, Any]:
    """The body of a promotion; the caller holds the stages lock."""
    current = stages(store, name)
    previous = store.aliases(name).get(DEFAULT_ALIAS)
    current[version] = stage
    if stage == "production":
        if previous and previous != version and previous in current:
            current[previous] = "archived"
        store.set_alias(name, DEFAULT_ALIAS, version)
    elif previous == version:
        store.remove_alias(name, DEFAULT_ALIAS)
    record = {
        "action": "promote",
        "model": name,
        "version": version,
        "stage": stage,
        "previous_production": previous,
        "reason": reason,
    }
    return _commit(store, name, current, record)


def _commit(
    store: ModelStore, name: str, staged: dict[str, Stage], record: dict[str, Any]
) -> dict[str, Any]:
    """Write the new stages, then the history record that says why (stages lock held)."""
    write_json_atomic(store.root / name / STAGES_FILE, staged)
    history_log(store, name).append(record)
    return record


def rollback_target(store: ModelStore, name: str, to: str | None = None) -> str:
    """The version a rollback would put in production, without changing anything."""
    store.resolve(name)  # validates the name; 404 for an unknown model
    if to is not None:
        return store.resolve(name, to)
    current = store.aliases(name).get(DEFAULT_ALIAS)
    found = _previous_production(history_log(store, name).read(), current)
    if found is None or found not in store.versions(name):
        raise VersionNotFoundError(
            f"{name} has no earlier production version to roll back to.",
            hint="Name one: torchship models rollback NAME --to VERSION.",
        )
    return found


def rollback(
    store: ModelStore, name: str, *, to: str | None = None, reason: str = ""
) -> dict[str, Any]:
    """Point production back at ``to``, or at the version production had before.

    Returns the history record; raises when there is nothing to roll back to.
    """
    store.resolve(name)  # validates the name, 404 if unknown: before the lock file
    with file_lock(store.root / name / ".stages.lock"):
        # under the lock: a server completing a canary may promote at any moment
        target = rollback_target(store, name, to)
        current = store.aliases(name).get(DEFAULT_ALIAS)
        if target == current:
            raise InvalidInputError(f"{name}:{target} is already in production.")
        staged = stages(store, name)
        staged[target] = "production"
        if current in staged:
            staged[current] = "archived"
        store.set_alias(name, DEFAULT_ALIAS, target)
        record = {"action": "rollback", "model": name, "from": current, "to": target}
        return _commit(store, name, staged, record | {"reason": reason})


def _previous_production(records: list[dict[str, Any]], current: str | None) -> str | None:
    """The production version before ``current`` took over, from the newest record back."""
    for record in reversed(records):
        if (
            record.get("action") == "promote"
            and record.get("stage") == "production"
            and record.get("version") == current
            and record.get("previous_production") != current  # a no-op promote: look on
        ):
            return record.get("previous_production")
        if record.get("action") == "rollback" and record.get("to") == current:
            return record.get("from")
    return None
