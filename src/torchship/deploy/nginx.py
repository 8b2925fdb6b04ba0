"""Run the compose topology's nginx load balancer on loopback, as an ordinary process.

``deploy/nginx/torchship.conf`` is what ``deploy/compose.yaml`` mounts into the nginx
container. :func:`render_site` turns it into the same configuration for replicas on this
machine by changing exactly two things, the ``listen`` address and the upstream's
``server`` lines (one per replica, each with the file's own parameters);
:class:`LocalNginx` wraps it in a top-level config whose pid, logs and temp files live in
one folder, and runs nginx in the foreground until stopped.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from torchship.deploy._tools import ToolFailedError, require, run
from torchship.errors import ConfigError

SITE = Path("deploy/nginx/torchship.conf")
_UPSTREAM = re.compile(r"(upstream\s+torchship\s*\{)(.*?)(\})", re.S)
_SERVER = re.compile(r"^([ \t]*)server[ \t]+(\S+)((?:[ \t]+[^;\s]+)*)[ \t]*;", re.M)
_LISTEN = re.compile(r"^([ \t]*)listen[ \t]+[^;]+;", re.M)


def render_site(site: str, backends: Sequence[str], listen: str) -> str:
    """``site`` with ``listen`` as its listen address and ``backends`` ("host:port") as the
    upstream's servers, each with the parameters of the file's own server line."""
    if not backends:
        raise ConfigError("A load balancer needs at least one backend.")
    upstream = _UPSTREAM.search(site)
    if upstream is None:
        raise ConfigError("The nginx site has no 'upstream torchship { ... }' block.")
    servers = list(_SERVER.finditer(upstream.group(2)))
    if len(servers) != 1:
        raise ConfigError(f"Expected one server line in the upstream block, found {len(servers)}.")
    indent, params = servers[0].group(1), servers[0].group(3)
    lines = "\n".join(f"{indent}server {b}{params};" for b in backends)
    body = _SERVER.sub(lambda _: lines, upstream.group(2))
    out = site[: upstream.start(2)] + body + site[upstream.end(2) :]
    out, listens = _LISTEN.subn(lambda m: f"{m.group(1)}listen {listen};", out)
    if listens != 1:
        raise ConfigError(f"Expected one listen directive, found {listens}.")
    return out


def main_config(workdir: Path, site: Path) -> str:
    """A top-level nginx.conf that keeps everything nginx writes inside ``workdir``."""
    user = ""
    if os.geteuid() == 0:  # workers drop to nobody; the temp folders must be theirs to write
        nobody = pwd.getpwnam("nobody")
        user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};\n"
    temp = {
        name: workdir / "tmp" / name
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    }
    return f"""{user}worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir / "access.log"};
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {site};
}}
"""


class LocalNginx:
    """nginx on ``127.0.0.1:port`` in front of ``backends``, configured from ``site_file``.

    Use as a context manager: it starts nginx, waits until it accepts connections, and
    stops it (SIGQUIT: graceful) on exit.
    """

    def __init__(
        self,
        site_file: Path,
        backends: Sequence[str],
        port: int,
        workdir: Path,
        host: str = "127.0.0.1",
    ) -> None:
        self.site_file = site_file
        self.backends = list(backends)
        self.host = host
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            path = self.workdir / "tmp" / name
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)
        site = render_site(self.site_file.read_text(), self.backends, f"{self.host}:{self.port}")
        (self.workdir / "torchship.conf").write_text(site)
        conf = self.workdir / "nginx.conf"
        conf.write_text(main_config(self.workdir, self.workdir / "torchship.conf"))
        return conf

    def start(self, timeout: float = 10.0) -> LocalNginx:
        nginx = require("nginx")
        conf = self.write_config()
        prefix = ["-p", str(self.workdir), "-c", str(conf)]
        run([nginx, "-t", "-q", *prefix], what="nginx -t")
        self.proc = subprocess.Popen(
            [nginx, *prefix, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise ToolFailedError(f"nginx exited with {self.proc.returncode}: {err}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise ToolFailedError(f"nginx did not listen on {self.url} within {timeout} s.")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: finish requests in flight
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> LocalNginx:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
