"""Which loaded version answers a request: one rollout ``Router`` per served model.

Policies (fixed, A/B split, canary, shadow) live in :mod:`torchship.rollout`; this module
attaches them to a running service: it restores the persisted policy at start-up, feeds
each routed request's outcome back for the SLO guard, ticks canaries on a background
thread, and records every change in the model's history next to its versions.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from torchship.rollout import (
    FixedPolicy,
    HistoryLog,
    PolicyFile,
    RolloutEvent,
    Route,
    Router,
    recorder,
)
from torchship.store import ModelStore
from torchship.store.stages import HISTORY_FILE, promote_unless_production

log = logging.getLogger("torchship.rollout")

POLICY_FILE = "policy.json"


class Traffic:
    def __init__(
        self,
        store: ModelStore,
        *,
        tick_interval_s: float = 0.5,
        admin_lock: threading.RLock | None = None,
    ) -> None:
        self.store = store
        self._admin_lock = admin_lock or threading.RLock()
        self.tick_interval_s = tick_interval_s
        self._routers: dict[str, Router] = {}
        self._files: dict[str, tuple[PolicyFile, Callable[[str], bool]]] = {}
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def attach(
        self,
        name: str,
        default: str,
        ensure_loaded: Callable[[str], bool],
        folder: Path | None = None,
    ) -> Router:
        """Restore ``name``'s persisted policy if every version in it can be loaded,
        else route everything to ``default``. The policy and history live in the store's
        folder of the model, or in ``folder`` (TorchServe archives: never the store's,
        where a store model of the same name keeps its own)."""
        in_store = folder is None
        folder = folder or self.store.root / name
        policy_file = PolicyFile(folder / POLICY_FILE)
        history = HistoryLog(folder / HISTORY_FILE)
        record = policy_file.load()
        persist = recorder(policy_file=policy_file, history=history)

        def on_event(event: RolloutEvent) -> None:
            log.warning(
                "%s rollout %s: %s -> %s (%s)",
                name,
                event.kind,
                event.from_policy.kind,
                event.to_policy.kind,
                event.reason,
            )
            persist(event)
            if event.kind == "complete" and in_store:
                self._promote_completed(name, event)

        if record is not None and all(ensure_loaded(v) for v in record.policy.versions()):
            router = Router.from_record(record, on_event=on_event)
            log.info("%s: restored %s policy from %s", name, record.policy.kind, policy_file.path)
        else:
            if record is not None:
                log.error(
                    "%s: persisted policy names a version that cannot load; serving %s only",
                    name,
                    default,
                )
            router = Router(name, FixedPolicy(version=default), on_event=on_event)
        self._routers[name] = router
        self._files[name] = (policy_file, ensure_loaded)
        return router

    def _promote_completed(self, name: str, event: RolloutEvent) -> None:
        """A canary that reached 100 % did what a promotion does, so the store says so
        too: everything else that reads its production pointer (``torchship predict``,
        batch jobs, a server started without this policy) agrees with the traffic."""
        (version,) = event.to_policy.versions()
        started = getattr(event.from_policy, "started_at", None)
        try:
            record = promote_unless_production(
                self.store,
                name,
                version,
                reason=f"canary completed: {event.reason}",
                unless_changed_since=started,
            )
        except Exception:  # the traffic has moved either way; say why the store did not
            log.exception(
                "%s: canary completed, but promoting %s in the store failed", name, version
            )
            return
        if record is not None:
            log.warning("%s:%s promoted to production (canary completed)", name, version)

    def sync(self) -> None:
        """Adopt policies other worker processes wrote (a policy set through one worker's
        management API, or an automatic rollback one of them decided), loading the
        versions they name first."""
        for name, (policy_file, ensure_loaded) in list(self._files.items()):
            try:
                record = policy_file.load_if_changed()
                if record is None:
                    continue
                with self._admin_lock:  # not while this process loads or unloads
                    if not all(ensure_loaded(v) for v in record.policy.versions()):
                        continue
                    self._routers[name].restore(record)
                    log.info(
                        "%s: adopted a %s policy written by another process",
                        name,
                        record.policy.kind,
                    )
            except Exception:
                log.exception("could not sync the traffic policy of %s", name)

    def router(self, name: str) -> Router | None:
        return self._routers.get(name)

    def route(self, name: str, headers: Mapping[str, str] | None) -> Route | None:
        router = self._routers.get(name)
        if router is None:
            return None
        header = router.sticky_header
        key = _header(headers, header) if header else None
        return router.route(key)

    def tick(self) -> list[RolloutEvent]:
        events: list[RolloutEvent] = []
        for router in list(self._routers.values()):
            try:
                events += router.tick()
            except Exception:
                log.exception("rollout tick failed for %s", router.model)
        return events

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._run, name="torchship-rollout", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_interval_s):
            self.sync()
            self.tick()


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None
