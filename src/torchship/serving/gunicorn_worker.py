"""gunicorn's threaded worker with a bounded wait: over the limit, a request gets a 503.

A Flask worker runs a few HTTP threads; once all of them wait on the model, gunicorn
queues every further request for a thread, with no limit and no timeout, so under
overload latency grows without bound while the batcher's own bounded queue never fills.
This worker counts the requests waiting for a thread and, past ``max_queue_size``, hands
the request to a small separate pool whose threads answer it at once with the usual 503
``queue_full`` (and ``Retry-After``) through the app's error handling.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

_local = threading.local()
SHED_THREADS = 2


def shedding() -> bool:
    """True inside the request this worker decided to refuse (see :class:`SheddingWorker`)."""
    return bool(getattr(_local, "shed", False))


class SheddingWorker(ThreadWorker):  # type: ignore[misc]
    """``gthread``, plus a limit on the requests waiting for one of its threads."""

    tpool: ThreadPoolExecutor  # gthread's pool, made in its init_process

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._limit: int | None = None
        self._shed_pool: ThreadPoolExecutor | None = None

    def init_process(self) -> None:
        from torchship.serving.settings import ServeSettings
        from torchship.settings import load_settings

        self._limit = load_settings(cls=ServeSettings).max_queue_size
        self._shed_pool = ThreadPoolExecutor(SHED_THREADS, thread_name_prefix="shed")
        super().init_process()  # runs the worker until it exits

    def enqueue_req(self, conn: Any) -> None:
        # Called on the worker's main (poller) thread only, so swapping the pool is safe.
        with self._waiting_lock:
            shed = self._limit is not None and self._waiting >= self._limit
            if not shed:
                self._waiting += 1
        conn.torchship_shed = shed
        if not shed or self._shed_pool is None:
            super().enqueue_req(conn)
            return
        pool = self.tpool
        self.tpool = self._shed_pool
        try:
            super().enqueue_req(conn)
        finally:
            self.tpool = pool

    def handle(self, conn: Any) -> Any:
        if not getattr(conn, "torchship_shed", False):
            with self._waiting_lock:  # it has a thread now: no longer waiting
                self._waiting -= 1
        return super().handle(conn)

    def handle_request(self, req: Any, conn: Any) -> Any:
        _local.shed = getattr(conn, "torchship_shed", False)
        try:
            return super().handle_request(req, conn)
        finally:
            _local.shed = False
