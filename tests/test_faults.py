"""Faults under load, bounded in time: a worker process SIGKILLed mid-load is replaced
and only the requests it held fail; a short soak at saturation stays error-free and
flat in memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import requests
import torch
from serving_utils import ROOT, run_server

from torchship.store import ModelStore
from torchship.zoo import digits

CLIENTS = 6
ONE = {"inputs": [[[0.5] * 8] * 8]}


@pytest.fixture(scope="module")
def fault_store(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Path:
    root = tmp_path_factory.mktemp("faults") / "models"
    ModelStore(root).save(
        quick_mlp,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=digits_data.x_test[:8],
    )
    return root


def workers(pid: int) -> set[int]:
    """Worker processes of a uvicorn supervisor (not multiprocessing's resource tracker)."""
    found = set()
    for child in psutil.Process(pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:
            continue
    return found


def kill_counting_connections(pid: int, port: int) -> int:
    """SIGKILL ``pid``; returns the client connections it held. SIGSTOP first, so that
    the count cannot change between counting and killing."""
    os.kill(pid, signal.SIGSTOP)
    held = sum(
        1
        for c in psutil.Process(pid).net_connections("tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
    )
    os.kill(pid, signal.SIGKILL)
    return held


class Load:
    """CLIENTS threads, one keep-alive session each, posting back to back; every outcome
    is counted in the phase it ended in."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.phase = "before"
        self.stop = threading.Event()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]

    def client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            try:
                r = session.post(f"{self.base}/predict", json=ONE, timeout=30)
                outcome = str(r.status_code)
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            with self.lock:  # counted in the phase it ended in: a kill ends what it held
                self.outcomes[(self.phase, outcome)] += 1

    def count(self, phase: str, outcome: str | None = None) -> int:
        with self.lock:
            return sum(
                n
                for (p, o), n in self.outcomes.items()
                if p == phase and (outcome is None or o == outcome)
            )

    def wait_for(self, phase: str, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.count(phase, "200") < n:
            assert time.monotonic() < deadline, f"{phase}: fewer than {n} answers in {timeout} s"
            time.sleep(0.02)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_only_its_requests_fail(
    fault_store: Path, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with run_server(
        fault_store, "--workers", "2", "--runtime", "eager", log=log, ready_timeout=90
    ) as (
        base,
        proc,
    ):
        original = workers(proc.pid)
        assert len(original) == 2
        load = Load(base)
        for t in load.threads:
            t.start()
        try:
            load.wait_for("before", 50)
            port = int(base.rsplit(":", 1)[1])
            victim = sorted(original)[0]
            load.phase = "killed"
            held = {"killed": kill_counting_connections(victim, port)}
            # the supervisor notices (it checks every 0.5 s) and starts a replacement
            deadline = time.monotonic() + 30
            while True:
                now = workers(proc.pid)
                if len(now) == 2 and victim not in now:
                    break
                assert time.monotonic() < deadline, f"worker not replaced: {now}"
                time.sleep(0.1)
            replacement = (now - original).pop()
            # the replacement loads its model before it accepts; meanwhile the survivor
            # serves. Kill the survivor too: from then on only the replacement can answer.
            load.phase = "survivor killed"
            survivor = (original - {victim}).pop()
            held["survivor killed"] = kill_counting_connections(survivor, port)
            load.wait_for("survivor killed", 20)
            load.phase = "after"
            load.wait_for("after", 100)
        finally:
            load.stop.set()
            for t in load.threads:
                t.join(timeout=30)
        assert psutil.pid_exists(replacement)
        print(dict(load.outcomes), "connections held by the killed workers:", held)
        # No errors before, none after, and for each kill at most the requests that the
        # killed worker held (one per connection it had), never an HTTP error.
        for phase in ("before", "after"):
            assert load.count(phase) == load.count(phase, "200"), load.outcomes
        for phase in ("killed", "survivor killed"):
            failed = load.count(phase) - load.count(phase, "200")
            assert failed <= held[phase] <= CLIENTS, (held, load.outcomes)
            http_errors = [o for (p, o), _ in load.outcomes.items() if p == phase and o.isdigit()]
            assert set(http_errors) <= {"200"}, load.outcomes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.mark.slow
def test_short_soak_at_saturation(fault_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/soak.py",
            "--seconds",
            "20",
            "--store",
            str(fault_store),
            "--tolerance",
            "0.25",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    print(proc.stdout[-3000:])
    result = json.loads(out.read_text())
    assert result["errors"] == 0, result["error_kinds"]
    assert not [s for s in result["by_status"] if s.startswith("5") and s != "503"]
    assert result["by_status"].get("200", 0) > 100 and result["by_status"].get("400", 0) > 0
    assert result["memory_flat"], result["memory"]
    assert result["exit_code"] == 0
    assert proc.returncode == 0, proc.stderr[-2000:]
