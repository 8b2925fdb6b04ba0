"""The management API's logic, framework-free: versions, load/unload, traffic policy,
promote, roll back, history. Both front ends expose it under ``/manage``.

It is separate from inference so it can be protected (admin scope) and bound to its
own port (``management_port``).
"""

from __future__ import annotations

from typing import Any

from torchship.errors import ConflictError, InvalidInputError, ModelNotFoundError
from torchship.rollout import FixedPolicy, Router, parse_policy
from torchship.serving.service import InferenceService
from torchship.store import stages, validate_name


class Management:
    def __init__(self, service: InferenceService) -> None:
        self.service = service

    # --- reading ----------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        return {
            "models": [self.model(name) for name in self.service.model_names()],
            "load_errors": self.service.load_errors,
        }

    def model(self, name: str) -> dict[str, Any]:
        router = self._router(name)
        loaded = {m.version: m.info() for m in self.service.models() if m.name == name}
        return {
            "name": name,
            "loaded": loaded,
            "versions": self.versions(name)["versions"],
            "traffic": router.state(),
        }

    def versions(self, name: str) -> dict[str, Any]:
        store = self.service.store
        self._router(name)
        staged = stages.stages(store, name)
        aliases = store.aliases(name)
        loaded = set(self.service.versions(name))
        return {
            "name": name,
            "versions": [
                {
                    "version": m.version,
                    "stage": staged.get(m.version, "staging"),
                    "aliases": [a for a, v in aliases.items() if v == m.version],
                    "loaded": m.version in loaded,
                    "created_at": m.created_at,
                    "metrics": m.metrics,
                }
                for m in store.manifests(name)
            ],
        }

    def history(self, name: str) -> dict[str, Any]:
        self._router(name)
        return {"name": name, "history": stages.history(self.service.store, name)}

    def policy(self, name: str) -> dict[str, Any]:
        return self._router(name).state()

    # --- changing -----------------------------------------------------------------------

    def load(self, name: str, version: str) -> dict[str, Any]:
        """Load (or reload) a version; it takes traffic only once a policy sends it some."""
        with self.service.admin_lock:
            return self._load(name, version)

    def _load(self, name: str, version: str) -> dict[str, Any]:
        self._router(name)
        validate_name(version, "version")
        ref = f"{name}:{version}"
        try:
            loaded = self.service.load(ref)
        except Exception as exc:
            self.service.load_errors[ref] = str(exc)
            raise
        self.service.load_errors.pop(ref, None)
        return loaded.info()

    def unload(self, name: str, version: str) -> dict[str, Any]:
        with self.service.admin_lock:
            return self._unload(name, version)

    def _unload(self, name: str, version: str) -> dict[str, Any]:
        router = self._router(name)
        if version in router.policy.versions():
            raise ConflictError(
                f"{name}:{version} takes traffic under the current {router.policy.kind} policy.",
                hint="Change the policy first (PUT /manage/models/{name}/policy).",
            )
        self.service.unload(name, version)
        return {"name": name, "version": version, "unloaded": True}

    def set_policy(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.service.admin_lock:
            return self._set_policy(name, body)

    def _set_policy(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        router = self._router(name)
        raw = body.get("policy", body)
        if not isinstance(raw, dict):
            raise InvalidInputError("The policy must be a JSON object with a 'kind'.")
        reason = str(body.get("reason", "set through the management API"))
        policy = parse_policy({k: v for k, v in raw.items() if k != "reason"})
        self._require_loaded(name, policy.versions(), load=bool(body.get("load", False)))
        events = router.set_policy(policy, reason)
        return {"events": [e.to_record() for e in events], "traffic": router.state()}

    def advance(self, name: str, reason: str) -> dict[str, Any]:
        with self.service.admin_lock:
            return self._advance(name, reason)

    def _advance(self, name: str, reason: str) -> dict[str, Any]:
        router = self._router(name)
        events = router.advance(reason or "advanced through the management API")
        return {"events": [e.to_record() for e in events], "traffic": router.state()}

    def promote(self, name: str, version: str, reason: str) -> dict[str, Any]:
        """Make ``version`` production in the store and route all traffic to it."""
        with self.service.admin_lock:
            return self._promote(name, version, reason)

    def _promote(self, name: str, version: str, reason: str) -> dict[str, Any]:
        router = self._router(name)
        version = self.service.store.resolve(name, version)
        self._require_loaded(name, [version], load=True)
        record = stages.promote(self.service.store, name, version, reason=reason)
        events = router.set_policy(FixedPolicy(version=version), reason or "promoted")
        return {
            "promoted": record,
            "events": [e.to_record() for e in events],
            "traffic": router.state(),
        }

    def rollback(self, name: str, *, to: str | None, reason: str) -> dict[str, Any]:
        """Undo a rollout in progress (canary/split/shadow -> its baseline), or point
        production back at the previous (or named) version."""
        with self.service.admin_lock:
            router = self._router(name)
            reason = reason or "rolled back through the management API"
            if to is None and router.policy.kind != "fixed":
                events = router.rollback(reason)
                return {"events": [e.to_record() for e in events], "traffic": router.state()}
            # Load the target before the store changes: a failed load changes nothing.
            target = stages.rollback_target(self.service.store, name, to)
            self._require_loaded(name, [target], load=True)
            record = stages.rollback(self.service.store, name, to=target, reason=reason)
            events = router.set_policy(FixedPolicy(version=target), reason)
            return {
                "rolled_back": record,
                "events": [e.to_record() for e in events],
                "traffic": router.state(),
            }

    # --- helpers ------------------------------------------------------------------------

    def _router(self, name: str) -> Router:
        validate_name(name)
        router = self.service.traffic.router(name)
        if router is None:
            raise ModelNotFoundError(
                f"Model {name!r} is not served here.",
                hint=f"Served models: {', '.join(self.service.model_names()) or 'none'}.",
            )
        return router

    def _require_loaded(self, name: str, versions: Any, *, load: bool) -> None:
        for version in versions:
            if version in self.service.versions(name):
                continue
            if not load:
                raise ConflictError(
                    f"{name}:{version} is not loaded, so it cannot take traffic.",
                    hint=f"Load it first: POST /manage/models/{name}/versions/{version}/load "
                    '(or send "load": true with the policy).',
                )
            self._load(name, version)
