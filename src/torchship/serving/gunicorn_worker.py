"""gunicorn's threaded worker with a bounded wait: past it, a request gets a 503.

A Flask worker runs a few HTTP threads; once all of them wait on the model, gunicorn
queues every further request for a thread, with no limit and no timeout, so under
overload latency grows without bound while the batcher's own bounded queue never fills.
This worker refuses, with the usual 503 ``queue_full`` and ``Retry-After`` from the app's
error handling, a request that finds ``max_queue_size`` requests already waiting for a
thread (answered at once by two spare threads) and one that waited longer than
``timeout_s`` for its thread (the request's whole time limit, spent before it started).
Refused requests close their connection, so a refused client cannot hold a spare thread
with its next request. A probe (``GET`` of an open path such as ``/health/live``, read
from the connection's first bytes without consuming them) goes to a spare thread at
once, so a saturated worker still answers its liveness probe in time.

gunicorn also writes a response's status line and headers with one ``sendall`` and its
body with another; the worker joins them (:class:`OneWriteSocket`), as
``one_write`` does for uvicorn.
"""

from __future__ import annotations

import functools
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from torchship.serving.policies.gate import is_open_path

_local = threading.local()
SPARE_THREADS = 2
_JOIN_LIMIT = 256 * 1024
"""Bodies up to this size are joined to the headers; a bigger one follows them (no copy)."""


def shedding() -> bool:
    """True inside a request this worker decided to refuse (see :class:`SheddingWorker`)."""
    return bool(getattr(_local, "shed", False))


class _Pools:
    """What gthread takes for its thread pool: the worker's threads, and the spare ones
    for connections marked to be refused."""

    def __init__(self, threads: int) -> None:
        self.main = ThreadPoolExecutor(threads)
        self.spare = ThreadPoolExecutor(SPARE_THREADS, thread_name_prefix="refuse")

    def submit(self, fn: Callable[..., Any], conn: Any, *args: Any) -> Future[Any]:
        pool = self.spare if getattr(conn, "torchship_spare", False) else self.main
        return pool.submit(fn, conn, *args)

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        self.main.shutdown(wait, **kwargs)
        self.spare.shutdown(wait, **kwargs)


def peek(sock: Any) -> bytes | None:
    """The bytes waiting on ``sock``, left in place; None when none have arrived yet."""
    try:
        return bytes(sock.recv(512, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return None
    except OSError:  # not a plain socket, or already broken: let gunicorn find out
        return b""


def is_probe(first: bytes, open_paths: Sequence[str]) -> bool:
    """True when a request's first bytes are a GET or HEAD of an open path (anything
    unclear, such as a TLS handshake or a partial request line, is not a probe)."""
    method, _, rest = first.partition(b"\r\n")[0].partition(b" ")
    target = rest.partition(b" ")[0].partition(b"?")[0]
    if method not in (b"GET", b"HEAD") or not target.startswith(b"/"):
        return False
    return is_open_path(target.decode("latin-1"), open_paths)


class OneWriteSocket:
    """A connection's socket for one request: its first ``sendall`` (gunicorn's status
    line and headers) is held and sent with the next one (the body), so a small answer
    is one syscall and one TCP segment. Anything else asked of the socket sends what is
    held first; :meth:`flush` sends it at the end of the request (a body-less answer)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._head: bytes | None = None
        self._fresh = True

    def sendall(self, data: bytes, flags: int = 0) -> None:
        if self._fresh:
            self._fresh = False
            self._head = bytes(data)
            return
        head, self._head = self._head, None
        if head is not None:
            if len(data) <= _JOIN_LIMIT:
                data = head + data
            else:
                self._sock.sendall(head)
        self._sock.sendall(data, flags)

    def flush(self) -> None:
        head, self._head = self._head, None
        if head is not None:
            self._sock.sendall(head)

    def __getattr__(self, name: str) -> Any:
        self.flush()  # fileno() for sendfile, send() for 100-continue, close(), ...
        return getattr(self._sock, name)


class SheddingWorker(ThreadWorker):  # type: ignore[misc]
    """``gthread``, plus limits on the requests waiting for one of its threads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._limit: int | None = None
        self._timeout_s: float | None = None
        self._open_paths: Sequence[str] = ()

    def init_process(self) -> None:
        from torchship.serving.settings import ServeSettings
        from torchship.settings import load_settings

        settings = load_settings(cls=ServeSettings)
        self._limit, self._timeout_s = settings.max_queue_size, settings.timeout_s
        self._open_paths = tuple(settings.open_paths)
        super().init_process()  # runs the worker until it exits

    def get_thread_pool(self) -> _Pools:
        return _Pools(self.cfg.threads)

    def enqueue_req(self, conn: Any) -> None:
        first = peek(conn.sock)
        if first is None and self._wait_for_first_bytes(conn):
            return  # back here from the poller once the request has started to arrive
        probe = first is not None and is_probe(first, self._open_paths)
        with self._waiting_lock:
            refuse = not probe and self._limit is not None and self._waiting >= self._limit
            if not (probe or refuse):
                self._waiting += 1
        conn.torchship_refuse = refuse
        conn.torchship_spare = probe or refuse  # neither waits behind the model's requests
        conn.torchship_queued_at = time.monotonic()
        super().enqueue_req(conn)

    def _wait_for_first_bytes(self, conn: Any) -> bool:
        """gunicorn (25+) hands a new connection to a thread before its request arrives,
        and parks it on its poller when nothing comes within 5 s. Park it there first
        instead, so a probe can be told from a model request (and an idle connection
        holds no thread); like gunicorn's, it is closed after ``keepalive`` seconds
        without a byte. False where gunicorn has no such queue."""
        pending = getattr(self, "pending_conns", None)
        readable = getattr(self, "on_pending_socket_readable", None)
        if pending is None or readable is None or getattr(conn, "data_ready", True):
            return False
        if getattr(conn, "initialized", True):  # a kept-alive connection: readable already
            return False
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + self.cfg.keepalive  # as gunicorn's: kept in order
        pending.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, functools.partial(readable, conn))
        return True

    def handle(self, conn: Any) -> Any:
        # Timed here, when a thread takes it: the wait for the client's bytes that
        # follows is the client's slowness, not this worker's queue.
        conn.torchship_waited = time.monotonic() - conn.torchship_queued_at
        if not conn.torchship_spare:
            with self._waiting_lock:  # it has a thread now: no longer waiting
                self._waiting -= 1
        return super().handle(conn)

    def handle_request(self, req: Any, conn: Any) -> Any:
        refuse = conn.torchship_refuse or (
            self._timeout_s is not None and conn.torchship_waited > self._timeout_s
        )
        if refuse:
            req.must_close = True  # its next request gets a fresh decision, not this thread
        _local.shed = refuse
        sock = conn.sock
        conn.sock = one_write = OneWriteSocket(sock)
        try:
            return super().handle_request(req, conn)
        finally:
            conn.sock = sock  # the keep-alive poller and error answers get the real one
            _local.shed = False
            one_write.flush()
