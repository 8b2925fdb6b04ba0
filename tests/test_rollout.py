"""torchship.rollout: policies, routing, canary SLO judgement, persistence, no server.

Time is a FakeClock and randomness a seeded ``random.Random``: nothing sleeps.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from torchship.errors import InvalidInputError, TorchshipError
from torchship.rollout import (
    SLO,
    CanaryPolicy,
    FixedPolicy,
    HistoryLog,
    InvalidPolicyError,
    PolicyFile,
    PolicyRecord,
    RolloutConflictError,
    RolloutEvent,
    Router,
    ShadowPolicy,
    SlidingWindow,
    SplitPolicy,
    parse_policy,
    recorder,
    sticky_bucket,
)

WALL = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_router(
    policy: Any, *, clock: FakeClock | None = None, seed: int = 0, **kwargs: Any
) -> tuple[Router, list[RolloutEvent]]:
    events: list[RolloutEvent] = []
    router = Router(
        "digits",
        policy,
        clock=clock or FakeClock(),
        wall_clock=lambda: WALL,
        rng=random.Random(seed),
        on_event=events.append,
        **kwargs,
    )
    return router, events


def feed(router: Router, version: str, n: int, *, errors: int = 0, latency_s: float = 0.01) -> None:
    for i in range(n):
        router.observe(version, i >= errors, latency_s)


def canary(**overrides: Any) -> CanaryPolicy:
    slo = SLO(min_samples=50, window_s=60)
    return CanaryPolicy(**{"baseline": "v1", "candidate": "v2", "slo": slo, **overrides})


# --- policies: validation and JSON -------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"kind": "fixed", "version": "../v1"},
        {"kind": "fixed", "version": "latest"},
        {"kind": "fixed"},
        {"kind": "fixed", "version": "v1", "extra": 1},
        {"kind": "nope", "version": "v1"},
        {"kind": "split", "weights": {}},
        {"kind": "split", "weights": {"a": 1, "b": -1}},
        {"kind": "split", "weights": {"a": 0, "b": 0}},
        {"kind": "split", "weights": {"a": float("nan")}},
        {"kind": "split", "weights": {"a/b": 1}},
        {"kind": "split", "weights": {"a": 1}, "sticky_header": "X User"},
        {"kind": "canary", "baseline": "v1", "candidate": "v1"},
        {"kind": "canary", "baseline": "v1", "candidate": "v2", "steps": [5, 5, 100]},
        {"kind": "canary", "baseline": "v1", "candidate": "v2", "steps": [50, 25, 100]},
        {"kind": "canary", "baseline": "v1", "candidate": "v2", "steps": [5, 50]},
        {"kind": "canary", "baseline": "v1", "candidate": "v2", "steps": [0, 100]},
        {"kind": "canary", "baseline": "v1", "candidate": "v2", "steps": [5, 120]},
        {"kind": "canary", "baseline": "v1", "candidate": "v2", "steps": []},
        {"kind": "canary", "baseline": "v1", "candidate": "v2", "step_index": 4},
        {"kind": "canary", "baseline": "v1", "candidate": "v2", "interval_s": 0},
        {"kind": "canary", "baseline": "v1", "candidate": "v2", "advance": "auto"},
        {"kind": "canary", "baseline": "v1", "candidate": "v2", "slo": {"min_samples": 0}},
        {
            "kind": "canary",
            "baseline": "v1",
            "candidate": "v2",
            "slo": {"max_error_rate_increase": 1.5},
        },
        {"kind": "shadow", "primary": "v1", "candidate": "v2", "fraction": 1.1},
        {"kind": "shadow", "primary": "v1", "candidate": "v2", "fraction": -0.1},
        {"kind": "shadow", "primary": "v1", "candidate": "v1"},
    ],
)
def test_invalid_policies_are_rejected_with_a_400(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidPolicyError) as info:
        parse_policy(data)
    err = info.value
    assert err.status_code == 400 and err.code == "invalid_policy"
    assert err.details["errors"] and "Invalid traffic policy" in str(err)


def test_invalid_policy_error_names_the_field() -> None:
    with pytest.raises(InvalidPolicyError) as info:
        parse_policy({"kind": "split", "weights": {"a": 0}})
    assert info.value.to_dict()["details"]["errors"] == [
        {"loc": "weights", "msg": "weights must not all be zero"}
    ]
    with pytest.raises(InvalidPolicyError):
        parse_policy("{not json")


def test_constructing_a_bad_policy_directly_raises_validation_error() -> None:
    with pytest.raises(ValidationError):
        FixedPolicy(version="..")
    with pytest.raises(ValidationError):
        CanaryPolicy(baseline="v1", candidate="v2", steps=[10, 20])


@pytest.mark.parametrize(
    "policy",
    [
        FixedPolicy(version="v1"),
        SplitPolicy(weights={"v1": 3, "v2": 1}, sticky_header=None),
        CanaryPolicy(baseline="v1", candidate="v2", steps=[10, 100], advance="schedule"),
        ShadowPolicy(primary="v1", candidate="v2", fraction=0.5),
    ],
)
def test_policies_round_trip_through_json(policy: Any) -> None:
    assert parse_policy(policy.model_dump_json()) == policy
    assert parse_policy(policy.model_dump(mode="json")) == policy
    assert parse_policy(policy) is policy


# --- split ----------------------------------------------------------------------------


def test_random_split_converges_to_the_weights() -> None:
    router, _ = make_router(SplitPolicy(weights={"a": 70, "b": 20, "c": 10}))
    counts = Counter(router.route().version for _ in range(10_000))
    for version, share in {"a": 0.7, "b": 0.2, "c": 0.1}.items():
        assert abs(counts[version] / 10_000 - share) < 0.02


def test_sticky_keys_keep_their_version_and_follow_the_weights() -> None:
    policy = SplitPolicy(weights={"a": 1, "b": 3})
    router, _ = make_router(policy, seed=1)
    other_process, _ = make_router(policy, seed=99)
    keys = [f"user-{i}" for i in range(10_000)]
    first = {k: router.route(k).version for k in keys}
    assert all(router.route(k).version == first[k] for k in keys[:500])
    assert all(other_process.route(k).version == first[k] for k in keys)
    share_b = Counter(first.values())["b"] / len(keys)
    assert abs(share_b - 0.75) < 0.02
    # the hash includes the model name: another model splits its users independently
    assert sticky_bucket("digits", "user-1") != sticky_bucket("other", "user-1")
    assert 0 <= sticky_bucket("digits", "user-1") < 1


def test_split_without_sticky_header_ignores_the_key() -> None:
    router, _ = make_router(SplitPolicy(weights={"a": 1, "b": 1}, sticky_header=None))
    assert router.sticky_header is None
    assert len({router.route("same-user").version for _ in range(200)}) == 2


# --- canary ---------------------------------------------------------------------------


def test_canary_steps_advance_and_complete() -> None:
    router, events = make_router(FixedPolicy(version="v1"))
    router.set_policy(canary(), reason="start")
    assert events[-1].kind == "set" and events[-1].reason == "start"
    started = router.policy
    assert isinstance(started, CanaryPolicy) and started.started_at == WALL

    counts = Counter(router.route().version for _ in range(10_000))
    assert abs(counts["v2"] / 10_000 - 0.05) < 0.02

    on_candidate = [k for k in map(str, range(2000)) if router.route(k).version == "v2"]
    for percent in (25.0, 50.0):
        (event,) = router.advance()
        assert event.kind == "advance" and event.details["to_percent"] == percent
        policy = router.policy
        assert isinstance(policy, CanaryPolicy) and policy.percent == percent
        # a sticky user who got the candidate keeps it as the canary grows
        assert all(router.route(k).version == "v2" for k in on_candidate)

    (done,) = router.advance("looks good")
    assert done.kind == "complete" and done.reason == "looks good"
    assert router.policy == FixedPolicy(version="v2")
    assert router.previous_version == "v1"
    assert [e.kind for e in events] == ["set", "advance", "advance", "complete"]
    with pytest.raises(RolloutConflictError) as info:
        router.advance()
    assert info.value.status_code == 409


def test_scheduled_advance_needs_the_interval_and_a_healthy_slo() -> None:
    clock = FakeClock()
    router, events = make_router(
        canary(advance="schedule", interval_s=60, slo=SLO(min_samples=20, window_s=120)),
        clock=clock,
    )
    assert router.tick() == []  # no samples, no time
    clock.now += 61
    assert router.tick() == []  # interval elapsed but too few samples to judge
    feed(router, "v1", 20)
    feed(router, "v2", 19)
    assert router.tick() == []
    feed(router, "v2", 1)
    (event,) = router.tick()
    assert event.kind == "advance" and event.details["verdict"]["status"] == "healthy"
    assert "scheduled" in event.reason
    assert router.tick() == []  # the next step waits for a full interval again
    clock.now += 59
    feed(router, "v1", 20)
    feed(router, "v2", 20)
    assert router.tick() == []
    clock.now += 1
    assert [e.kind for e in router.tick()] == ["advance"]
    assert [e.kind for e in events] == ["advance", "advance"]


def test_manual_canary_never_advances_by_itself() -> None:
    clock = FakeClock()
    router, _ = make_router(canary(slo=SLO(min_samples=5)), clock=clock)
    feed(router, "v1", 10)
    feed(router, "v2", 10)
    clock.now += 10_000
    feed(router, "v1", 10)
    feed(router, "v2", 10)
    assert router.tick() == []
    assert isinstance(router.policy, CanaryPolicy) and router.policy.step_index == 0


def test_error_rate_breach_rolls_back_once_min_samples_are_reached() -> None:
    router, events = make_router(canary())
    feed(router, "v1", 49, errors=0)
    feed(router, "v2", 49, errors=10)
    assert router.tick() == []  # below min_samples: no judgement
    assert router.state()["canary"]["verdict"]["status"] == "insufficient"
    feed(router, "v1", 1)
    assert router.tick() == []  # the candidate is still below min_samples
    feed(router, "v2", 1)
    (event,) = router.tick()
    assert event.kind == "rollback" and "error rate" in event.reason
    assert event.details["automatic"] is True
    assert event.details["verdict"]["candidate"]["errors"] == 10
    assert event.details["verdict"]["candidate"]["error_rate"] == pytest.approx(0.2)
    assert event.details["slo"]["min_samples"] == 50
    assert router.policy == FixedPolicy(version="v1")
    assert events == [event]
    assert router.tick() == []  # fixed now: nothing to judge


def test_error_rate_within_the_allowed_increase_is_healthy() -> None:
    router, _ = make_router(canary())
    feed(router, "v1", 100, errors=2)
    feed(router, "v2", 100, errors=3)  # 0.03 <= 0.02 + 0.02
    assert router.tick() == []
    assert router.state()["canary"]["verdict"]["status"] == "healthy"


def test_p99_breach_rolls_back() -> None:
    router, _ = make_router(canary())
    feed(router, "v1", 100, latency_s=0.010)
    feed(router, "v2", 98, latency_s=0.010)
    feed(router, "v2", 2, latency_s=0.100)  # p99 of 100 samples = the 99th: 100 ms
    (event,) = router.tick()
    assert "p99" in event.reason and "error rate" not in event.reason
    assert event.details["verdict"]["candidate"]["p99_ms"] == pytest.approx(100.0)
    assert event.details["verdict"]["baseline"]["p99_ms"] == pytest.approx(10.0)
    assert router.policy == FixedPolicy(version="v1")


def test_old_samples_leave_the_slo_window() -> None:
    clock = FakeClock()
    router, _ = make_router(canary(), clock=clock)
    feed(router, "v1", 100)
    feed(router, "v2", 100, errors=100)  # a bad minute...
    clock.now += 60  # ...that has just left the 60 s window
    feed(router, "v1", 60)
    feed(router, "v2", 60)
    assert router.tick() == []
    assert router.state()["versions"]["v2"]["requests"] == 60


def test_new_canary_judges_the_candidate_only_on_its_own_traffic() -> None:
    router, _ = make_router(FixedPolicy(version="v1"))
    feed(router, "v2", 100, errors=100)  # e.g. a failed earlier attempt
    router.set_policy(canary())
    assert router.state()["versions"]["v2"]["requests"] == 0
    feed(router, "v1", 60)
    feed(router, "v2", 60)
    assert router.tick() == []


def test_manual_rollback_targets() -> None:
    router, events = make_router(FixedPolicy(version="v1"))
    with pytest.raises(RolloutConflictError):
        router.rollback()  # nothing earlier
    router.set_policy(FixedPolicy(version="v2"))
    (event,) = router.rollback("v2 is slow")
    assert event.kind == "rollback" and event.details == {"automatic": False, "to_version": "v1"}
    assert router.policy == FixedPolicy(version="v1") and router.previous_version == "v2"

    router.set_policy(canary())
    (event,) = router.rollback()
    assert router.policy == FixedPolicy(version="v1")
    assert event.details["verdict"]["status"] == "insufficient"

    router.set_policy(ShadowPolicy(primary="v3", candidate="v4"))
    router.rollback()
    assert router.policy == FixedPolicy(version="v3")
    router.set_policy(SplitPolicy(weights={"v3": 1, "v4": 1}))
    router.rollback()
    assert router.policy == FixedPolicy(version="v3")
    assert [e.kind for e in events].count("rollback") == 4


# --- shadow ---------------------------------------------------------------------------


def test_shadow_mirrors_a_fraction_and_tracks_disagreement() -> None:
    router, _ = make_router(ShadowPolicy(primary="v1", candidate="v2", fraction=0.25))
    routes = [router.route("user") for _ in range(10_000)]
    assert {r.version for r in routes} == {"v1"}
    mirrored = sum(r.shadow == "v2" for r in routes)
    assert abs(mirrored / 10_000 - 0.25) < 0.02
    for i in range(200):
        router.observe_shadow(agree=i % 10 != 0)
    shadow = router.state()["shadow"]
    assert shadow == {
        "mirrored": mirrored,
        "compared": 200,
        "agreed": 180,
        "disagreed": 20,
        "disagreement_rate": 0.1,
    }
    router.set_policy(ShadowPolicy(primary="v1", candidate="v3"))  # a new run starts at 0
    assert router.state()["shadow"]["compared"] == 0


# --- windows and state ----------------------------------------------------------------


def test_sliding_window_prunes_and_is_bounded() -> None:
    window = SlidingWindow(max_samples=100)
    for t in range(10):
        window.add(float(t), ok=t % 2 == 0, latency_s=t / 100, window_s=5)
    stats = window.stats(9.0, 5)
    assert (stats.requests, stats.errors) == (5, 3)  # t = 5..9, of which 5, 7, 9 failed
    assert stats.p50_s == pytest.approx(0.07) and stats.p99_s == pytest.approx(0.09)
    assert window.stats(100.0, 5).requests == 0
    for i in range(1000):
        window.add(200.0, ok=i % 4 != 0, latency_s=0.0, window_s=5)
    assert len(window) == 100
    assert window.stats(200.0, 5).errors == 25  # the running count stays exact


def test_state_reports_policy_and_per_version_stats() -> None:
    clock = FakeClock()
    router, _ = make_router(canary(advance="schedule", interval_s=30), clock=clock)
    feed(router, "v1", 10, errors=1, latency_s=0.02)
    router.observe("v9", True, 0.5)  # e.g. a request pinned to an unrelated version
    clock.now += 10
    state = router.state()
    assert state["policy"]["kind"] == "canary" and state["sticky_header"] == "X-User-ID"
    assert state["versions"]["v1"] == {
        "requests": 10,
        "errors": 1,
        "error_rate": 0.1,
        "p50_ms": 20.0,
        "p99_ms": 20.0,
    }
    assert state["versions"]["v2"]["requests"] == 0
    assert state["versions"]["v2"]["p99_ms"] is None
    assert "v9" in state["versions"]
    assert state["canary"]["percent"] == 5 and state["canary"]["next_step_in_s"] == 20
    assert state["shadow"] is None


# --- events and persistence -----------------------------------------------------------


def test_on_event_errors_propagate_from_manual_changes_and_are_logged_from_tick(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(event: RolloutEvent) -> None:
        raise OSError("disk full")

    router, _ = make_router(canary())
    router.on_event = broken
    with pytest.raises(OSError):
        router.advance()
    feed(router, "v1", 60)
    feed(router, "v2", 60, errors=60)
    with caplog.at_level(logging.ERROR, logger="torchship.rollout"):
        (event,) = router.tick()
    assert event.kind == "rollback" and "on_event failed" in caplog.text


def test_policy_file_round_trip_and_restart(tmp_path: Path) -> None:
    policy_file = PolicyFile(tmp_path / "policies" / "digits.json")
    history = HistoryLog(tmp_path / "history.jsonl")
    assert policy_file.load() is None
    router, _ = make_router(FixedPolicy(version="v1"))
    router.on_event = recorder(policy_file=policy_file, history=history)
    router.set_policy(canary(advance="schedule"), reason="try v2")
    router.advance()

    record = policy_file.load()
    assert record is not None and record == router.record().model_copy(update={"updated_at": WALL})
    assert isinstance(record.policy, CanaryPolicy) and record.policy.step_index == 1
    assert record.previous_version is None

    restarted = Router.from_record(record, clock=FakeClock(), rng=random.Random(0))
    assert restarted.policy == router.policy
    assert [r["kind"] for r in history.read()] == ["set", "advance"]
    assert history.read()[0]["source"] == "router"
    assert history.read()[1]["reason"] == "advanced by hand"
    assert history.read()[1]["to_policy"]["step_index"] == 1


def test_policy_file_sees_other_writers_and_rejects_corruption(tmp_path: Path) -> None:
    path = tmp_path / "digits.json"
    mine, theirs = PolicyFile(path), PolicyFile(path)
    mine.save(PolicyRecord(model="digits", policy=FixedPolicy(version="v1")))
    assert mine.load_if_changed() is None
    theirs.save(PolicyRecord(model="digits", policy=FixedPolicy(version="v2")))
    changed = mine.load_if_changed()
    assert changed is not None and changed.policy == FixedPolicy(version="v2")
    assert mine.load_if_changed() is None

    router, events = make_router(FixedPolicy(version="v1"))
    router.restore(changed)
    assert router.policy == FixedPolicy(version="v2") and events == []
    with pytest.raises(InvalidInputError):
        router.restore(changed.model_copy(update={"model": "other"}))

    path.write_text('{"model": "digits", "policy": {"kind": "fixed"')
    with pytest.raises(InvalidPolicyError) as info:
        mine.load()
    assert str(path) in str(info.value)


def test_history_log_appends_reads_and_survives_a_torn_line(tmp_path: Path) -> None:
    log = HistoryLog(tmp_path / "store" / "history.jsonl")
    assert log.read() == []
    first = log.append({"action": "promote", "model": "digits", "version": "v2"})
    assert datetime.fromisoformat(first["at"]).tzinfo is not None
    log.append({"action": "rollback", "at": "2024-01-01T00:00:00.000+00:00"})
    with log.path.open("ab") as fh:
        fh.write(b'{"action": "promote", "mod')  # a crash mid-write
    records = log.read()
    assert [r["action"] for r in records] == ["promote", "rollback"]
    assert records[1]["at"] == "2024-01-01T00:00:00.000+00:00"

    log.append({"action": "after-crash"})
    assert [r["action"] for r in log.read()] == ["promote", "rollback", "after-crash"]
    assert [r["action"] for r in log.read(last=1)] == ["after-crash"]
    with pytest.raises(TypeError):
        log.append({"not json": object()})
    assert len(log.read()) == 3


# --- concurrency ----------------------------------------------------------------------


def test_concurrent_route_and_observe_add_up() -> None:
    router, _ = make_router(SplitPolicy(weights={"a": 1, "b": 1}), max_samples=100_000)
    threads, per_thread = 8, 2000
    served: list[Counter[str]] = [Counter() for _ in range(threads)]
    start = threading.Barrier(threads)

    def worker(n: int) -> None:
        start.wait()
        for i in range(per_thread):
            version = router.route(f"{n}-{i}" if i % 2 else None).version
            served[n][version] += 1
            router.observe(version, ok=i % 10 != 0, latency_s=0.001)
            if i % 500 == 0:
                router.state()
                router.tick()

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    total = sum(served, Counter())
    versions = router.state()["versions"]
    assert sum(v["requests"] for v in versions.values()) == threads * per_thread
    assert {v: versions[v]["requests"] for v in "ab"} == dict(total)
    assert sum(v["errors"] for v in versions.values()) == threads * per_thread // 10


def test_router_rejects_bad_arguments() -> None:
    with pytest.raises(TorchshipError):
        Router("../digits", FixedPolicy(version="v1"))
    with pytest.raises(InvalidPolicyError):
        Router("digits", {"kind": "fixed", "version": ".."})
    with pytest.raises(InvalidInputError):
        Router("digits", FixedPolicy(version="v1"), window_s=0)
