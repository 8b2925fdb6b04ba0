"""The local engine: a ``torch.utils.data.DataLoader`` feeding one model in this process.

Worker processes read and preprocess items (``InferenceDataset``) and collate them into
batches, ``prefetch_factor`` batches ahead each, while the main process runs the model
on the previous batch; on CUDA the batches are pinned by the loader so the predictor's
host-to-device copies are asynchronous. Rows come back in input order (the loader's
``in_order``) and are committed every ``chunk_size`` rows or ``commit_interval_s``
seconds, whichever comes first.

Threads: each loader worker runs with one torch thread (``worker_init_fn``), and the
model gets the cores the workers leave (:func:`plan_threads`); otherwise workers' and
model's thread pools fight over the same cores and both slow down (``benchmarks/batch.py``
measures it: on 2 cores, one worker next to a 2-thread ResNet-18 runs at about the
speed of no worker at all). How many workers pay off depends on the model and the
inputs; ``num_workers="auto"`` measures both (:mod:`torchship.batch.plan`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch.utils.data import DataLoader

from torchship.batch.dataset import InferenceDataset, collate, predict_rows
from torchship.batch.progress import Progress
from torchship.batch.writers import Committer
from torchship.runtime import Predictor

logger = logging.getLogger(__name__)
T = TypeVar("T")


def available_cores() -> int:
    """Cores this process may run on (CPU affinity / cgroup where visible)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_threads(num_workers: int, cores: int | None = None) -> int:
    """Model threads when ``num_workers`` loader processes share the machine.

    Workers are mostly busy decoding while the model computes, so each is given one
    core: the model gets ``cores - num_workers``, at least one.
    """
    cores = cores or available_cores()
    return max(1, cores - num_workers)


def worker_init(_worker_id: int) -> None:
    """Loader workers decode with NumPy/Pillow; one torch thread each is plenty."""
    torch.set_num_threads(1)


@dataclass
class EngineRun:
    items: int = 0
    failures: int = 0
    seconds: float = 0.0  # the inference loop
    startup: float = 0.0  # model loading and planning, before the loop


def run_local(
    dataset: InferenceDataset,
    predictor: Predictor,
    committer: Committer,
    *,
    batch_size: int,
    num_workers: int,
    top_k: int,
    progress: Progress,
    prefetch_factor: int = 2,
    amp: bool = False,
) -> EngineRun:
    """Run every item of ``dataset`` through ``predictor``; hand the rows, in input order,
    to ``committer``, which makes them durable in chunks."""
    cuda = predictor.device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=cuda,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=worker_init if num_workers > 0 else None,
        in_order=True,
    )
    result = EngineRun()
    start = time.monotonic()
    batches = loader if num_workers > 0 else _Prefetcher(loader, depth=prefetch_factor)
    try:
        for batch in batches:
            rows = predict_rows(predictor, batch, top_k=top_k, amp=amp)
            committer.add(rows)
            result.items += len(rows)
            result.failures += sum(r.status != "ok" for r in rows)
            progress.advance(len(rows))
    finally:
        # Ctrl-C or an error: what was computed is complete, so keep it.
        committer.flush()
        result.seconds = time.monotonic() - start
        if isinstance(batches, _Prefetcher):
            batches.close()
    return result


_DONE = object()


class _Prefetcher(Generic[T]):
    """Iterate ``source`` on a thread, ``depth`` items ahead of the consumer.

    With no loader processes (``num_workers=0``, the best layout when every core is
    needed by the model) the next batch is still decoded while the model runs on this
    one: Pillow and NumPy release the GIL while they work, and so does the model.
    """

    def __init__(self, source: Iterable[T], depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(source,), name="torchship-prefetch", daemon=True
        )
        self._thread.start()

    def _fill(self, source: Iterable[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failed(exc))
            return
        self._put(_DONE)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item  # type: ignore[misc]  # anything else came from source

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class _Failed:
    exc: BaseException
