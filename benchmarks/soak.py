"""Soak: a multi-worker server at saturation for N minutes, every protection on.

Starts ``torchship serve --workers 2`` on a free 127.0.0.1 port with API keys, a rate
limit per key, the response cache (small, so it keeps evicting) and security headers,
then runs ``--clients`` threads that send requests back to back until the time is up:

* ``new``: a random digit tensor (JSON) — a cache miss that evicts an older entry;
* ``repeat``: one of 16 fixed tensors — mostly cache hits;
* ``image``: the sample JPEG as a raw body;
* ``bad``: a broken JSON body — must be a 400.

Every client has its own key; the per-key limit (``--rate``) is below what a client
gets at saturation, and clients do not back off, so the 429 path is soaked as hard as
inference (a refusal costs far less than an answer: expect many). With the memory
backend each worker keeps its own buckets; ``--redis-url`` shares them (and the cache).
The verdict:

* **errors**: connection errors, and any status other than 200/429/503 (400 for ``bad``);
  must be 0;
* **memory**: the resident memory of every server process, measured after a warm-up
  and at the end, must not grow by more than ``--tolerance`` (a fraction; small
  processes get ``--slack-mb`` of absolute slack, allocator noise);
* **shutdown**: SIGTERM at the end must drain and exit 0.

    python benchmarks/soak.py --minutes 10
    python benchmarks/soak.py --seconds 20 --json soak.json   # what the tests run

The exit status is 1 when the verdict fails, so CI can run it as is.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import requests
from _common import console, free_port, machine_summary, percentile, print_table

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.jpg"
KINDS = ("new", "repeat", "new", "repeat", "image", "new", "repeat", "bad")


def _secret(i: int) -> str:
    return f"tsk_soak_client_{i:03d}_" + "0123456789abcdef"


def build_store(root: Path) -> None:
    from torchship.store import ModelStore
    from torchship.zoo import digits

    data = digits.load_digits_split()
    model = digits.train("mlp", epochs=3, data=data).model
    ModelStore(root).save(
        model,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=data.x_test[:32],
    )


def server_processes(pid: int) -> list[Any]:
    """The server and its workers (not multiprocessing's resource tracker)."""
    import psutil

    root = psutil.Process(pid)
    found = [root]
    for child in root.children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def rss(pid: int) -> dict[int, float]:
    import psutil

    out = {}
    for p in server_processes(pid):
        try:
            out[p.pid] = p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


class Load:
    """Client threads sending requests back to back; tallies by kind and outcome."""

    def __init__(self, base: str, clients: int, seed: int = 0) -> None:
        self.base = base
        self.clients = clients
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.status: Counter[tuple[str, str]] = Counter()
        self.cache: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency_ms: list[float] = []
        rng = np.random.default_rng(seed)
        self.fixed = [rng.random((1, 8, 8)).round(4).tolist() for _ in range(16)]
        self.image = SAMPLE.read_bytes()

    def request(
        self, session: requests.Session, kind: str, rng: np.random.Generator
    ) -> requests.Response:
        url = f"{self.base}/predict"
        if kind == "new":
            return session.post(url, json={"inputs": rng.random((1, 8, 8)).tolist()}, timeout=30)
        if kind == "repeat":
            x = self.fixed[int(rng.integers(len(self.fixed)))]
            return session.post(url, json={"inputs": x}, timeout=30)
        if kind == "image":
            return session.post(
                url, data=self.image, headers={"Content-Type": "image/jpeg"}, timeout=30
            )
        return session.post(
            url, data=b'{"inputs": [[', headers={"Content-Type": "application/json"}, timeout=30
        )

    def client(self, i: int) -> None:
        rng = np.random.default_rng(1000 + i)
        session = requests.Session()
        session.headers["X-API-Key"] = _secret(i)
        n = i
        while not self.stop.is_set():
            kind = KINDS[n % len(KINDS)]
            n += 1
            start = time.monotonic()
            try:
                r = self.request(session, kind, rng)
            except requests.RequestException as exc:
                with self.lock:
                    self.errors[f"{kind}: {type(exc).__name__}"] += 1
                continue
            ms = (time.monotonic() - start) * 1000
            expected = {400, 429, 503} if kind == "bad" else {200, 429, 503}
            with self.lock:
                self.status[(kind, str(r.status_code))] += 1
                if r.status_code == 200:
                    self.latency_ms.append(ms)
                if "X-Cache" in r.headers:
                    self.cache[r.headers["X-Cache"]] += 1
                if r.status_code not in expected:
                    self.errors[f"{kind}: HTTP {r.status_code} {r.text[:80]}"] += 1

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self.client, args=(i,), daemon=True)
            for i in range(self.clients)
        ]
        for t in threads:
            t.start()
        return threads

    def total(self) -> int:
        with self.lock:
            return sum(self.status.values()) + sum(self.errors.values())


def run(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.seconds if args.seconds else args.minutes * 60
    warmup = min(max(8.0, duration * 0.25), 60.0)
    tmp = Path(tempfile.mkdtemp(prefix="torchship-soak-"))
    store = Path(args.store) if args.store else tmp / "models"
    if not args.store:
        build_store(store)
    port = free_port()
    env = {
        **os.environ,
        "TORCHSHIP_API_KEYS": ",".join(
            f"client{i}:inference:{_secret(i)}" for i in range(args.clients)
        ),
        "TORCHSHIP_ACCESS_LOG": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "torchship",
        "serve",
        "--store",
        str(store),
        "--model",
        "digits",
        "--framework",
        args.framework,
        "--workers",
        str(args.workers),
        "--port",
        str(port),
        "--runtime",
        "eager",
        "--max-batch-size",
        "8",
        "--rate-limit",
        args.rate,
        "--cache",
        "--cache-max-entries",
        "256",
    ]
    if args.redis_url:
        cmd += ["--rate-limit-backend", "redis", "--cache-backend", "redis"]
        cmd += ["--redis-url", args.redis_url]
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"duration_s": duration, "warmup_s": warmup}
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{base}/health/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready in 120 s")
            time.sleep(0.1)
        console.print(
            f"server ready on {base} ({args.workers} workers, {args.framework}); "
            f"{args.clients} clients for {duration:g} s, memory measured after {warmup:g} s"
        )
        load = Load(base, args.clients)
        threads = load.start()
        began = time.monotonic()
        time.sleep(warmup)  # the load warms allocators and caches before the baseline
        before = rss(proc.pid)
        count_at_start = load.total()
        samples = [(round(time.monotonic() - began, 1), before)]
        step = max(1.0, (duration - warmup) / 10)
        while (left := duration - (time.monotonic() - began)) > 0:
            time.sleep(min(step, left))
            samples.append((round(time.monotonic() - began, 1), rss(proc.pid)))
        after = samples[-1][1]
        load.stop.set()
        for t in threads:
            t.join(timeout=60)
        elapsed = time.monotonic() - began
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    by_status: Counter[str] = Counter()
    for (_, status), n in load.status.items():
        by_status[status] += n
    memory = []
    for pid, start_mb in before.items():
        end_mb = after.get(pid)
        if end_mb is None:
            memory.append({"pid": pid, "start_mb": start_mb, "end_mb": None, "flat": False})
            continue
        growth = end_mb - start_mb
        allowed = max(args.tolerance * start_mb, args.slack_mb)
        memory.append(
            {
                "pid": pid,
                "role": "parent" if pid == proc.pid else "worker",
                "start_mb": round(start_mb, 1),
                "end_mb": round(end_mb, 1),
                "growth_pct": round(100 * growth / start_mb, 2),
                "flat": growth <= allowed,
            }
        )
    errors = sum(load.errors.values())
    result |= {
        "requests": load.total(),
        "requests_measured": load.total() - count_at_start,
        "requests_per_s": round(load.total() / elapsed, 1),
        "by_status": dict(by_status),
        "by_kind": {f"{k} {s}": n for (k, s), n in sorted(load.status.items())},
        "cache": dict(load.cache),
        "errors": errors,
        "error_kinds": dict(load.errors.most_common(10)),
        "p50_ms": round(percentile(load.latency_ms, 50), 2),
        "p99_ms": round(percentile(load.latency_ms, 99), 2),
        "memory": memory,
        "memory_flat": all(m["flat"] for m in memory),
        "rss_samples": [
            {"t": t, "mb": {str(pid): round(mb, 1) for pid, mb in values.items()}}
            for t, values in samples
        ],
        "exit_code": exit_code,
        "tolerance": args.tolerance,
        "slack_mb": args.slack_mb,
    }
    result["passed"] = errors == 0 and result["memory_flat"] and exit_code == 0
    return result


def report(result: dict[str, Any]) -> None:
    print_table(
        f"Soak: {result['duration_s']:g} s at saturation — {machine_summary()}",
        ["requests", "req/s", "200", "429", "503", "400 (bad input)", "errors", "p50 / p99 ms"],
        [
            [
                str(result["requests"]),
                str(result["requests_per_s"]),
                str(result["by_status"].get("200", 0)),
                str(result["by_status"].get("429", 0)),
                str(result["by_status"].get("503", 0)),
                str(result["by_status"].get("400", 0)),
                str(result["errors"]),
                f"{result['p50_ms']} / {result['p99_ms']}",
            ]
        ],
        caption=f"cache answers: {result['cache']}; errors: {result['error_kinds'] or 'none'}",
    )
    print_table(
        "Resident memory per server process (after warm-up -> end)",
        ["process", "pid", "start MiB", "end MiB", "growth", "flat"],
        [
            [
                str(m.get("role", "?")),
                str(m["pid"]),
                str(m["start_mb"]),
                str(m["end_mb"]),
                f"{m.get('growth_pct', float('nan')):+.2f}%",
                "yes" if m["flat"] else "NO",
            ]
            for m in result["memory"]
        ],
        caption=f"flat = growth within {result['tolerance']:.0%} or {result['slack_mb']:g} MiB",
    )
    verdict = "[green]PASSED" if result["passed"] else "[red]FAILED"
    console.print(
        f"{verdict}[/]: errors {result['errors']}, memory flat {result['memory_flat']}, "
        f"SIGTERM exit {result['exit_code']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=5.0)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--framework", choices=["fastapi", "flask"], default="fastapi")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--rate", default="20:20", help="per-key limit RATE[:BURST] (default 20:20)"
    )
    parser.add_argument("--tolerance", type=float, default=0.10, help="RSS growth, fraction")
    parser.add_argument("--slack-mb", type=float, default=8.0, help="absolute RSS slack")
    parser.add_argument("--redis-url", help="share limits and cache through this Redis")
    parser.add_argument("--store", help="a model store holding 'digits' (default: train one)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = run(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
