"""Persistence: a model's current policy (one JSON file) and an append-only history.

``PolicyFile`` is rewritten atomically on every change, so a restart (or a crash
mid-write) finds either the old or the new policy, never half of one. ``HistoryLog`` is
JSON lines, each fsynced before ``append`` returns; it is generic (router events,
store promote/rollback records) and reading tolerates the torn last line a crash can
leave. Both are safe to share between threads and worker processes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from torchship.rollout.policies import InvalidPolicyError, PolicyRecord
from torchship.rollout.router import RolloutEvent, iso, utc_now
from torchship.store._atomic import fsync_dir, write_json_atomic

log = logging.getLogger("torchship.rollout")


class PolicyFile:
    """One model's persisted ``PolicyRecord`` at ``path`` (JSON, written atomically)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None

    def save(self, record: PolicyRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, record.model_dump(mode="json"))
        self._seen = self._signature()

    def load(self) -> PolicyRecord | None:
        """The saved record, or None if there is none; ``InvalidPolicyError`` if corrupt."""
        signature = self._signature()
        if signature is None:
            return None
        try:
            record = PolicyRecord.model_validate_json(self.path.read_bytes())
        except ValidationError as exc:
            raise InvalidPolicyError(
                f"The policy file {self.path} is not valid: {exc}",
                hint="Fix or delete it; the server then starts on the model's default version.",
            ) from None
        self._seen = signature
        return record

    def load_if_changed(self) -> PolicyRecord | None:
        """The record if the file changed since this object last saved or loaded it
        (another worker process wrote it), else None. Cheap: one ``stat``."""
        signature = self._signature()
        if signature is None or signature == self._seen:
            return None
        return self.load()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size


class HistoryLog:
    """Append-only JSON lines at ``path``: when, what, why; one record per line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record (adding ``at``, UTC ISO, if missing), fsynced; return it."""
        entry = dict(record)
        entry.setdefault("at", iso(utc_now()))
        line = json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, self.path.open("a+b") as fh:
            # flock on the log itself serialises writers across worker processes.
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                size = fh.seek(0, os.SEEK_END)
                if size:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        line = b"\n" + line  # close a line torn by a crash; reads skip it
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        if not size:
            fsync_dir(self.path.parent)  # the new file's name survives a crash too
        return entry

    def read(self, last: int | None = None) -> list[dict[str, Any]]:
        """Every record in order (or the ``last`` n); lines that do not parse are
        skipped with a warning (a torn write from a crash), never an error."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        records: list[dict[str, Any]] = []
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            if isinstance(value, dict):
                records.append(value)
            else:
                log.warning("%s line %d is not a JSON record; skipped", self.path, number)
        return records if last is None else records[max(0, len(records) - last) :]


def recorder(
    *, policy_file: PolicyFile | None = None, history: HistoryLog | None = None
) -> Callable[[RolloutEvent], None]:
    """An ``on_event`` for ``Router``: append the event to ``history`` and save the new
    policy to ``policy_file``."""

    def on_event(event: RolloutEvent) -> None:
        if history is not None:
            history.append(event.to_record())
        if policy_file is not None:
            policy_file.save(event.policy_record())

    return on_event
