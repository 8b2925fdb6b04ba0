"""Run a server process tree: uvicorn (FastAPI) or gunicorn (Flask), N workers.

Each worker process loads its own copy of the models and gets ``cores / workers``
intra-op threads, so processes never fight over the cores (on 2 cores, oversubscribed
workers were measured 30x slower). SIGTERM drains: stop accepting, finish in-flight
requests, exit 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from torchship.errors import ConfigError
from torchship.monitoring.logs import configure_logging
from torchship.serving.metrics import (
    MULTIPROC_ENV,
    mark_worker_dead,
    multiprocess_dir,
    prepare_multiprocess_dir,
)
from torchship.serving.one_write import OneWriteHttpProtocol
from torchship.serving.preflight import preflight
from torchship.serving.settings import ServeSettings

log = logging.getLogger("torchship.serving")


def settings_to_env(settings: ServeSettings) -> dict[str, str]:
    """``TORCHSHIP_*`` variables that rebuild ``settings`` in a worker process."""
    env = {}
    for key, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        env[f"TORCHSHIP_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    env["TORCHSHIP_THREADS"] = str(settings.threads_per_worker())
    return env


def serve(settings: ServeSettings) -> None:
    workers = settings.worker_count()
    configure_logging(settings.log_format, access_log=settings.access_log)
    preflight(settings)  # a missing model or a taken port: one error now, not a
    check_ports(settings)  # server that never gets ready
    log.warning(
        "torchship serving %s with %s on http://%s:%d (%d worker%s, %d thread%s each)",
        ", ".join(settings.models),
        settings.framework,
        settings.host,
        settings.port,
        workers,
        "s" if workers > 1 else "",
        settings.threads_per_worker(),
        "s" if settings.threads_per_worker() > 1 else "",
    )
    with metrics_dir(workers):
        if settings.framework == "fastapi":
            _serve_uvicorn(settings, workers)
        else:
            from torchship.serving.flask_app import serve_gunicorn

            serve_gunicorn(settings, workers)


def check_ports(settings: ServeSettings) -> None:
    """Fail now, with a hint, if the port (or management port) is taken."""
    for port in (settings.port, settings.management_port):
        if not port:
            continue
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((settings.host, port))
            except OSError as exc:
                raise ConfigError(
                    f"Cannot listen on {settings.host}:{port}: {exc.strerror}.",
                    hint="Stop what listens there, or choose another --port (--management-port).",
                ) from exc


@contextlib.contextmanager
def metrics_dir(workers: int) -> Iterator[Path | None]:
    """Where worker processes share their Prometheus metrics, so a scrape of any worker
    counts them all: a fresh temporary folder per multi-worker server, removed when it
    exits. A folder set in ``PROMETHEUS_MULTIPROC_DIR`` is used (emptied first) and kept."""
    given = multiprocess_dir()
    if given is None and workers <= 1:
        yield None  # one process: its own registry
        return
    path = given or Path(tempfile.mkdtemp(prefix="torchship-metrics-"))
    prepare_multiprocess_dir(path)
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if given is None:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(path, ignore_errors=True)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal after its graceful shutdown, so the exit
            # status would be -15 (or a KeyboardInterrupt); a drained shutdown is a
            # success: exit 0.
            self._captured_signals.clear()


def _uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "timeout_graceful_shutdown": int(settings.graceful_timeout_s),
        "access_log": False,  # torchship writes its own access lines
        # X-Forwarded-For is trusted only from trusted_proxies, by torchship's gate;
        # uvicorn's own rewrite trusts 127.0.0.1 and parses addresses on every request.
        "proxy_headers": False,
        "http": OneWriteHttpProtocol,
        "ws": "none",  # no websocket routes: skip importing a websocket stack at start-up
        "log_config": None,  # uvicorn's lines go through torchship's (JSON or text) handler
    }


def _sockets(config: uvicorn.Config, settings: ServeSettings) -> list[socket.socket]:
    """The main listening socket, plus the management port's when one is set.

    uvicorn's ``bind_socket`` makes the listener with ``proto=0``, so asyncio does not
    set TCP_NODELAY on accepted connections and every keep-alive answer waits ~40 ms
    for the client's delayed ACK. Set it on the listener; Linux copies it to accepted
    sockets.
    """
    configs = [config]
    if settings.management_port:
        # the same options (uvicorn.Config applies its own logging setup unless told not
        # to: that put uvicorn's default format back on every line)
        options = {**_uvicorn_options(settings), "port": settings.management_port}
        configs.append(uvicorn.Config(config.app, **options))
    sockets = [c.bind_socket() for c in configs]
    for sock in sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sockets


def run_fastapi(app: Any, settings: ServeSettings) -> None:
    """Serve one FastAPI app in this process until SIGINT/SIGTERM, then drain and return."""
    config = uvicorn.Config(app, **_uvicorn_options(settings))
    _Server(config).run(sockets=_sockets(config, settings))


def _serve_uvicorn(settings: ServeSettings, workers: int) -> None:
    if workers == 1:
        from torchship.serving.fastapi_app import create_app

        run_fastapi(create_app(settings), settings)
        return
    os.environ.update(settings_to_env(settings))
    config = uvicorn.Config(
        "torchship.serving.uvicorn_worker:app_from_env",
        factory=True,
        workers=workers,
        **_uvicorn_options(settings),
    )
    _Supervisor(config, sockets=_sockets(config, settings)).run()


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor, telling the metrics when a worker is gone (a crash
    replaced, or a SIGHUP restart) so its live gauges stop counting."""

    def _reaping(self, step: Any) -> None:
        before = {p.pid for p in self.processes}
        step()
        for pid in before - {p.pid for p in self.processes}:
            if pid is not None:
                mark_worker_dead(pid)

    def keep_subprocess_alive(self) -> None:
        self._reaping(super().keep_subprocess_alive)

    def restart_all(self) -> None:
        self._reaping(super().restart_all)
