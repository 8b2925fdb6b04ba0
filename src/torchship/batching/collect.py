"""The batch collector: a plain function over a queue with a monotonic deadline.

It knows nothing of threads, servers or models, so it is unit-tested with a fake
queue and a fake clock. ``DynamicBatcher`` runs it in a loop on its worker thread.
"""

from __future__ import annotations

import queue as queue_mod
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from torchship.errors import ConfigError

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")


class SupportsGet(Protocol[T_co]):
    """What ``collect_batch`` needs from a queue: ``queue.Queue`` and ``SimpleQueue`` fit.

    ``get`` blocks for at most ``timeout`` seconds (forever when ``None``; not at all
    when ``block`` is false) and raises ``queue.Empty`` when nothing came.
    """

    def get(self, block: bool = ..., timeout: float | None = ...) -> T_co: ...


def collect_batch(
    queue: SupportsGet[T],
    max_batch_size: int,
    max_delay_s: float,
    *,
    timeout: float | None = None,
    is_last: Callable[[T], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[T]:
    """Take one batch of at most ``max_batch_size`` items from ``queue``.

    Blocks for the first item, for at most ``timeout`` seconds (forever when ``None``),
    and returns ``[]`` if none came, so a worker loop can look up from time to time.
    Then it gathers more until the batch is full or the deadline passes: the first
    item's arrival (as seen by this call) plus ``max_delay_s``. Items already waiting
    in the queue are taken even after the deadline, since that costs no latency; so
    ``max_delay_s=0`` means "whatever is queued right now, never wait". An item for
    which ``is_last(item)`` is true (say, a shutdown sentinel) ends the batch at once.
    """
    if max_batch_size < 1:
        raise ConfigError(
            f"max_batch_size must be at least 1, got {max_batch_size}.",
            hint="Use max_batch_size=1 to turn batching off.",
        )
    if max_delay_s < 0:
        raise ConfigError(
            f"max_delay_s must not be negative, got {max_delay_s}.",
            hint="Use 0 to never wait for more items.",
        )
    try:
        if timeout is not None and timeout <= 0:
            first = queue.get(block=False)
        else:
            first = queue.get(block=True, timeout=timeout)
    except queue_mod.Empty:
        return []
    batch = [first]
    deadline = clock() + max_delay_s
    while len(batch) < max_batch_size and not (is_last is not None and is_last(batch[-1])):
        remaining = deadline - clock()
        try:
            if remaining > 0:
                batch.append(queue.get(block=True, timeout=remaining))
            else:
                batch.append(queue.get(block=False))
        except queue_mod.Empty:
            break
    return batch
