"""torchship.batching: the collector, the batcher and the batch-size sizer, no server.

Synchronisation is by events, futures and a fake clock, never by sleeping: a batch is
"held" inside predict_fn until the test has queued what it needs behind it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from torchship.batching import (
    BatchEvent,
    BatchMeasurement,
    DynamicBatcher,
    InferenceError,
    choose_max_batch_size,
    collect_batch,
    measure_batch_scaling,
)
from torchship.errors import (
    ConfigError,
    InvalidInputError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
)

WAIT = 5.0  # upper bound on any wait; reached only when a test is already failing


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedQueue:
    """Items arrive at set times on a FakeClock; a blocking get advances the clock."""

    def __init__(self, clock: FakeClock, arrivals: list[tuple[float, Any]]) -> None:
        self.clock = clock
        self.arrivals = sorted(arrivals, key=lambda a: a[0])
        self.timeouts: list[float | None] = []

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout if block else 0.0)
        if self.arrivals and self.arrivals[0][0] <= self.clock.now:
            return self.arrivals.pop(0)[1]
        if not block:
            raise queue.Empty
        if timeout is None:
            assert self.arrivals, "would block forever"
            self.clock.now = self.arrivals[0][0]
            return self.arrivals.pop(0)[1]
        if self.arrivals and self.arrivals[0][0] <= self.clock.now + timeout:
            self.clock.now = self.arrivals[0][0]
            return self.arrivals.pop(0)[1]
        self.clock.now += timeout
        raise queue.Empty


# --- collect_batch ---------------------------------------------------------------


def test_collect_batch_stops_at_max_batch_size() -> None:
    clock = FakeClock()
    q = ScriptedQueue(clock, [(0.0, i) for i in range(5)])
    assert collect_batch(q, 3, 1.0, clock=clock) == [0, 1, 2]
    assert collect_batch(q, 3, 1.0, clock=clock) == [3, 4]
    assert clock.now == 1.0  # the second batch waited out its deadline for a third item


def test_collect_batch_stops_at_deadline_from_first_arrival() -> None:
    clock = FakeClock()
    q = ScriptedQueue(clock, [(1.0, "a"), (1.004, "b"), (1.009, "c"), (1.02, "late")])
    assert collect_batch(q, 10, 0.01, clock=clock) == ["a", "b", "c"]
    assert clock.now == pytest.approx(1.01)  # first arrival (1.0) + max_delay
    assert collect_batch(q, 10, 0.01, clock=clock) == ["late"]


def test_collect_batch_first_item_timeout_returns_empty() -> None:
    clock = FakeClock()
    q = ScriptedQueue(clock, [(5.0, "x")])
    assert collect_batch(q, 4, 0.01, timeout=0.5, clock=clock) == []
    assert clock.now == 0.5
    assert collect_batch(q, 4, 0.01, timeout=0, clock=clock) == []  # non-blocking
    assert q.timeouts[-1] == 0.0


def test_collect_batch_zero_delay_takes_only_what_is_already_queued() -> None:
    clock = FakeClock()
    q = ScriptedQueue(clock, [(0.0, 1), (0.0, 2), (0.0, 3), (0.001, 4)])
    assert collect_batch(q, 10, 0.0, clock=clock) == [1, 2, 3]
    assert clock.now == 0.0  # never waited


def test_collect_batch_ends_at_a_last_item_without_waiting() -> None:
    clock = FakeClock()
    q = ScriptedQueue(clock, [(0.0, 1), (0.0, "stop"), (0.0, 2)])
    assert collect_batch(q, 10, 5.0, is_last=lambda x: x == "stop", clock=clock) == [1, "stop"]
    assert clock.now == 0.0


def test_collect_batch_with_a_real_queue() -> None:
    q: queue.Queue[int] = queue.Queue()
    for i in range(3):
        q.put(i)
    assert collect_batch(q, 2, 0.001) == [0, 1]
    assert collect_batch(q, 8, 0.001) == [2]
    assert collect_batch(q, 8, 0.001, timeout=0.001) == []


@pytest.mark.parametrize(("size", "delay"), [(0, 0.01), (4, -1.0)])
def test_collect_batch_rejects_bad_arguments(size: int, delay: float) -> None:
    with pytest.raises(ConfigError):
        collect_batch(queue.Queue(), size, delay)


# --- DynamicBatcher helpers ------------------------------------------------------


class Model:
    """A predict_fn double: applies ``fn`` per item, records batches, can hold one."""

    def __init__(
        self,
        fn: Callable[[Any], Any] = lambda x: x * 2,
        *,
        clock: FakeClock | None = None,
        cost_s: float = 0.0,
    ) -> None:
        self.fn = fn
        self.clock = clock
        self.cost_s = cost_s
        self.batches: list[list[Any]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self._hold = False

    def hold_next(self) -> None:
        self.entered.clear()
        self.release.clear()
        self._hold = True

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        if self._hold:
            self._hold = False
            self.entered.set()
            assert self.release.wait(WAIT)
        if self.clock is not None:
            self.clock.now += self.cost_s
        return [self.fn(x) for x in items]


@contextmanager
def held(model: Model, batcher: DynamicBatcher[Any, Any], first: Any = 0) -> Iterator[Any]:
    """Run ``first`` as a batch and keep it inside predict_fn until the block ends."""
    model.hold_next()
    future = batcher.submit_future(first)
    assert model.entered.wait(WAIT)
    try:
        yield future
    finally:
        model.release.set()


# --- batching and routing results ------------------------------------------------


def test_requests_queued_together_run_as_one_batch() -> None:
    model = Model()
    with DynamicBatcher(model, max_batch_size=4, max_delay_ms=0) as batcher:
        with held(model, batcher, 0) as first:
            futures = [batcher.submit_future(i) for i in range(1, 9)]
        assert [f.result(WAIT) for f in futures] == [2 * i for i in range(1, 9)]
        assert first.result(WAIT) == 0
    assert model.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]


def test_concurrent_threads_each_get_their_own_result() -> None:
    model = Model()
    n_threads, per_thread = 8, 25
    barrier = threading.Barrier(n_threads)
    results: dict[int, int] = {}

    def client(t: int) -> None:
        barrier.wait(WAIT)
        for k in range(per_thread):
            x = t * 1000 + k
            results[x] = batcher.submit(x, timeout=WAIT)

    with DynamicBatcher(model, max_batch_size=8, max_delay_ms=2) as batcher:
        threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(WAIT)
    assert len(results) == n_threads * per_thread
    assert all(y == 2 * x for x, y in results.items())
    assert all(1 <= len(b) <= 8 for b in model.batches)
    assert sorted(x for b in model.batches for x in b) == sorted(results)


def test_torch_linear_batched_equals_unbatched() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 4).eval()
    inputs = [torch.randn(16) for _ in range(8)]

    def predict(items: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return list(linear(torch.stack(items)).unbind(0))

    model = Model(lambda x: x)
    sizes: list[int] = []

    def predict_and_record(items: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes.append(len(items))
        return predict(model(items))

    with DynamicBatcher(predict_and_record, max_batch_size=8, max_delay_ms=0) as batcher:
        with held(model, batcher, torch.zeros(16)):
            futures = [batcher.submit_future(x) for x in inputs]
        outputs = [f.result(WAIT) for f in futures]
    assert sizes == [1, 8]
    with torch.inference_mode():
        for x, y in zip(inputs, outputs, strict=True):
            torch.testing.assert_close(y, linear(x.unsqueeze(0))[0], atol=1e-6, rtol=0)


def test_max_batch_size_one_never_batches() -> None:
    model = Model()
    with DynamicBatcher(model, max_batch_size=1, max_delay_ms=50) as batcher:
        with held(model, batcher, 0):
            futures = [batcher.submit_future(i) for i in range(1, 5)]
        assert [f.result(WAIT) for f in futures] == [2, 4, 6, 8]
    assert model.batches == [[0], [1], [2], [3], [4]]


def test_asubmit_from_many_concurrent_tasks() -> None:
    model = Model()

    async def main(batcher: DynamicBatcher[int, int]) -> list[int]:
        return await asyncio.gather(*(batcher.asubmit(i) for i in range(300)))

    # Room for all 300: they are queued in one event-loop turn.
    with DynamicBatcher(model, max_batch_size=16, max_delay_ms=5, max_queue_size=300) as batcher:
        assert asyncio.run(main(batcher)) == [2 * i for i in range(300)]
        stats = batcher.stats
    assert stats.completed == 300
    assert max(stats.batch_sizes) <= 16
    assert stats.mean_batch_size > 1


# --- backpressure and timeouts ---------------------------------------------------


def test_queue_full_is_refused_at_once_with_retry_after() -> None:
    model = Model()
    with DynamicBatcher(model, max_batch_size=2, max_queue_size=2, max_delay_ms=0) as batcher:
        with held(model, batcher, 0):
            queued = [batcher.submit_future(1), batcher.submit_future(2)]
            with pytest.raises(QueueFullError) as info:
                batcher.submit_future(3)
            assert info.value.retry_after >= 1
            assert info.value.status_code == 503
        assert [f.result(WAIT) for f in queued] == [2, 4]
        assert batcher.stats.rejected == 1
        assert batcher.submit(3) == 6  # room again


def test_retry_after_follows_recent_batch_latency() -> None:
    clock = FakeClock()
    model = Model(clock=clock, cost_s=3.0)
    with DynamicBatcher(
        model, max_batch_size=2, max_queue_size=4, max_delay_ms=0, clock=clock
    ) as batcher:
        assert batcher.submit(0) == 0  # one batch: 3 s of (fake) inference
        with held(model, batcher, 1):
            for i in range(4):
                batcher.submit_future(10 + i)
            with pytest.raises(QueueFullError) as info:
                batcher.submit_future(99)
    # 4 queued / 2 per batch + the batch in flight = 3 batches x 3 s
    assert info.value.retry_after == 9.0


def test_sync_timeout_raises_and_the_request_is_skipped() -> None:
    model = Model()
    with DynamicBatcher(model, max_delay_ms=0) as batcher:
        with held(model, batcher, 0), pytest.raises(RequestTimeoutError):
            batcher.submit(1, timeout=0.05)
        assert batcher.submit(2) == 4
        stats = batcher.stats
    assert model.batches == [[0], [2]]  # 1 never reached predict_fn
    assert (stats.timed_out, stats.skipped) == (1, 1)


def test_requests_past_their_deadline_are_skipped_by_the_worker() -> None:
    clock = FakeClock()
    model = Model()
    with DynamicBatcher(model, max_delay_ms=0, clock=clock) as batcher:
        with held(model, batcher, 0):
            late = batcher.submit_future(1, timeout=5)
            in_time = batcher.submit_future(2, timeout=50)
            clock.now += 10
        with pytest.raises(RequestTimeoutError):
            late.result(WAIT)
        assert in_time.result(WAIT) == 4
    assert model.batches == [[0], [2]]


def test_asubmit_timeout() -> None:
    model = Model()

    async def main(batcher: DynamicBatcher[int, int]) -> None:
        with pytest.raises(RequestTimeoutError):
            await batcher.asubmit(1, timeout=0.05)

    with DynamicBatcher(model, max_delay_ms=0) as batcher:
        with held(model, batcher, 0):
            asyncio.run(main(batcher))
        assert batcher.submit(2) == 4
    assert model.batches == [[0], [2]]


def test_cancelled_queued_request_is_skipped_and_later_requests_work() -> None:
    model = Model()

    async def main(batcher: DynamicBatcher[int, int]) -> int:
        task = asyncio.create_task(batcher.asubmit(1))
        await asyncio.sleep(0)  # a scheduler turn: the task has queued its request
        assert batcher.queue_depth == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        model.release.set()
        return await batcher.asubmit(2)

    with DynamicBatcher(model, max_delay_ms=0) as batcher:
        with held(model, batcher, 0):
            assert asyncio.run(main(batcher)) == 4
        stats = batcher.stats
    assert model.batches == [[0], [2]]
    assert (stats.cancelled, stats.skipped) == (1, 1)


def test_cancelled_in_flight_request_does_not_break_its_batch() -> None:
    model = Model()

    async def main(batcher: DynamicBatcher[int, int]) -> tuple[int, ...]:
        model.hold_next()
        gone = asyncio.create_task(batcher.asubmit(1))
        stays = asyncio.create_task(batcher.asubmit(2))
        assert await asyncio.to_thread(model.entered.wait, WAIT)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        model.release.set()
        assert await stays == 4
        return tuple(await asyncio.gather(batcher.asubmit(3), batcher.asubmit(4)))

    # A long max_delay makes [1, 2] one batch however the two submits interleave.
    with DynamicBatcher(model, max_batch_size=2, max_delay_ms=2000) as batcher:
        assert asyncio.run(main(batcher)) == (6, 8)
    assert model.batches == [[1, 2], [3, 4]]


# --- failures --------------------------------------------------------------------


def test_predict_exception_fails_the_whole_batch_and_the_worker_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fn(x: str) -> str:
        if x == "boom":
            raise ValueError("secret internals")
        return x.upper()

    model = Model(lambda x: x)

    def predict(items: list[str]) -> list[str]:
        return [fn(x) for x in model(items)]

    with DynamicBatcher(predict, max_delay_ms=0, name="m") as batcher:
        model.hold_next()
        first = batcher.submit_future("first")
        assert model.entered.wait(WAIT)
        futures = [batcher.submit_future(x) for x in ("a", "boom", "b")]
        with caplog.at_level(logging.ERROR, logger="torchship.batching"):
            model.release.set()
            errors = [f.exception(WAIT) for f in futures]
            assert batcher.submit("c") == "C"
        assert first.result(WAIT) == "FIRST"
        assert batcher.stats.failed == 3
    assert len({id(e) for e in errors}) == 3  # a fresh error per caller
    for e in errors:
        assert isinstance(e, InferenceError)
        assert isinstance(e.__cause__, ValueError)
        assert e.status_code == 500 and "secret" not in str(e)
    assert len([r for r in caplog.records if r.exc_info]) == 1  # logged once per batch


def test_torchship_errors_from_predict_pass_through_unchanged() -> None:
    model = Model()

    def predict(items: list[int]) -> list[int]:
        model(items)
        raise InvalidInputError("inputs must be images", hint="send a PNG")

    with DynamicBatcher(predict, max_delay_ms=0) as batcher:
        model.hold_next()
        first = batcher.submit_future(0)
        assert model.entered.wait(WAIT)
        second = batcher.submit_future(1)
        model.release.set()
        for f in (first, second):
            with pytest.raises(InvalidInputError, match="PNG"):
                f.result(WAIT)


def test_an_exception_in_place_of_one_output_fails_only_that_request() -> None:
    def fn(x: int) -> int | Exception:
        if x < 0:
            return InvalidInputError(f"{x} is negative")
        if x == 13:
            return RuntimeError("unlucky")
        return x * 2

    model = Model(fn)
    with DynamicBatcher(model, max_delay_ms=0) as batcher:
        with held(model, batcher, 0):
            futures = {x: batcher.submit_future(x) for x in (1, -1, 13, 2)}
        assert futures[1].result(WAIT) == 2
        assert futures[2].result(WAIT) == 4
        with pytest.raises(InvalidInputError, match="negative"):
            futures[-1].result(WAIT)
        with pytest.raises(InferenceError) as info:
            futures[13].result(WAIT)
        assert isinstance(info.value.__cause__, RuntimeError)
    assert model.batches[1] == [1, -1, 13, 2]


@pytest.mark.parametrize(
    ("outputs", "match"),
    [(lambda items: items[:-1], "one output per input"), (lambda items: 5, "not a sequence")],
)
def test_wrong_predict_outputs_fail_the_batch_with_a_hint(
    outputs: Callable[[list[int]], Any], match: str
) -> None:
    model = Model()
    bad = {"on": True}

    def predict(items: list[int]) -> Any:
        out = model(items)
        return outputs(out) if bad["on"] else out

    with DynamicBatcher(predict, max_delay_ms=0) as batcher:
        with held(model, batcher, 0) as first:
            second = batcher.submit_future(1)
        for f in (first, second):
            with pytest.raises(InferenceError, match=match):
                f.result(WAIT)
        bad["on"] = False
        assert batcher.submit(3) == 6


def test_a_failing_observer_does_not_stop_the_worker() -> None:
    def observer(event: BatchEvent) -> None:
        raise RuntimeError("metrics backend down")

    with DynamicBatcher(Model(), on_batch=observer, max_delay_ms=0) as batcher:
        assert batcher.submit(1) == 2
        assert batcher.submit(2) == 4


# --- stats -----------------------------------------------------------------------


def test_stats_and_batch_events() -> None:
    model = Model()
    events: list[BatchEvent] = []
    with DynamicBatcher(
        model, max_batch_size=4, max_delay_ms=0, on_batch=events.append, name="digits"
    ) as batcher:
        with held(model, batcher, 0):
            futures = [batcher.submit_future(i) for i in range(1, 6)]
            assert batcher.queue_depth == 5
        for f in futures:
            f.result(WAIT)
        stats = batcher.stats
    assert [e.size for e in events] == [1, 4, 1]
    assert [len(e.queue_waits_s) for e in events] == [1, 4, 1]
    assert events[1].queue_depth == 1  # item 5 still waiting when [1..4] started
    assert all(e.batcher == "digits" and e.inference_s >= 0 for e in events)
    assert stats.batch_sizes == {1: 2, 4: 1}
    assert (stats.submitted, stats.completed, stats.failed, stats.batches) == (6, 6, 0, 3)
    assert stats.mean_batch_size == 2.0
    assert stats.queue_depth == 0 and stats.running
    assert not batcher.stats.running


# --- lifecycle -------------------------------------------------------------------


def test_stop_with_drain_finishes_in_flight_and_queued_work() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch_size=2, max_delay_ms=0).start()
    stopped: list[bool] = []
    with held(model, batcher, 0) as first:
        futures = [batcher.submit_future(i) for i in range(1, 6)]
        stopper = threading.Thread(target=lambda: stopped.append(batcher.stop(drain=True)))
        stopper.start()
    stopper.join(WAIT)
    assert stopped == [True]
    assert first.result(0) == 0
    assert [f.result(0) for f in futures] == [2, 4, 6, 8, 10]
    with pytest.raises(ServiceUnavailableError, match="not running"):
        batcher.submit(9)


def test_stop_without_drain_fails_queued_requests_but_finishes_in_flight() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_delay_ms=0).start()
    with held(model, batcher, 0) as first:
        futures = [batcher.submit_future(i) for i in range(1, 4)]
        stopper = threading.Thread(target=batcher.stop, kwargs={"drain": False})
        stopper.start()
        for f in futures:  # failed by stop() while the worker is still busy
            assert isinstance(f.exception(WAIT), ServiceUnavailableError)
    stopper.join(WAIT)
    assert first.result(WAIT) == 0
    assert model.batches == [[0]]
    assert batcher.stats.skipped == 3


def test_stop_gives_up_on_a_stuck_worker_and_can_restart_later() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_delay_ms=0).start()
    with held(model, batcher, 0) as first:
        queued = batcher.submit_future(1)
        assert batcher.stop(timeout=0.01) is False
        assert isinstance(queued.exception(0), ServiceUnavailableError)
    assert first.result(WAIT) == 0
    assert batcher.stop() is True  # the worker has now ended
    with batcher:
        assert batcher.submit(5) == 10


def test_context_manager_and_not_running_errors() -> None:
    batcher = DynamicBatcher(Model())
    with pytest.raises(ServiceUnavailableError):
        batcher.submit(1)
    with batcher:
        assert batcher.running
        assert batcher.submit(1) == 2
        batcher.start()  # idempotent
    assert not batcher.running
    assert batcher.stats.rejected == 1
    assert batcher.stop() is True  # stopping twice is fine


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_delay_ms": -1},
        {"max_queue_size": 0},
        {"timeout_s": 0},
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        DynamicBatcher(Model(), **kwargs)


def test_bad_per_request_timeout_is_a_client_error() -> None:
    with DynamicBatcher(Model()) as batcher, pytest.raises(InvalidInputError):
        batcher.submit(1, timeout=0)


# --- measuring batch scaling -----------------------------------------------------


def _measured(*pairs: tuple[int, float]) -> list[BatchMeasurement]:
    return [BatchMeasurement(size, seconds, 1) for size, seconds in pairs]


def test_choose_max_batch_size_stops_where_gains_flatten() -> None:
    # items/s: 100, 190, 360, 380, 390 -> nothing beats 4 by 10% or more
    ms = _measured((1, 1 / 100), (2, 2 / 190), (4, 4 / 360), (8, 8 / 380), (16, 16 / 390))
    assert choose_max_batch_size(ms) == 4
    assert choose_max_batch_size(ms, min_gain=0.01) == 16
    assert choose_max_batch_size(ms, min_gain=3.0) == 1  # nothing beats 1 by 4x


def test_choose_max_batch_size_ignores_a_noisy_dip() -> None:
    # 8 dips below 4, but 16 is far better than both
    ms = _measured((1, 1 / 100), (4, 4 / 300), (8, 8 / 290), (16, 16 / 600))
    assert choose_max_batch_size(ms) == 16


def test_choose_max_batch_size_respects_a_latency_budget() -> None:
    ms = _measured((1, 0.001), (8, 0.002), (64, 0.010))
    assert choose_max_batch_size(ms) == 64
    assert choose_max_batch_size(ms, max_latency_s=0.005) == 8
    assert choose_max_batch_size(ms, max_latency_s=0.0001) == 1


def test_measure_with_a_known_cost_model_on_a_fake_clock() -> None:
    clock = FakeClock()

    def saturating(n: int) -> None:  # parallel up to 8 items, then linear
        clock.now += 0.004 * max(1.0, n / 8)

    scaling = measure_batch_scaling(saturating, budget_s=0.6, clock=clock)
    assert scaling.chosen == 8
    assert [m.batch_size for m in scaling.measurements] == [1, 2, 4, 8, 16, 32]
    assert scaling.measurements[3].items_per_s == pytest.approx(2000)

    def per_item_only(n: int) -> None:
        clock.now += 0.001 * n

    assert measure_batch_scaling(per_item_only, budget_s=0.6, clock=clock).chosen == 1

    def overhead_plus_per_item(n: int) -> None:
        # items/s = n / (4 + n) ms: 8 -> 667, 16 -> 800, 32 -> 889, 64 -> 941
        clock.now += 0.004 + 0.001 * n

    sizes = (1, 2, 4, 8, 16, 32, 64)
    assert measure_batch_scaling(overhead_plus_per_item, sizes, clock=clock).chosen == 32


def test_measure_with_real_sleeps() -> None:
    def saturating(n: int) -> None:
        # 20 ms up to 8 items, then 80 ms for 16: throughput peaks at 8 by margins
        # (8x below, 2x above) that sleep overshoot on a busy machine cannot close.
        time.sleep(0.02 if n <= 8 else 0.08)

    scaling = measure_batch_scaling(saturating, (1, 8, 16), budget_s=0.3, warmup=0)
    assert scaling.chosen == 8
    assert "<- chosen" in scaling.table()
    assert [row["chosen"] for row in scaling.as_rows()] == [False, True, False]


def test_measure_a_real_torch_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    x = torch.randn(32, 64)
    started = time.monotonic()
    with torch.inference_mode():
        scaling = measure_batch_scaling(lambda n: model(x[:n]), (1, 4, 16, 32), budget_s=0.4)
    assert time.monotonic() - started < 5
    assert scaling.chosen in (1, 4, 16, 32)
    assert all(m.repeats >= 1 and m.items_per_s > 0 for m in scaling.measurements)


@pytest.mark.parametrize("warmup", [1, 0])  # fails while warming up / while timing
def test_measure_stops_at_a_size_that_fails(warmup: int) -> None:
    clock = FakeClock()

    def predict(n: int) -> None:
        if n >= 8:
            raise MemoryError("out of memory")
        clock.now += 0.001

    scaling = measure_batch_scaling(predict, budget_s=0.1, warmup=warmup, clock=clock)
    assert [m.batch_size for m in scaling.measurements] == [1, 2, 4]
    assert scaling.chosen == 4
    assert scaling.failed == {8: "MemoryError: out of memory"}


def test_measure_never_times_sizes_over_the_latency_budget() -> None:
    clock = FakeClock()
    calls: list[int] = []

    def linear(n: int) -> None:  # 30 ms per item: a big model on one core
        calls.append(n)
        clock.now += 0.030 * n

    scaling = measure_batch_scaling(
        linear, (1, 2, 4, 8, 16, 32, 64), budget_s=0.5, max_latency_s=0.2, clock=clock
    )
    assert [m.batch_size for m in scaling.measurements] == [1, 2, 4]
    assert set(calls) == {1, 2, 4, 8}  # 8 took 240 ms twice; 16 and up never ran
    assert calls.count(8) == 2  # the warm-up and one more call, both over the budget
    assert calls.count(4) == 1 + len(scaling.measurements[2:3]) * scaling.measurements[2].repeats
    assert scaling.skipped == {
        8: "one batch took 240 ms, over the 200 ms budget (larger sizes not tried)"
    }
    assert "8 not timed: one batch took 240 ms" in scaling.table()
    assert scaling.chosen == 1

    slow_start = iter([0.5, 0.001])  # a slow first call is not held against a size

    def jittery(n: int) -> None:
        clock.now += next(slow_start, 0.001) if n == 2 else 0.001

    scaling = measure_batch_scaling(
        jittery, (1, 2, 4), budget_s=0.05, warmup=0, max_latency_s=0.1, clock=clock
    )
    assert [m.batch_size for m in scaling.measurements] == [1, 2, 4] and not scaling.skipped


def test_measure_reraises_when_the_smallest_size_fails() -> None:
    def predict(n: int) -> None:
        raise RuntimeError("model is broken")

    with pytest.raises(RuntimeError, match="broken"):
        measure_batch_scaling(predict)


@pytest.mark.parametrize("kwargs", [{"batch_sizes": ()}, {"batch_sizes": (0, 2)}, {"budget_s": 0}])
def test_measure_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        measure_batch_scaling(lambda n: None, **kwargs)


def test_submit_future_is_a_plain_concurrent_future() -> None:
    with DynamicBatcher(Model()) as batcher:
        future = batcher.submit_future(21)
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(WAIT) == 42


def test_a_worker_killed_by_system_exit_answers_everyone_and_stops_accepting() -> None:
    model = Model()

    def predict(items: list[int]) -> list[int]:
        model(items)
        raise SystemExit("die")

    batcher = DynamicBatcher(predict, max_delay_ms=0).start()
    model.hold_next()
    first = batcher.submit_future(0)
    assert model.entered.wait(WAIT)
    queued = batcher.submit_future(1)
    model.release.set()
    assert isinstance(first.exception(WAIT), ServiceUnavailableError)  # in flight
    assert isinstance(queued.exception(WAIT), ServiceUnavailableError)  # still queued
    assert batcher.stop(timeout=WAIT) is True
    with pytest.raises(ServiceUnavailableError):
        batcher.submit(2)


# --- inline mode: batches on the event loop ---------------------------------------


def test_inline_batches_what_arrived_in_one_loop_turn_on_the_loop_thread() -> None:
    threads: list[str] = []
    model = Model(lambda x: (threads.append(threading.current_thread().name), x * 2)[1])

    async def main(batcher: DynamicBatcher[int, int]) -> list[int]:
        return await asyncio.gather(*(batcher.asubmit(i) for i in range(10)))

    with DynamicBatcher(model, max_batch_size=4, max_delay_ms=0, inline=True) as batcher:
        assert asyncio.run(main(batcher)) == [2 * i for i in range(10)]
        assert batcher.submit(7) == 14  # threads still go through the worker
        stats = batcher.stats
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [7]]
    assert set(threads[:10]) == {threading.main_thread().name}
    assert threads[10].startswith("torchship-batcher")
    assert (stats.completed, stats.batches) == (11, 4)


def test_inline_waits_max_delay_for_a_batch_to_fill() -> None:
    model = Model()

    async def main(batcher: DynamicBatcher[int, int]) -> tuple[list[int], float]:
        began = time.monotonic()
        first = asyncio.ensure_future(batcher.asubmit(1))
        await asyncio.sleep(0.02)  # well within the delay: joins the same batch
        second = asyncio.ensure_future(batcher.asubmit(2))
        return [await first, await second], time.monotonic() - began

    with DynamicBatcher(model, max_batch_size=8, max_delay_ms=150, inline=True) as batcher:
        answers, waited = asyncio.run(main(batcher))
    assert answers == [2, 4]
    assert model.batches == [[1, 2]]
    assert waited >= 0.14  # the batch ran when the first request's delay was up


def test_inline_queue_bound_cancellation_and_errors() -> None:
    def fn(x: int) -> int:
        if x < 0:
            raise InvalidInputError("negative")
        return x * 2

    model = Model(fn)

    async def main(batcher: DynamicBatcher[int, int]) -> None:
        waiting = [asyncio.ensure_future(batcher.asubmit(i)) for i in (1, 2)]
        await asyncio.sleep(0)  # both pending, not yet flushed (200 ms delay)
        with pytest.raises(QueueFullError):
            await batcher.asubmit(3)
        waiting[0].cancel()  # a client that went away: skipped, not run
        assert await waiting[1] == 4
        with pytest.raises(InvalidInputError):
            await batcher.asubmit(-1)  # a client error reaches only its caller
        assert await batcher.asubmit(5) == 10

    with DynamicBatcher(
        model, max_batch_size=8, max_delay_ms=200, max_queue_size=2, inline=True
    ) as batcher:
        asyncio.run(main(batcher))
        stats = batcher.stats
    assert [2] in model.batches and not any(1 in b for b in model.batches)
    assert (stats.rejected, stats.cancelled, stats.skipped, stats.failed) == (1, 1, 1, 1)


def test_inline_stop_from_another_thread_answers_pending_requests() -> None:
    model = Model()

    async def main(batcher: DynamicBatcher[int, int]) -> list[int]:
        pending = [asyncio.ensure_future(batcher.asubmit(i)) for i in range(3)]
        await asyncio.sleep(0)
        stopper = asyncio.ensure_future(asyncio.to_thread(batcher.stop, True, 5.0))
        answers = list(await asyncio.gather(*pending))
        assert await stopper is True
        return answers

    batcher = DynamicBatcher(model, max_batch_size=8, max_delay_ms=100, inline=True).start()
    assert asyncio.run(main(batcher)) == [0, 2, 4]
    with pytest.raises(ServiceUnavailableError):
        batcher.submit(1)
