"""Helpers for the serving tests: free ports, server subprocesses, bad payloads."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    base: str,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = 60.0,
    log: Path | None = None,
) -> float:
    """Poll /health/ready until 200; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            if log is not None:
                out = log.read_text(errors="replace")[-5000:]
            else:
                out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
        try:
            if requests.get(f"{base}/health/ready", timeout=1).status_code == 200:
                return time.monotonic() - start
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base} not ready after {timeout} s")


@contextlib.contextmanager
def run_server(
    store: Path,
    *args: str,
    framework: str = "fastapi",
    log: Path | None = None,
    ready_timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``torchship serve`` in a subprocess on a free loopback port; SIGTERM on exit.

    Its output goes to ``log`` (a temp file by default), never to a pipe: under load the
    access log would fill an unread pipe and block the server. Printed on failure.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "torchship", "serve", "--store", str(store)]
    cmd += ["--port", str(port), "--framework", framework, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"} if env is None else env
    if log is None:
        fd, name = tempfile.mkstemp(prefix="torchship-serve-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, timeout=ready_timeout, log=log)
        yield base, proc
    except BaseException:
        print(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's first step)."""
    raw = png_bytes(Image.new("L", (8, 8), 255))
    ihdr_at = raw.index(b"IHDR")
    body = bytearray(raw[ihdr_at : ihdr_at + 4 + 13])
    body[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)
    return raw[:ihdr_at] + bytes(body) + crc + raw[ihdr_at + 4 + 13 + 4 :]


def run_lesson(
    script: str, *, timeout: float = 180, env: dict[str, str] | None = None
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Run a lesson to completion; it must exit 0. Returns its stdout with whitespace
    runs collapsed (rich wraps long lines), and the finished process."""
    proc = subprocess.run(
        [sys.executable, script], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return " ".join(proc.stdout.split()), proc
