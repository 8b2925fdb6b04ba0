"""Helpers for the deployment tests: a quick digits store, torchship servers as replicas."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from serving_utils import ROOT, free_port, wait_ready

from torchship.demo import train_demo
from torchship.store import ModelStore
from torchship.zoo import digits


def quick_digits_store(root: Path) -> ModelStore:
    """A store with digits:1, an MLP trained for two epochs (~2 s, well above chance)."""
    store = ModelStore(root)
    train_demo(store, "digits", arch="mlp", epochs=2, export=False)
    return store


def held_out_inputs(n: int = 8) -> torch.Tensor:
    """``n`` held-out digits as the model takes them, (n, 1, 8, 8)."""
    return digits.load_digits_split().x_test[:n]


def local_labels(store: ModelStore, x: torch.Tensor, ref: str = "digits:1") -> list[str]:
    """What the stored model answers for ``x`` in this process: the reference for servers."""
    model = store.load(ref, device="cpu")
    with torch.no_grad():
        return [digits.LABELS[int(i)] for i in model(x).argmax(-1)]


@contextlib.contextmanager
def replicas(
    store: Path, count: int, logs: Path, *args: str
) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """``count`` ``torchship serve`` processes on free loopback ports, started together,
    logging to ``logs/replica-N.log`` (a pipe nobody reads would fill up and stall them);
    each gets SIGTERM (then SIGKILL) on exit unless it already ended."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for i in range(count):
            port = free_port()
            cmd = [sys.executable, "-m", "torchship", "serve", "--store", str(store)]
            cmd += ["--port", str(port), "--threads", "1", *args]
            with (logs / f"replica-{i}.log").open("wb") as log:
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
                )
            procs.append((f"127.0.0.1:{port}", proc))
        for addr, proc in procs:
            wait_ready(f"http://{addr}", proc, timeout=90)
        yield procs
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
