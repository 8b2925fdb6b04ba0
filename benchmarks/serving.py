"""HTTP serving: torchship's servers vs the naive FastAPI endpoint, under wrk.

The script builds a temporary model store (the digits CNN from ``train_demo`` and a
ResNet-18 with random weights, both exported to TorchScript and ONNX), then for each
model starts every server as a subprocess on a free 127.0.0.1 port, one after the
other, and measures

* startup: seconds from spawn to the first answer and to the first 200 on /predict;
* RSS of the server's process tree (every worker), after start and at its peak;
* throughput and latency with ``wrk -t2 -c{N} -d{S}s --latency`` at each concurrency,
  the servers taking turns in rotating order so background load hits all alike. The
  Lua scripts in ``benchmarks/wrk/`` post the body and print one JSON summary line.

Workloads: digits with a JSON tensor, digits with a raw PNG body, ResNet-18 with a
224x224 JPEG as a multipart upload. Servers: torchship FastAPI (batching auto, and
batching off), torchship Flask under gunicorn (``--workers auto``, batching auto and
off), and ``benchmarks/naive_fastapi.py``. The in-process ceiling is the best runtime
at the best batch size called directly through ``load_predictor`` (no HTTP, no
decoding); the ResNet-18 target is judged on rounds that run the best torchship row and
that ceiling back to back. LitServe and TorchServe are measured only where installed.

wrk runs on the same machine and takes CPU from the servers; every row pays that alike.

    python benchmarks/serving.py              # about 12 min on 2 cores
    python benchmarks/serving.py --quick      # about 4 min: 3 s per point, 1 and 32 connections
    python benchmarks/serving.py --quick --out results.md
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import io
import json
import logging
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType

import numpy as np
import torch
from _common import (
    console,
    cpu_count,
    free_port,
    interleaved,
    machine_summary,
    markdown_table,
    print_table,
    rss_mb,
    synthetic_photo,
    wait_idle,
)
from PIL import Image

from torchship.demo import train_demo
from torchship.export import export_onnx, export_torchscript
from torchship.preprocessing import preprocess_image
from torchship.runtime import Predictor, RuntimeChoice, load_predictor, set_threads
from torchship.store import ModelStore
from torchship.torchserve.process import why_no_torchserve
from torchship.zoo.resnet import ResNet18, resnet_input_spec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WRK_DIR = HERE / "wrk"
HOST = "127.0.0.1"
MULTIPART_BOUNDARY = "----torchshipbench7MA4YWxkTrZu0gW"  # as in wrk/multipart.lua
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
RUNTIMES: tuple[RuntimeChoice, ...] = ("eager", "torchscript", "onnx")
MODELS = ("digits", "resnet18")

# Targets the table is judged against.
TARGET_SPEEDUP = 2.0  # digits JSON at 32 connections: torchship FastAPI vs naive req/s
TARGET_CONNS = 32
TARGET_CEILING = 0.9  # ResNet-18: best torchship row vs the in-process ceiling
TARGET_CEILING_MODEL = "resnet18"
TARGET_STARTUP_S = 1.5  # torchship FastAPI, digits: spawn to first 200


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    model: str  # store name
    script: str  # in benchmarks/wrk/
    body: Path
    content_type: str


@dataclass(frozen=True)
class ServerKind:
    key: str
    label: str
    serve_args: tuple[str, ...] | None  # ``torchship serve`` flags; None: the naive server
    env: tuple[tuple[str, str], ...] = ()
    torchserve: bool = False  # real TorchServe serving a torchship-built .mar of the model
    litserve: bool = False  # LitServe serving the same weights (benchmarks/litserve_app.py)
    cannot: tuple[str, ...] = ()  # workload keys it has no route for


SERVERS = (
    ServerKind("fastapi", "torchship FastAPI, batch auto", ()),
    ServerKind("fastapi-b1", "torchship FastAPI, batch 1", ("--max-batch-size", "1")),
    ServerKind("fastapi-w", "torchship FastAPI, workers auto, batch auto", ("--workers", "auto")),
    ServerKind(
        "flask",
        "torchship Flask, workers auto, batch auto",
        ("--framework", "flask", "--workers", "auto"),
    ),
    ServerKind(
        "flask-b1",
        "torchship Flask, workers auto, batch 1",
        ("--framework", "flask", "--workers", "auto", "--max-batch-size", "1"),
    ),
    ServerKind("naive", "naive FastAPI", None),
    # Not the target's baseline: the naive server with the one setting that matters most on
    # a small, busy CPU, to show how much of the gap is thread oversubscription alone.
    ServerKind(
        "naive-1t", "naive FastAPI, OMP_NUM_THREADS=1 (extra)", None, (("OMP_NUM_THREADS", "1"),)
    ),
)
# Measured where installed (pip install 'torchship[torchserve]', Java 17): the same model
# as a .mar (TorchScript, torchship's image handler, batch 8 within 5 ms), one worker per
# core, token auth off so wrk can call it.
TORCHSERVE = ServerKind(
    "torchserve", "TorchServe 0.12 (Java), workers = cores, batch 8", None, torchserve=True
)
# Measured where installed (pip install 'torchship[bench]'): LitServe's LitAPI over the
# same state dict in eager PyTorch, one 1-thread inference process per core, batch 8
# within 5 ms. It reads every request as JSON or a form: no raw-body (PNG) route.
LITSERVE = ServerKind(
    "litserve",
    "LitServe (eager), workers = cores, batch 8",
    None,
    litserve=True,
    cannot=("digits-png",),
)


@dataclass
class Server:
    kind: ServerKind
    model: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    listen_s: float = math.nan
    first_ok_s: float = math.nan
    cold_ok_s: float = math.nan
    """First 200 at the very first start, before the start-up measurements were remembered."""
    rss_start_mb: float = math.nan
    rss_peak_mb: float = 0.0
    info: str = ""

    @property
    def path(self) -> str:
        return f"/predictions/{self.model}" if self.kind.torchserve else "/predict"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.path}"

    def sample_rss(self) -> float:
        rss = rss_mb(self.proc.pid)
        self.rss_peak_mb = max(self.rss_peak_mb, rss)
        return rss


@dataclass
class Point:
    server: Server
    workload: Workload
    conns: int
    ok_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_detail: str


@dataclass
class Ceiling:
    """The best in-process configuration, and the paired rounds that judge the target."""

    model: str
    key: RuntimeChoice  # load_predictor's runtime argument
    runtime: str  # its name as the predictor reports it
    batch: int
    threads: int
    callers: int
    items_per_s: float
    rows: list[list[str]] = field(default_factory=list)
    contenders: list[RuntimeChoice] = field(default_factory=list)  # the race's best two
    # (HTTP req/s, items/s of the paired configuration, best items/s of any that round)
    pairs: list[tuple[float, float, float]] = field(default_factory=list)
    paired_with: str = ""
    paired_config: str = ""  # the configuration the pairs judge against

    @property
    def layout(self) -> str:
        return layout_text(self.callers, self.threads)


def layout_text(callers: int, threads: int) -> str:
    return f"{callers} caller{'s' * (callers > 1)} x {threads} thread{'s' * (threads > 1)}"


# --- the model store and request bodies ---------------------------------------------------


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def prepare(
    root: Path, models: Sequence[str], notes: list[str]
) -> tuple[ModelStore, dict[str, Path], list[Workload]]:
    """The model store, the naive server's state dicts and the workloads' bodies."""
    set_threads(cpu_count())
    store = ModelStore(root / "models")
    bodies = root / "bodies"
    bodies.mkdir()
    workloads = []
    if "digits" in models:
        started = time.monotonic()
        manifest = train_demo(store, "digits")
        notes.append(
            f"digits CNN: train_demo (test accuracy {manifest.metrics['test_accuracy']:.3f}) "
            f"with TorchScript + ONNX exports, {time.monotonic() - started:.1f} s"
        )
        digit = store.load_examples("digits")
        assert digit is not None
        body = bodies / "digit.json"
        body.write_text(json.dumps({"inputs": np.round(digit[0].numpy(), 4).tolist()}))
        png = bodies / "digit_7.png"
        shutil.copyfile(ROOT / "data" / "digit_7_0.png", png)
        workloads += [
            Workload(
                "digits-json",
                f"digits CNN, JSON body (1x8x8 floats, {body.stat().st_size} B)",
                "digits",
                "json.lua",
                body,
                "application/json",
            ),
            Workload(
                "digits-png",
                f"digits CNN, raw PNG body (96x96, {png.stat().st_size / 1024:.1f} KiB)",
                "digits",
                "png.lua",
                png,
                "image/png",
            ),
        ]
    if "resnet18" in models:
        started = time.monotonic()
        torch.manual_seed(0)
        spec = resnet_input_spec()
        photos = [synthetic_photo(i, (256 + 32 * i, 224 + 16 * i)) for i in range(8)]
        examples = torch.stack(
            [preprocess_image(encode(p, "JPEG", quality=90), spec) for p in photos]
        )
        store.save(
            ResNet18(num_classes=1000).eval(),
            "resnet18",
            input_spec=spec,
            labels=[f"class_{i}" for i in range(1000)],
            examples=examples,
            description="ResNet-18, random weights (serving benchmark)",
        )
        # The default tolerance (1e-4 + 1e-4 * max |logit|) holds: exports differ by ~2e-6.
        export_torchscript(store, "resnet18", method="trace", batch_sizes=(1, 8))
        manifest = export_onnx(store, "resnet18", batch_sizes=(1, 8))
        diffs = ", ".join(
            f"{key} max abs diff {a.verification.max_abs_diff:.1e}"
            for key, a in manifest.artifacts.items()
            if a.verification is not None
        )
        notes.append(
            f"ResNet-18: random weights, 8 synthetic photos as stored examples, exports "
            f"verified at the default tolerance ({diffs}), {time.monotonic() - started:.1f} s"
        )
        jpeg = bodies / "photo_224.jpg"
        jpeg.write_bytes(encode(synthetic_photo(42), "JPEG", quality=90))
        workloads.append(
            Workload(
                "resnet18-jpeg",
                f"ResNet-18, 224x224 JPEG multipart upload ({jpeg.stat().st_size / 1024:.1f} KiB)",
                "resnet18",
                "multipart.lua",
                jpeg,
                "multipart/form-data",
            )
        )
    weights = {}
    for name in models:
        weights[name] = root / f"naive-{name}.pt"
        torch.save(store.load(name, device="cpu").state_dict(), weights[name])
    return store, weights, workloads


def request_for(workload: Workload) -> tuple[bytes, dict[str, str]]:
    """The body and headers the workload's wrk script sends, for the startup probe."""
    data = workload.body.read_bytes()
    if workload.content_type != "multipart/form-data":
        return data, {"Content-Type": workload.content_type}
    body = (
        f'--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{workload.body.name}"\r\nContent-Type: image/jpeg\r\n\r\n'
    ).encode()
    body += data + f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"}


# --- in-process ceiling -----------------------------------------------------------------


def burst(predictor: Predictor, batch: torch.Tensor, callers: int, seconds: float) -> float:
    """Items/s with ``callers`` threads calling ``predictor.predict(batch)`` back to back.

    Every runtime releases the GIL while it computes, so several callers of a 1-thread
    predictor use several cores, as several 1-thread server workers would.
    """
    calls = [0] * callers
    stop_at = time.monotonic() + seconds

    def loop(i: int) -> None:
        while True:
            predictor.predict(batch)
            calls[i] += 1
            if time.monotonic() >= stop_at:
                return

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(calls) * len(batch) / (time.perf_counter() - began)


def measure_ceiling(
    store: ModelStore, model: str, batch_sizes: Sequence[int], seconds: float, rounds: int
) -> Ceiling:
    """The best items/s the model reaches in this process, with no HTTP and no decoding.

    First the runtimes race at batch 8 on all cores (as ``runtime="auto"`` does, with a
    longer budget); then the winner runs at each batch size both as one caller with all
    cores and as one 1-thread caller per core, in rotating rounds. The best median of all
    these is the ceiling.
    """
    cores = cpu_count()
    predictors = {
        rt: load_predictor(store, model, runtime=rt, device="cpu", threads=cores) for rt in RUNTIMES
    }
    race: dict[str, tuple[RuntimeChoice, Callable[[], object]]] = {}
    for rt, predictor in predictors.items():
        batch = predictor.sample_batch(8)
        assert batch is not None
        race[predictor.runtime] = (rt, partial(predictor.predict, batch))
    stats = interleaved(
        {name: call for name, (_, call) in race.items()}, budget_s=seconds, min_rounds=3
    )
    ranked = sorted(stats, key=lambda name: stats[name].p50)
    best_rt = race[ranked[0]][0]
    ceiling = Ceiling(model, best_rt, ranked[0], 8, cores, 1, stats[ranked[0]].items_per_s(8))
    ceiling.contenders = [race[name][0] for name in ranked[:2]]
    for name in ranked:
        ceiling.rows.append(
            [model, name, "8", f"{cores}", "1", f"{stats[name].items_per_s(8):,.0f}"]
        )
    for predictor in predictors.values():
        predictor.close()

    layouts = [(cores, 1), (1, cores)] if cores > 1 else [(1, 1)]
    loaded = {
        threads: load_predictor(store, model, runtime=best_rt, device="cpu", threads=threads)
        for threads, _ in layouts
    }
    configs = [(n, threads, callers) for n in batch_sizes for threads, callers in layouts]
    samples: dict[tuple[int, int, int], list[float]] = {c: [] for c in configs}
    for r in range(rounds):
        shift = r % len(configs)
        for n, threads, callers in configs[shift:] + configs[:shift]:
            set_threads(threads)  # torch's pool is per process; ONNX sessions keep theirs
            batch = loaded[threads].sample_batch(n)
            assert batch is not None
            samples[(n, threads, callers)].append(
                burst(loaded[threads], batch, callers, seconds / 4)
            )
    for predictor in loaded.values():
        predictor.close()
    for (n, threads, callers), values in samples.items():
        items = statistics.median(values)
        ceiling.rows.append(
            [model, ceiling.runtime, str(n), str(threads), str(callers), f"{items:,.0f}"]
        )
        if items > ceiling.items_per_s:
            ceiling.batch, ceiling.threads, ceiling.callers = n, threads, callers
            ceiling.items_per_s = items
    return ceiling


# --- servers ------------------------------------------------------------------------------


def server_command(
    kind: ServerKind, model: str, port: int, store: ModelStore, weights: dict[str, Path]
) -> list[str]:
    if kind.torchserve:
        return torchserve_command(model, port, store)
    if kind.serve_args is None:
        arch = "cnn" if model == "digits" else model
        script = "litserve_app.py" if kind.litserve else "naive_fastapi.py"
        command = [sys.executable, str(HERE / script), "--arch", arch]
        command += ["--weights", str(weights[model]), "--port", str(port)]
        if kind.litserve:
            command += ["--workers", str(cpu_count()), "--threads", "1", "--max-batch-size", "8"]
        return command
    return [
        sys.executable,
        "-m",
        "torchship",
        "serve",
        "--store",
        str(store.root),
        "--model",
        model,
        "--port",
        str(port),
        *kind.serve_args,
    ]


def torchserve_command(model: str, port: int, store: ModelStore) -> list[str]:
    """Archive the model, write TorchServe's config and return its foreground command
    (run through ``env`` for its log and temp folders)."""
    from torchship.archive import ModelConfig, build_archive
    from torchship.torchserve.config import TorchServeConfig
    from torchship.torchserve.process import TorchServe

    home = store.root.parent / f"torchserve-{model}"
    built = build_archive(
        store,
        model,
        handler="image",
        export_path=home / "model_store",
        config=ModelConfig(batch_size=8, max_batch_delay_ms=5),
        overwrite=True,
    )
    cfg = TorchServeConfig(
        home=home,
        model_store=built.path.parent,
        models={model: built.path.name},
        inference_port=port,
        token_auth=False,
        workers_per_model=cpu_count(),
    )
    cmd, env = TorchServe(cfg).launch_command()
    extra = {k: env[k] for k in ("LOG_LOCATION", "METRICS_LOCATION", "TEMP", "TMPDIR")}
    return ["env", *[f"{k}={v}" for k, v in extra.items()], *cmd]


def start_server(cmd: list[str], kind: ServerKind, model: str, port: int, logs: Path) -> Server:
    log = logs / f"{kind.key}-{model}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHSHIP_")}
    env.update(kind.env)
    with log.open("wb") as out:
        # Its own session, so a kill on timeout reaches every worker it forked.
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
    return Server(kind, model, port, proc, log)


def wait_first_prediction(server: Server, workload: Workload, started: float) -> None:
    """Poll /predict until it answers 200; record when it first answered at all."""
    body, headers = request_for(workload)
    deadline = started + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.kind.label} ({server.model}) exited with {server.proc.returncode}:\n"
                + tail(server.log)
            )
        conn = http.client.HTTPConnection(HOST, server.port, timeout=30)
        try:
            conn.request("POST", server.path, body, headers)
            response = conn.getresponse()
            response.read()
            now = time.monotonic()
            if math.isnan(server.listen_s):
                server.listen_s = now - started
            if response.status == 200:
                server.first_ok_s = now - started
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.01)
    raise RuntimeError(
        f"{server.kind.label} ({server.model}) gave no 200 in time:\n{tail(server.log)}"
    )


def describe(server: Server) -> str:
    """Runtime and batch cap a torchship server chose (from GET /models)."""
    if server.kind.torchserve:
        return f"TorchScript .mar, image handler, {cpu_count()} workers, batch 8 / 5 ms"
    if server.kind.litserve:
        return f"eager, {cpu_count()} workers x 1 thread, batch 8 / 5 ms"
    if server.kind.serve_args is None:
        threads = dict(server.kind.env).get("OMP_NUM_THREADS", "torch's default")
        return f"eager, intra-op threads: {threads}"
    conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
    try:
        conn.request("GET", "/models")
        info = json.loads(conn.getresponse().read())["models"][0]
        return f"{info['runtime']}, max batch {info['max_batch_size']}"
    except (OSError, ValueError, KeyError, IndexError):
        return "?"
    finally:
        conn.close()


def stop_servers(servers: Sequence[Server]) -> None:
    """SIGTERM every server (a graceful drain), wait, then SIGKILL whatever is left of
    each one's session; a second Ctrl-C skips the waiting, never the killing."""
    live = [s for s in servers if s.proc.poll() is None]
    for server in live:
        server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    try:
        for server in live:
            try:
                server.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                console.print(f"[yellow]{server.kind.label} ignored SIGTERM; killing it[/]")
    finally:
        for server in servers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server.proc.pid, signal.SIGKILL)  # stragglers of its session only
            server.proc.wait()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    try:
        yield servers
    finally:
        stop_servers(servers)


# --- wrk ----------------------------------------------------------------------------------


def run_wrk(server: Server, workload: Workload, conns: int, seconds: float) -> Point:
    """One wrk run; its Lua script's ``WRK_JSON`` line gives the numbers."""
    threads = min(2, conns)  # wrk needs at least one connection per thread
    seconds = max(1, round(seconds))  # wrk takes whole seconds only
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(WRK_DIR / workload.script),
        server.url,
        "--",
        str(workload.body),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 90, check=False)
    # A server that queued requests answers them after wrk left; the next run (maybe
    # another server's) must not share the CPU with that.
    wait_idle(server.proc.pid)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(
            f"wrk gave no summary (exit {out.returncode}):\n{(out.stdout + out.stderr)[-2000:]}"
        )
    data = json.loads(line.removeprefix("WRK_JSON "))
    duration_s = data["duration_us"] / 1e6
    statuses = {int(k): v for k, v in data["statuses"].items()}
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    bad = {k: v for k, v in statuses.items() if not 200 <= k < 300}
    sockets = {k: v for k, v in data["socket_errors"].items() if v}
    detail = ", ".join(
        [f"{v}x{k}" for k, v in sorted(bad.items())] + [f"{v} {k}" for k, v in sockets.items()]
    )
    if server.proc.poll() is not None:
        detail += f" (server exited {server.proc.returncode})"
    latency = data["latency_us"]
    return Point(
        server,
        workload,
        conns,
        ok / duration_s if duration_s > 0 else math.nan,
        latency["p50"] / 1e3 if ok else math.nan,
        latency["p99"] / 1e3 if ok else math.nan,
        sum(bad.values()) + sum(sockets.values()),
        detail,
    )


# --- the run --------------------------------------------------------------------------------


def bench_model(
    model: str,
    workloads: list[Workload],
    kinds: Sequence[ServerKind],
    args: argparse.Namespace,
    store: ModelStore,
    weights: dict[str, Path],
    logs: Path,
    ceilings: dict[str, Ceiling],
) -> tuple[list[Server], list[Point]]:
    servers: list[Server] = []
    points: list[Point] = []
    with running(servers):
        for kind in kinds:  # one at a time, so each start-up is measured alone
            port = free_port(HOST)
            served = [w for w in workloads if w.key not in kind.cannot]
            if not served:
                continue
            cmd = server_command(kind, model, port, store, weights)
            started = time.monotonic()
            server = start_server(cmd, kind, model, port, logs)
            servers.append(server)
            wait_first_prediction(server, served[0], started)
            if kind.serve_args is not None:
                # The first start on a machine times the runtimes and batch sizes and
                # remembers them (<store>/.tuning); what a restart or a new replica on
                # the same machine costs is measured by starting it again.
                cold = server.first_ok_s
                stop_servers([servers.pop()])
                started = time.monotonic()
                server = start_server(cmd, kind, model, port, logs)
                servers.append(server)
                wait_first_prediction(server, workloads[0], started)
                server.cold_ok_s = cold
            server.rss_start_mb = server.sample_rss()
            server.info = describe(server)
            console.print(
                f"  {kind.label} ({model}): first 200 after {server.first_ok_s:.2f} s "
                f"(first start {fmt(server.cold_ok_s, '.2f')} s), "
                f"RSS {server.rss_start_mb:.0f} MB, {server.info}"
            )
        for workload in workloads:
            able = [s for s in servers if workload.key not in s.kind.cannot]
            for server in able:  # warm-up: first-request costs are not what is measured
                run_wrk(server, workload, min(8, max(args.connections)), args.warmup)
            turn = 0
            for _ in range(args.repeat):
                runs: list[Point] = []
                for conns in args.connections:
                    shift = turn % len(able)
                    turn += 1
                    for server in able[shift:] + able[:shift]:
                        point = run_wrk(server, workload, conns, args.duration)
                        server.sample_rss()
                        runs.append(point)
                        console.print(
                            f"  {workload.key:<13} c={conns:<3} {server.kind.key:<10} "
                            f"{point.ok_per_s:7,.0f} req/s  p50 {point.p50_ms:7.1f} ms  "
                            f"p99 {point.p99_ms:7.1f} ms  errors {point.errors}",
                            highlight=False,
                        )
                points += runs
            ceiling = ceilings.get(model) if model == TARGET_CEILING_MODEL else None
            ours = [
                p
                for p in merge(points)
                if p.workload is workload and p.server.kind.serve_args is not None
            ]
            if ceiling is not None and ours and args.pairs > 0:
                best = max(ours, key=lambda p: p.ok_per_s)
                pair_with_ceiling(best.server, workload, best.conns, ceiling, store, args)
    return servers, merge(points)


def pair_with_ceiling(
    server: Server,
    workload: Workload,
    conns: int,
    ceiling: Ceiling,
    store: ModelStore,
    args: argparse.Namespace,
) -> None:
    """Rounds of the best torchship row and the in-process ceiling back to back.

    Background load changes within minutes, so a ceiling measured before the servers
    started is no fair yardstick; the ratio of each adjacent pair is. The in-process side
    runs, in every round, each of the two fastest runtimes of the race in both thread
    layouts at the best batch size; the one with the best median over the rounds is the
    ceiling, and each round's ratio is taken against its rate in that round. (A short
    race can rank the runtimes wrongly on a busy machine, and the better of several
    configurations in each round would be a maximum of noisy samples, biased upward by
    about the noise; that figure is printed too.)
    """
    cores = cpu_count()
    layouts = sorted({(cores, 1), (1, cores)})
    configs = [(rt, t, c) for rt in ceiling.contenders or [ceiling.key] for t, c in layouts]
    predictors = {
        (rt, t): load_predictor(store, ceiling.model, runtime=rt, device="cpu", threads=t)
        for rt, t, _ in configs
    }
    batches = {key: p.sample_batch(ceiling.batch) for key, p in predictors.items()}
    ceiling.paired_with = f"{server.kind.label} @{conns}"

    def label(config: tuple[RuntimeChoice, int, int]) -> str:
        rt, threads, callers = config
        return f"{predictors[(rt, threads)].runtime} {layout_text(callers, threads)}"

    def inproc() -> dict[tuple[RuntimeChoice, int, int], float]:
        rates = {}
        for rt, threads, callers in configs:
            set_threads(threads)
            batch = batches[(rt, threads)]
            assert batch is not None
            rates[(rt, threads, callers)] = burst(  # all of them: as long as the HTTP run
                predictors[(rt, threads)], batch, callers, args.duration / len(configs)
            )
        set_threads(1)
        return rates

    rounds: list[tuple[float, dict[tuple[RuntimeChoice, int, int], float]]] = []
    try:
        for r in range(args.pairs):
            if r % 2 == 0:
                http = run_wrk(server, workload, conns, args.duration).ok_per_s
                rates = inproc()
            else:
                rates = inproc()
                http = run_wrk(server, workload, conns, args.duration).ok_per_s
            rounds.append((http, rates))
            detail = ", ".join(f"{label(c)} {v:,.1f}" for c, v in rates.items())
            console.print(
                f"  pair {r + 1}: {server.kind.key} @{conns} {http:,.1f} req/s; in-process "
                f"items/s: {detail}",
                highlight=False,
            )
    finally:
        for predictor in predictors.values():
            predictor.close()
    best = max(configs, key=lambda c: statistics.median(rates[c] for _, rates in rounds))
    ceiling.paired_config = f"{label(best)}, batch {ceiling.batch}"
    ceiling.pairs = [(http, rates[best], max(rates.values())) for http, rates in rounds]


def merge(points: list[Point]) -> list[Point]:
    """One point per server, workload and concurrency: the median over repeats."""
    groups: dict[tuple[int, str, int], list[Point]] = {}
    for p in points:
        groups.setdefault((id(p.server), p.workload.key, p.conns), []).append(p)
    merged = []
    for group in groups.values():
        first = group[0]
        merged.append(
            Point(
                first.server,
                first.workload,
                first.conns,
                statistics.median(p.ok_per_s for p in group),
                statistics.median(p.p50_ms for p in group),
                statistics.median(p.p99_ms for p in group),
                sum(p.errors for p in group),
                "; ".join(p.error_detail for p in group if p.error_detail),
            )
        )
    return merged


def fmt(value: float, spec: str = ".1f") -> str:
    return "-" if math.isnan(value) else format(value, spec)


def result_rows(
    points: list[Point], workload: Workload, order: list[ServerKind]
) -> list[list[str]]:
    rows = []
    for p in sorted(
        (p for p in points if p.workload is workload),
        key=lambda p: (order.index(p.server.kind), p.conns),
    ):
        rows.append(
            [
                p.server.kind.label,
                str(p.conns),
                fmt(p.ok_per_s, ",.0f"),
                fmt(p.p50_ms, ".2f"),
                fmt(p.p99_ms, ".2f"),
                f"{p.errors}" + (f" ({p.error_detail})" if p.error_detail else ""),
                fmt(p.server.first_ok_s, ".2f"),
                fmt(p.server.rss_peak_mb, ".0f"),
            ]
        )
    return rows


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def judge(
    points: list[Point], servers: list[Server], ceilings: dict[str, Ceiling]
) -> list[list[str]]:
    """One row per target: what it asks, what was measured, PASS or MISS."""

    def at(workload: str, kind: str, conns: int) -> Point | None:
        return next(
            (
                p
                for p in points
                if p.workload.key == workload and p.server.kind.key == kind and p.conns == conns
            ),
            None,
        )

    rows = []
    # The better of torchship's FastAPI rows (one process, or one per core as in
    # production) against the naive endpoint as the module writes it.
    candidates = [at("digits-json", k, TARGET_CONNS) for k in ("fastapi", "fastapi-w")]
    ours = max((p for p in candidates if p), key=lambda p: p.ok_per_s, default=None)
    naive = at("digits-json", "naive", TARGET_CONNS)
    if ours and naive:
        speedup = ours.ok_per_s / naive.ok_per_s if naive.ok_per_s > 0 else math.inf
        rows.append(
            [
                f"digits JSON @{TARGET_CONNS}: torchship FastAPI req/s >= {TARGET_SPEEDUP:g}x naive",
                f"{ours.server.kind.label}: {ours.ok_per_s:,.0f} vs {naive.ok_per_s:,.0f} req/s "
                f"= {speedup:.2f}x",
                verdict(speedup >= TARGET_SPEEDUP),
            ]
        )
        rows.append(
            [
                f"digits JSON @{TARGET_CONNS}: torchship FastAPI p99 < naive p99",
                f"{ours.p99_ms:.1f} vs {naive.p99_ms:.1f} ms = {ours.p99_ms / naive.p99_ms:.2f}x",
                verdict(ours.p99_ms < naive.p99_ms),
            ]
        )
    else:
        rows.append([f"digits JSON @{TARGET_CONNS} vs naive", "not measured", verdict(None)])

    ceiling = ceilings.get(TARGET_CEILING_MODEL)
    what = f"ResNet-18: best torchship row >= {TARGET_CEILING:g}x in-process ceiling"
    if ceiling and ceiling.pairs:
        share = statistics.median(http / items for http, items, _ in ceiling.pairs)
        strict = statistics.median(http / better for http, _, better in ceiling.pairs)
        detail = ", ".join(f"{http:.1f}/{items:.1f}" for http, items, _ in ceiling.pairs)
        rows.append(
            [
                what,
                f"{ceiling.paired_with} vs {ceiling.paired_config} (the best median of "
                f"the contenders), back to back: req/s / items/s = {detail}; median ratio "
                f"{share:.3f}x (against the best contender of each round, a maximum of "
                f"noisy samples: {strict:.3f}x)",
                verdict(share >= TARGET_CEILING),
            ]
        )
    else:
        rows.append([what, "not measured (needs the ResNet-18 workload)", verdict(None)])

    default = next((s for s in servers if s.kind.key == "fastapi" and s.model == "digits"), None)
    if default:
        rows.append(
            [
                f"first prediction <= {TARGET_STARTUP_S:g} s after spawn (torchship FastAPI, digits)",
                f"{default.first_ok_s:.2f} s at a restart (first answer of any kind "
                f"{default.listen_s:.2f} s); the first start on a new machine, which times "
                f"runtimes and batch sizes once, {default.cold_ok_s:.2f} s; for scale, "
                f"`python -c 'import torch'` alone takes {torch_import_s():.2f} s here now",
                verdict(default.first_ok_s <= TARGET_STARTUP_S),
            ]
        )
    else:
        rows.append(["first prediction after spawn", "not measured", verdict(None)])
    return rows


def byte_compile_torchship() -> bool:
    """Write torchship's bytecode where Python itself would not, so that a restart is timed
    as on a deployment (pip compiles what it installs); True when that was needed."""
    import compileall

    if not sys.dont_write_bytecode:
        return False  # the first start writes it; restarts are what the target times
    spec = importlib.util.find_spec("torchship")
    assert spec is not None and spec.origin is not None
    compileall.compile_dir(Path(spec.origin).parent, quiet=1)  # skips what is up to date
    return True


def torch_import_s(runs: int = 3) -> float:
    """Median seconds for a fresh interpreter to import torch: most of any start-up, and
    it varies with the machine's load, so the start-up target is read next to it."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def litserve_installed() -> bool:
    return importlib.util.find_spec("litserve") is not None


def peers() -> list[str]:
    """Peer servers: measured only where installed (this script installs nothing)."""
    lines = []
    if not litserve_installed():
        lines.append(
            "LitServe skipped: the litserve package is not installed "
            "(pip install 'torchship[bench]')."
        )
    else:
        lines.append(
            "LitServe: the same weights in eager PyTorch behind a LitAPI "
            "(benchmarks/litserve_app.py), one 1-thread inference process per core, batch 8 "
            "within 5 ms; it reads requests as JSON or forms only, so it has no raw-PNG row."
        )
    missing = why_no_torchserve()
    if missing:
        lines.append(f"TorchServe skipped: {missing}.")
    else:
        lines.append(
            "TorchServe: the same model as a .mar built by torchship archive (TorchScript, "
            "torchship's image handler), its batching and one Python worker per core."
        )
    return lines


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so SIGTERM also runs the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 s per point, 1 and 32 connections")
    parser.add_argument("--duration", type=int, help="seconds per wrk point (default 6, quick 3)")
    parser.add_argument("--connections", help="comma list (default 1,8,32,64; quick 1,32)")
    parser.add_argument(
        "--warmup", type=int, help="seconds of untimed wrk per server and workload (default 1)"
    )
    parser.add_argument("--out", help="also write the results as markdown to this file")
    parser.add_argument(
        "--servers",
        help=f"comma list of {','.join(k.key for k in (*SERVERS, TORCHSERVE, LITSERVE))} "
        "(default all)",
    )
    parser.add_argument(
        "--workloads", help="comma list of digits-json,digits-png,resnet18-jpeg (default all)"
    )
    parser.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="KEY=FLAGS",
        help="an extra torchship row, e.g. --row 'w2=--workers 2 --max-delay-ms 0'",
    )
    parser.add_argument("--repeat", type=int, default=1, help="sweeps per workload (median)")
    parser.add_argument(
        "--pairs",
        type=int,
        help="rounds of the best torchship row vs the in-process ceiling (default 3, quick 2)",
    )
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip the in-process ceiling measurement"
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (3 if args.quick else 6)
    args.warmup = args.warmup or 1
    args.pairs = (2 if args.quick else 3) if args.pairs is None else args.pairs
    conns_text = args.connections or ("1,32" if args.quick else "1,8,32,64")
    args.connections = sorted({int(c) for c in conns_text.split(",") if c.strip()})
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk).")
    kinds = [k for k in SERVERS if not args.servers or k.key in args.servers.split(",")]
    if (not args.servers or TORCHSERVE.key in args.servers.split(",")) and not why_no_torchserve():
        kinds.append(TORCHSERVE)
    if (not args.servers or LITSERVE.key in args.servers.split(",")) and litserve_installed():
        kinds.append(LITSERVE)
    for row in args.row:
        key, _, flags = row.partition("=")
        kinds.append(ServerKind(key, f"torchship {flags}".strip(), tuple(shlex.split(flags))))
    wanted = set(args.workloads.split(",")) if args.workloads else None
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)

    started = time.monotonic()
    summary = machine_summary()
    console.print(f"[bold]torchship serving benchmark[/] on {summary}")
    notes: list[str] = []
    if byte_compile_torchship():
        notes.append(
            "torchship's modules were byte-compiled first, as pip does for an installed "
            "package (PYTHONDONTWRITEBYTECODE is set here: without it every start would "
            "compile the ~40 modules a server imports from source, ~0.1 s)"
        )
    ceilings: dict[str, Ceiling] = {}
    servers: list[Server] = []
    points: list[Point] = []
    args.kinds = kinds
    with tempfile.TemporaryDirectory(prefix="torchship-serving-") as tmp:
        root = Path(tmp)
        logs = root / "logs"
        logs.mkdir()
        console.print("preparing the model store (train digits, export ResNet-18) ...")
        models = [m for m in MODELS if wanted is None or any(w.startswith(m) for w in wanted)]
        store, weights, workloads = prepare(root, models, notes)
        workloads = [w for w in workloads if wanted is None or w.key in wanted]
        for model in [] if args.no_ceiling else models:
            console.print(f"in-process ceiling of {model} ...")
            sizes = (1, 8, 32) if model == "resnet18" else (1, 32, 128)
            ceilings[model] = measure_ceiling(
                store,
                model,
                sizes,
                seconds=2.0 if args.quick else 4.0,
                rounds=2 if args.quick else 3,
            )
        set_threads(1)  # leave the cores to the servers
        for model in models:
            console.print(f"[bold]{model}[/]: starting {len(kinds)} servers ...")
            s, p = bench_model(
                model,
                [w for w in workloads if w.model == model],
                kinds,
                args,
                store,
                weights,
                logs,
                ceilings,
            )
            servers += s
            points += p

    with contextlib.suppress(OSError):
        notes.append(
            f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
            "logical CPUs; other processes on the machine compete with every row alike"
        )
    report = build_report(args, summary, workloads, servers, points, ceilings, notes)
    console.print(f"total {time.monotonic() - started:.0f} s")
    if args.out:
        Path(args.out).write_text(report)
        console.print(f"written to {args.out}")
    return 0


def build_report(
    args: argparse.Namespace,
    summary: str,
    workloads: list[Workload],
    servers: list[Server],
    points: list[Point],
    ceilings: dict[str, Ceiling],
    notes: list[str],
) -> str:
    """Print the tables and return them as markdown."""
    columns = ["server", "conns", "req/s", "p50 ms", "p99 ms", "errors", "startup s", "RSS MB"]
    md = [
        "## Results",
        "",
        f"{summary}; wrk {args.duration:g} s per point (after {args.warmup:g} s warm-up)"
        + (f", median of {args.repeat} sweeps" if args.repeat > 1 else "")
        + f", connections {','.join(map(str, args.connections))}.",
        "",
    ]
    for workload in workloads:
        rows = result_rows(points, workload, args.kinds)
        if not rows:
            continue
        ceiling = ceilings.get(workload.model)
        caption = (
            f"in-process ceiling (measured before the servers started): "
            f"{ceiling.items_per_s:,.0f} items/s "
            f"({ceiling.runtime}, batch {ceiling.batch}, {ceiling.layout}; no HTTP, no decoding)"
            if ceiling
            else None
        )
        print_table(workload.title, columns, rows, caption=caption)
        md += [f"### {workload.title}", "", markdown_table(columns, rows), ""]
        if caption:
            md += [f"{caption[0].upper()}{caption[1:]}.", ""]

    server_cols = [
        "server",
        "model",
        "first answer s",
        "first 200 s",
        "first 200, first start s",
        "RSS start MB",
        "RSS peak MB",
        "runtime",
    ]
    server_rows = [
        [
            s.kind.label,
            s.model,
            fmt(s.listen_s, ".2f"),
            fmt(s.first_ok_s, ".2f"),
            fmt(s.cold_ok_s, ".2f"),
            fmt(s.rss_start_mb, ".0f"),
            fmt(s.rss_peak_mb, ".0f"),
            s.info,
        ]
        for s in servers
    ]
    print_table("Start-up and memory (process tree)", server_cols, server_rows)
    md += [
        "### Start-up and memory (whole process tree)",
        "",
        markdown_table(server_cols, server_rows),
        "",
    ]

    ceiling_cols = ["model", "runtime", "batch", "threads", "callers", "items/s"]
    ceiling_rows = [row for c in ceilings.values() for row in c.rows]
    print_table("In-process ceiling (no HTTP, no decoding)", ceiling_cols, ceiling_rows)
    md += [
        "### In-process ceiling (load_predictor, no HTTP, no decoding)",
        "",
        "First the runtimes race at batch 8 on all cores; then the fastest runs at each batch "
        "size as one caller with all cores and as one 1-thread caller per core.",
        "",
        markdown_table(ceiling_cols, ceiling_rows),
        "",
    ]

    target_cols = ["target", "measured", "verdict"]
    target_rows = judge(points, servers, ceilings)
    print_table("Targets", target_cols, target_rows)
    md += ["### Targets", "", markdown_table(target_cols, target_rows), ""]

    notes = [*notes, *peers()]
    for note in notes:
        console.print(f"  - {note}")
    md += [f"- {note}" for note in notes]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every server this run started has been stopped[/]")
        sys.exit(130)
