"""Start, wait for, inspect and stop a real TorchServe (``torchship torchserve ...``).

TorchServe is a Java front end that starts one Python worker process per model worker.
``/ping`` says Healthy as soon as the front end listens, before any worker has loaded
its model, so readiness here means: every model's default version reports at least
one worker ``READY`` through the management API.

Each instance lives in one folder (default ``.torchship/torchserve``): its
``config.properties``, ``key_file.json`` (TorchServe writes the API tokens to its
working folder), ``logs/``, ``tmp/`` (TorchServe's temp files, worker sockets and pid
file) and ``torchserve.json`` (what ``stop`` and ``status`` read). TorchServe runs in a
process group of its own (``torchserve --foreground`` -> java -> Python workers), so
``stop`` reaches every process it started: SIGTERM (TorchServe shuts its workers
down), then SIGKILL for whatever is left after the timeout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import requests

from torchship.errors import MissingDependencyError, ServiceUnavailableError, TorchshipError
from torchship.store._atomic import write_json_atomic
from torchship.torchserve.config import TorchServeConfig

DEFAULT_HOME = Path(".torchship") / "torchserve"
STATE_FILE = "torchserve.json"
KEY_FILE = "key_file.json"
LOG_FILE = "torchserve.out"
POLL_S = 0.2


class TorchServeError(TorchshipError):
    status_code = 503
    code = "torchserve_error"


def java_available() -> str | None:
    """The java executable TorchServe would use, or None."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and Path(java_home, "bin", "java").is_file():
        return str(Path(java_home, "bin", "java"))
    return shutil.which("java")


def why_no_torchserve() -> str | None:
    """Why real TorchServe cannot run here (its package or Java is missing), or None."""
    try:
        torchserve_executable()
    except MissingDependencyError as exc:
        return f"{exc.message} ({exc.hint})"
    if importlib.util.find_spec("ts") is None:
        return "the torchserve command has no 'ts' package (pip install 'torchship[torchserve]')"
    if java_available() is None:
        return "Java is not installed (apt-get install openjdk-17-jre-headless)"
    return None


def torchserve_executable() -> str:
    beside = Path(sys.executable).with_name("torchserve")
    found = str(beside) if beside.is_file() else shutil.which("torchserve")
    if found is None:
        raise MissingDependencyError("torchserve", "torchserve", "Running TorchServe")
    return found


class TorchServe:
    """One TorchServe instance; a context manager that stops it on exit."""

    def __init__(self, config: TorchServeConfig, *, pid: int | None = None) -> None:
        self.config = config
        self.pid = pid
        self._proc: subprocess.Popen[bytes] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    @classmethod
    def from_home(cls, home: str | Path = DEFAULT_HOME) -> TorchServe:
        """The instance a ``start`` left in ``home`` (``TorchServeError`` if none)."""
        state = Path(home) / STATE_FILE
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            raise TorchServeError(
                f"No TorchServe was started from {home}.",
                hint="Start one: torchship torchserve start --model-store DIR --models ...",
            ) from None
        cfg = data["config"]
        cfg["home"], cfg["model_store"] = Path(cfg["home"]), Path(cfg["model_store"])
        return cls(TorchServeConfig(**cfg), pid=int(data["pid"]))

    def start(self, timeout_s: float = 120.0) -> TorchServe:
        """Write the config, start TorchServe and wait until every model is ready."""
        if java_available() is None:
            raise TorchServeError(
                "TorchServe's front end is a Java program, and no Java was found.",
                hint="Install Java 17 (apt-get install openjdk-17-jre-headless) or set JAVA_HOME.",
            )
        executable = torchserve_executable()
        cfg = self.config
        home = cfg.home.resolve()
        if (home / STATE_FILE).exists():
            with contextlib.suppress(TorchServeError):
                if TorchServe.from_home(home).running():
                    raise TorchServeError(
                        f"A TorchServe started from {home} is still running.",
                        hint=f"Stop it first: torchship torchserve stop --home {cfg.home}",
                    )
        (home / KEY_FILE).unlink(missing_ok=True)
        cmd, env = self.launch_command(executable)
        with (home / "logs" / LOG_FILE).open("ab") as out:
            self._proc = subprocess.Popen(
                cmd, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = self._proc.pid
        write_json_atomic(
            home / STATE_FILE,
            {"pid": self.pid, "command": cmd, "config": _jsonable(asdict(cfg))},
        )
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def launch_command(self, executable: str | None = None) -> tuple[list[str], dict[str, str]]:
        """Write the config and its folders; the ``torchserve`` command line and the
        environment that runs this instance in the foreground (for callers that manage
        the process themselves, e.g. benchmarks)."""
        cfg = self.config
        home = cfg.home.resolve()
        for sub in ("logs", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        cfg.write()
        env = {
            **os.environ,
            "LOG_LOCATION": str(home / "logs"),
            "METRICS_LOCATION": str(home / "logs"),
            "TEMP": str(home / "tmp"),  # java.io.tmpdir: unpacked models, worker sockets
            "TMPDIR": str(home / "tmp"),  # and the launcher's pid file
        }
        cmd = [
            executable or torchserve_executable(),
            "--start",
            "--foreground",
            "--ncs",  # no config snapshots: this folder's config is the truth
            "--ts-config",
            str(cfg.path.resolve()),
            "--model-store",
            str(cfg.model_store.resolve()),
        ]
        return cmd, env

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Block until every model has a READY worker; returns the seconds it took."""
        start = time.monotonic()
        waiting_for = "the front end"
        while time.monotonic() - start < timeout_s:
            if not self.running():
                raise TorchServeError(
                    f"TorchServe exited while starting.\n{self.log_tail()}",
                    hint=f"Its logs are in {self.config.home / 'logs'}.",
                )
            try:
                if self.ping() == "Healthy":
                    pending = [n for n in self.config.models if not self.model_ready(n)]
                    if not pending:
                        return time.monotonic() - start
                    waiting_for = f"workers of {', '.join(pending)}"
            except (requests.RequestException, TorchServeError, ValueError):
                pass
            time.sleep(POLL_S)
        raise TorchServeError(
            f"TorchServe was not ready after {timeout_s:g} s (waiting for {waiting_for}).\n"
            f"{self.log_tail()}",
            hint=f"Its logs are in {self.config.home / 'logs'}.",
        )

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop every process of this TorchServe; True if they ended on SIGTERM."""
        graceful = True
        if self.pid is not None and self.running():
            # Not the launcher itself: it waits for java and reaps it as java exits, so
            # no zombie JVM is left to the init process.
            for pid in _group_members(self.pid):
                if pid != self.pid:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.running() and time.monotonic() < deadline:
                time.sleep(POLL_S)
            if self.running():
                graceful = False
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                while self.running():
                    time.sleep(POLL_S)
        if self._proc is not None:
            self._proc.wait()
        (self.config.home / STATE_FILE).unlink(missing_ok=True)
        return graceful

    def running(self) -> bool:
        """True while any process of this TorchServe's group is alive."""
        if self.pid is None:
            return False
        if self._proc is not None:
            self._proc.poll()  # reap the launcher if it ended
        return _group_alive(self.pid)

    def __enter__(self) -> TorchServe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the APIs -----------------------------------------------------------------------

    def keys(self) -> dict[str, str]:
        """TorchServe's API tokens ({} when token authorization is off)."""
        if not self.config.token_auth:
            return {}
        try:
            data = json.loads((self.config.home / KEY_FILE).read_text())
        except (OSError, ValueError):
            raise TorchServeError(f"No readable {KEY_FILE} in {self.config.home} yet.") from None
        return {kind: str(entry["key"]) for kind, entry in data.items() if "key" in entry}

    def headers(self, kind: str) -> dict[str, str]:
        key = self.keys().get(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def management(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        timeout: float = 60,
    ) -> requests.Response:
        """A call to the management API, with the management token when auth is on; an
        expired token is refreshed (with the API token) and the call retried once."""
        url = self.config.management_url + path
        r = requests.request(
            method, url, params=params, headers=self.headers("management"), timeout=timeout
        )
        if r.status_code == 400 and "InvalidKeyException" in r.text and self.config.token_auth:
            requests.get(
                self.config.management_url + "/token",
                params={"type": "management"},
                headers=self.headers("API"),
                timeout=timeout,
            )
            r = requests.request(
                method, url, params=params, headers=self.headers("management"), timeout=timeout
            )
        return r

    def predict(
        self, name: str, data: bytes, content_type: str, version: str | None = None
    ) -> requests.Response:
        path = f"/predictions/{name}" + (f"/{version}" if version else "")
        headers = {"Content-Type": content_type, **self.headers("inference")}
        return requests.post(
            self.config.inference_url + path, data=data, headers=headers, timeout=60
        )

    def ping(self) -> str:
        r = requests.get(
            self.config.inference_url + "/ping", headers=self.headers("inference"), timeout=5
        )
        return str(r.json().get("status", "")) if r.ok else f"HTTP {r.status_code}"

    def model_ready(self, name: str) -> bool:
        r = self.management("GET", f"/models/{name}", timeout=5)
        if not r.ok:
            return False
        return any(w.get("status") == "READY" for v in r.json() for w in v.get("workers", []))

    def status(self) -> dict[str, Any]:
        """Running?, addresses, ``/ping`` and every model's versions and workers."""
        cfg = self.config
        info: dict[str, Any] = {
            "running": self.running(),
            "pid": self.pid,
            "home": str(cfg.home),
            "inference": cfg.inference_url,
            "management": cfg.management_url,
            "metrics": cfg.metrics_url,
            "token_auth": cfg.token_auth,
            "model_api": cfg.model_api,
            "models": [],
        }
        if not info["running"]:
            return info
        try:
            info["ping"] = self.ping()
            listed = self.management("GET", "/models", timeout=10).json().get("models", [])
            for entry in listed:
                described = self.management("GET", f"/models/{entry['modelName']}/all").json()
                info["models"] += described if isinstance(described, list) else []
        except (requests.RequestException, ValueError, TorchServeError) as exc:
            raise ServiceUnavailableError(f"TorchServe does not answer: {exc}") from exc
        return info

    def log_tail(self, lines: int = 25) -> str:
        text = []
        for name in (LOG_FILE, "ts_log.log"):
            with contextlib.suppress(OSError):
                text += (self.config.home / "logs" / name).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@contextlib.contextmanager
def running_torchserve(config: TorchServeConfig, timeout_s: float = 120.0) -> Iterator[TorchServe]:
    """``with running_torchserve(cfg) as ts:`` -- started, ready, always stopped."""
    ts = TorchServe(config)
    try:
        yield ts.start(timeout_s)
    finally:
        ts.stop()


def _group_alive(pgid: int) -> bool:
    """Any non-zombie process in process group ``pgid``."""
    if not Path("/proc").is_dir():  # not Linux: ask the kernel about the group
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return bool(_group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    """The live (non-zombie) processes of group ``pgid``, from /proc (Linux)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
