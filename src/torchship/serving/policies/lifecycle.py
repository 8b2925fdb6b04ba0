"""SIGTERM in two steps: first not-ready while still serving, then drain and exit 0.

A load balancer (Kubernetes endpoints, nginx health checks) keeps sending traffic until it
sees the replica's readiness fail. If the server stopped accepting at SIGTERM, requests
routed in that gap would fail. With ``drain_delay_s`` > 0 the first SIGTERM only marks
the service draining — ``/health/ready`` answers 503, responses say
``Connection: close`` so keep-alive clients reconnect elsewhere — and the server's own
graceful shutdown (stop accepting, finish in-flight requests, exit 0) starts
``drain_delay_s`` later. A second SIGTERM (or SIGINT) skips the wait.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("torchship.serving")


def install_drain_delay(begin_drain: Callable[[], None], delay_s: float) -> bool:
    """Wrap this process's SIGTERM handler (the server's) with the delay; False when it
    cannot (no delay asked, not the main thread, no Python handler installed)."""
    if delay_s <= 0 or threading.current_thread() is not threading.main_thread():
        return False
    previous: Any = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return False
    fired = threading.Event()

    def handler(sig: int, frame: FrameType | None) -> None:
        if fired.is_set():  # asked twice: stop draining politely, shut down now
            previous(sig, frame)
            return
        fired.set()
        begin_drain()
        log.warning("SIGTERM: not ready, serving %.1f s more before draining", delay_s)
        timer = threading.Timer(delay_s, previous, args=(sig, None))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)
    return True
