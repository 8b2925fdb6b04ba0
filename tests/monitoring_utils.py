"""Helpers for the monitoring tests: a served digits store, a handler with a bug,
in-process servers on real sockets, and scraping /metrics."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import torch
from serving_utils import free_port, wait_ready

from torchship.monitoring.scrape import Scrape
from torchship.store import ModelStore
from torchship.zoo import digits

# A custom handler with a bug that only one kind of request triggers: a raw image body
# starting with b"BOOM" makes preprocessing raise an unexpected exception.
BUGGY_HANDLER = """
from torchship.serving import ClassifierHandler, ImagePayload


class Buggy(ClassifierHandler):
    def preprocess(self, payload):
        if isinstance(payload, ImagePayload) and payload.data.startswith(b"BOOM"):
            raise RuntimeError("secret-internal-detail at /srv/models/weights.bin")
        return super().preprocess(payload)
"""
BOOM = b"BOOM" + b"\0" * 64  # the request that hits the bug (Content-Type: image/png)


def save_digits(root: Path, model: torch.nn.Module, versions: int = 1) -> Path:
    """A store with ``versions`` copies of ``model`` as digits:1, digits:2, ..."""
    store = ModelStore(root)
    data = digits.load_digits_split()
    for _ in range(versions):
        store.save(
            model,
            "digits",
            input_spec=digits.input_spec(),
            labels=digits.LABELS,
            examples=data.x_test[:8],
        )
    return root


def write_buggy_handler(folder: Path) -> str:
    path = folder / "buggy_handler.py"
    path.write_text(BUGGY_HANDLER)
    return f"{path}:Buggy"


# --- Prometheus text ---------------------------------------------------------------------


def scrape(base: str) -> Scrape:
    """``/metrics``, checked to be Prometheus text, parsed."""
    r = requests.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


# --- in-process servers on real sockets ---------------------------------------------------


@contextlib.contextmanager
def serve_in_thread(app: Any, framework: str) -> Iterator[str]:
    """Serve ``app`` on a free loopback port from a thread of this process."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if framework == "fastapi":
        import uvicorn

        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None)
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            wait_ready(base)
            yield base
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    else:
        from werkzeug.serving import make_server

        wsgi = make_server("127.0.0.1", port, app, threaded=True)
        thread = threading.Thread(target=wsgi.serve_forever, daemon=True)
        thread.start()
        try:
            wait_ready(base)
            yield base
        finally:
            wsgi.shutdown()
            thread.join(timeout=30)
            app.extensions["torchship"].stop()


def wait_for(condition: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition()`` until it returns something truthy (a state change in another
    process: no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met after {timeout} s")
        time.sleep(0.1)
