"""``torchship serve --workers 2``: /metrics counts every worker's requests whichever
worker answers the scrape (prometheus_client multiprocess mode), a killed worker's live
gauges go and its counts stay; logs are JSON lines with request ids."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from monitoring_utils import BOOM, save_digits, scrape, wait_for, write_buggy_handler
from prometheus_client import CollectorRegistry, multiprocess
from serving_utils import SAMPLE, run_server

from torchship.monitoring.scrape import Scrape

FRAMEWORKS = ["fastapi", "flask"]
N_REQUESTS = 48


@pytest.fixture(scope="module")
def mp_store(tmp_path_factory: pytest.TempPathFactory, quick_mlp: torch.nn.Module) -> Path:
    return save_digits(tmp_path_factory.mktemp("mp") / "models", quick_mlp)


class Server:
    def __init__(self, base: str, proc: subprocess.Popen[bytes], folder: Path) -> None:
        self.base, self.proc, self.folder = base, proc, folder
        self.log = folder / "server.log"

    def metrics_dir(self) -> Path:
        """The server's multiprocess folder: a fresh temporary one (under TMPDIR)."""
        (path,) = self.folder.glob("torchship-metrics-*")
        return path

    def lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=FRAMEWORKS)
def server(
    request: pytest.FixtureRequest, mp_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp(f"server-{request.param}")
    log = folder / "server.log"
    args = [
        "--workers", "2", "--runtime", "eager", "--max-batch-size", "8",
        "--handler", f"digits={write_buggy_handler(folder)}",
        "--log-format", "json",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(folder)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with run_server(
        mp_store, *args, framework=request.param, log=log, ready_timeout=90, env=env
    ) as (base, proc):
        # each worker counts itself before loading its model, and is ready after
        wait_for(
            lambda: (
                (m := scrape(base)).value("torchship_workers") == 2
                and m.value("torchship_ready") == 1
            ),
            timeout=90,
            what="both workers ready",
        )
        yield Server(base, proc, folder)
    assert proc.returncode == 0, log.read_text()[-3000:]
    # the per-server metrics folder was created under TMPDIR and removed on exit
    assert not list(folder.glob("torchship-metrics-*")), "metrics folder left behind"


def _predict(base: str) -> int:
    with SAMPLE.open("rb") as fh:
        r = requests.post(
            f"{base}/predict", files={"file": fh}, headers={"Connection": "close"}, timeout=30
        )
    return r.status_code


def _worker_pids(m: Scrape) -> set[str]:
    return {lab["pid"] for lab in m.labelsets("process_resident_memory_bytes")}


def _served_by(folder: Path, pid: str) -> float:
    """/predict requests counted by one worker alone (its own counter file)."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(folder / f"counter_{pid}.db", tmp)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, tmp)
        return sum(
            s.value
            for f in registry.collect()
            for s in f.samples
            if s.name == "torchship_requests_total" and s.labels["endpoint"] == "/predict"
        )


def test_every_scrape_counts_every_workers_requests(server: Server) -> None:
    before = scrape(server.base).value("torchship_requests_total", endpoint="/predict")
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: _predict(server.base), range(N_REQUESTS)))
    assert codes == [200] * N_REQUESTS
    scrapes = [scrape(server.base) for _ in range(6)]  # whichever worker answers each
    for m in scrapes:
        assert m.value("torchship_requests_total", endpoint="/predict") - before == N_REQUESTS
        assert m.value("torchship_request_latency_seconds_count", endpoint="/predict") >= N_REQUESTS
        assert m.value("torchship_workers") == 2
        assert m.value("torchship_in_flight_requests") == 1  # the scrape itself, all workers
        assert m.value("torchship_model_ready", model="digits", version="1") == 1
    pids = _worker_pids(scrapes[-1])
    assert len(pids) == 2
    # both workers served some of them, and the scrape is their sum
    served = {pid: _served_by(server.metrics_dir(), pid) for pid in pids}
    assert all(n > 0 for n in served.values()), served
    assert sum(served.values()) == scrapes[-1].value(
        "torchship_requests_total", endpoint="/predict"
    )


def test_a_killed_worker_keeps_its_counts_and_leaves_the_live_gauges(server: Server) -> None:
    m = scrape(server.base)
    total = m.value("torchship_requests_total", endpoint="/predict")
    old = _worker_pids(m)
    victim = sorted(old)[0]
    os.kill(int(victim), signal.SIGKILL)

    def replaced() -> Scrape | None:
        now = scrape(server.base)
        pids = _worker_pids(now)
        ok = len(pids) == 2 and victim not in pids and now.value("torchship_ready") == 1
        return now if ok else None

    after = wait_for(replaced, timeout=90, what="the killed worker replaced")
    assert after.value("torchship_workers") == 2  # not 3: the dead one was marked dead
    assert after.value("torchship_in_flight_requests") == 1
    # what the dead worker served still counts (+ the scrapes in between are other routes)
    assert after.value("torchship_requests_total", endpoint="/predict") == total
    assert _predict(server.base) == 200
    assert scrape(server.base).value("torchship_requests_total", endpoint="/predict") == total + 1


def test_logs_are_json_lines_with_request_ids(server: Server) -> None:
    r = requests.post(
        f"{server.base}/predict",
        data=BOOM,
        headers={"Content-Type": "image/png", "X-Request-ID": "mp-boom-1"},
        timeout=30,
    )
    assert r.status_code == 500 and r.headers["X-Request-ID"] == "mp-boom-1"
    assert "secret" not in r.text
    ok = requests.post(
        f"{server.base}/predict",
        json={"inputs": [[[0.0] * 8] * 8]},
        headers={"X-Request-ID": "mp-ok-1"},
        timeout=30,
    )
    assert ok.status_code == 200 and ok.headers["X-Request-ID"] == "mp-ok-1"

    def mine() -> list[dict[str, object]] | None:
        found = [
            line
            for line in map(json.loads, server.lines())
            if line.get("request_id") in ("mp-boom-1", "mp-ok-1")
        ]
        return found if len(found) >= 3 else None

    lines = wait_for(mine, what="the requests' log lines")
    for line in server.lines():  # every line of the server, its workers and gunicorn
        json.loads(line)
    access_ok = [
        x for x in lines if x["request_id"] == "mp-ok-1" and x["logger"] == "torchship.access"
    ]
    assert len(access_ok) == 1
    (a,) = access_ok
    assert (a["status"], a["model"], a["version"], a["endpoint"]) == (
        200,
        "digits",
        "1",
        "/predict",
    )
    assert a["latency_ms"] > 0
    boom = [x for x in lines if x["request_id"] == "mp-boom-1"]
    tracebacks = [x for x in boom if "traceback" in x]
    assert len(tracebacks) == 1  # logged once, with its traceback
    assert "secret-internal-detail" in tracebacks[0]["traceback"]
    assert [x["status"] for x in boom if x["logger"] == "torchship.access"] == [500]
    assert "Exception in ASGI application" not in server.log.read_text()
