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
decoding). LitServe and TorchServe are measured only where installed.

wrk runs on the same machine and takes CPU from the servers; every row pays that alike.

    python benchmarks/serving.py              # about 13 min on 2 cores
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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
)
from PIL import Image, ImageDraw, ImageFilter

from torchship.demo import train_demo
from torchship.export import export_onnx, export_torchscript
from torchship.preprocessing import preprocess_image
from torchship.runtime import load_predictor, set_threads
from torchship.store import ModelStore
from torchship.zoo.resnet import ResNet18, resnet_input_spec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WRK_DIR = HERE / "wrk"
HOST = "127.0.0.1"
MULTIPART_BOUNDARY = "----torchshipbench7MA4YWxkTrZu0gW"  # as in wrk/multipart.lua
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
RUNTIMES = ("eager", "torchscript", "onnx")
MODELS = ("digits", "resnet18")

# Targets the table is judged against.
TARGET_SPEEDUP = 2.0  # digits JSON at 32 connections: torchship FastAPI vs naive req/s
TARGET_CONNS = 32
TARGET_CEILING = 0.9  # ResNet-18: best torchship row vs the in-process ceiling
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


SERVERS = (
    ServerKind("fastapi", "torchship FastAPI, batch auto", ()),
    ServerKind("fastapi-b1", "torchship FastAPI, batch 1", ("--max-batch-size", "1")),
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
    # Not a target baseline: the naive server with the one setting that matters most on a
    # small, busy CPU, to show how much of the gap is thread oversubscription alone.
    ServerKind("naive-1t", "naive FastAPI, 1 torch thread", None, (("OMP_NUM_THREADS", "1"),)),
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
    rss_start_mb: float = math.nan
    rss_peak_mb: float = 0.0
    info: str = ""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/predict"

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
    model: str
    runtime: str
    batch: int
    items_per_s: float
    rows: list[list[str]] = field(default_factory=list)


# --- the model store and request bodies ---------------------------------------------------


def synthetic_photo(seed: int, size: tuple[int, int] = (224, 224)) -> Image.Image:
    """A deterministic, photo-like RGB image: smooth gradients, blurred shapes, sensor noise.

    JPEG sizes and decode costs then resemble a real photo's, not a flat test card's.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y + seed), 2 * x * y - 1], -1)
    img = Image.fromarray(((base * 0.5 + 0.5) * 200 + 30).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        cx, cy = (int(v) for v in rng.integers(0, (w, h)))
        r = int(rng.integers(8, max(w, h) // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
    pixels = pixels + rng.integers(-12, 13, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


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


def measure_ceiling(
    store: ModelStore, model: str, batch_sizes: Sequence[int], budget_s: float
) -> Ceiling:
    """Items/s of each runtime at each batch size, called directly (no HTTP, no decoding)."""
    threads = cpu_count()
    predictors = {
        rt: load_predictor(store, model, runtime=rt, device="cpu", threads=threads)  # type: ignore[arg-type]
        for rt in RUNTIMES
    }
    contenders = {}
    for rt, predictor in predictors.items():
        for n in batch_sizes:
            batch = predictor.sample_batch(n)
            assert batch is not None
            contenders[f"{rt}@{n}"] = partial(predictor.predict, batch)
    try:
        stats = interleaved(contenders, budget_s=budget_s, min_rounds=3, warmup=1)
    finally:
        for predictor in predictors.values():
            predictor.close()
    best = Ceiling(model, "", 0, 0.0)
    for key, s in stats.items():
        rt, n = key.split("@")
        items = s.items_per_s(int(n))
        best.rows.append([model, predictors[rt].runtime, n, f"{s.p50:.2f}", f"{items:,.0f}"])
        if items > best.items_per_s:
            best.runtime, best.batch, best.items_per_s = predictors[rt].runtime, int(n), items
    return best


# --- servers ------------------------------------------------------------------------------


def server_command(
    kind: ServerKind,
    model: str,
    port: int,
    store: ModelStore,
    weights: dict[str, Path],
    extra: Sequence[str] = (),
) -> list[str]:
    if kind.serve_args is None:
        arch = "cnn" if model == "digits" else model
        naive = str(HERE / "naive_fastapi.py")
        return [
            sys.executable,
            naive,
            "--arch",
            arch,
            "--weights",
            str(weights[model]),
            "--port",
            str(port),
        ]
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
        *extra,
    ]


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
            conn.request("POST", "/predict", body, headers)
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
    if server.kind.serve_args is None:
        threads = dict(server.kind.env).get("OMP_NUM_THREADS", "default")
        return f"eager, {threads} torch threads"
    conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
    try:
        conn.request("GET", "/models")
        info = json.loads(conn.getresponse().read())["models"][0]
        return f"{info['runtime']}, max batch {info['max_batch_size']}"
    except (OSError, ValueError, KeyError, IndexError):
        return "?"
    finally:
        conn.close()


def stop_server(server: Server) -> None:
    """SIGTERM (graceful drain), then SIGKILL to the whole session on timeout."""
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]{server.kind.label} ignored SIGTERM; killing it[/]")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of this session only
    proc.wait()


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
        for server in servers:
            stop_server(server)


# --- wrk ----------------------------------------------------------------------------------


def run_wrk(server: Server, workload: Workload, conns: int, seconds: float) -> Point:
    threads = min(2, conns)  # wrk needs at least one connection per thread
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{seconds:g}s",
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
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary (exit {out.returncode}):\n{out.stderr[-2000:]}")
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
) -> tuple[list[Server], list[Point]]:
    servers: list[Server] = []
    points: list[Point] = []
    extra = shlex.split(args.serve_args or "")
    with running(servers):
        for kind in kinds:  # one at a time, so each start-up is measured alone
            port = free_port(HOST)
            cmd = server_command(kind, model, port, store, weights, extra)
            started = time.monotonic()
            server = start_server(cmd, kind, model, port, logs)
            servers.append(server)
            wait_first_prediction(server, workloads[0], started)
            server.rss_start_mb = server.sample_rss()
            server.info = describe(server)
            console.print(
                f"  {kind.label} ({model}): first 200 after {server.first_ok_s:.2f} s, "
                f"RSS {server.rss_start_mb:.0f} MB, {server.info}"
            )
        for workload in workloads:
            for server in servers:  # warm-up: first-request costs are not what is measured
                run_wrk(server, workload, min(8, max(args.connections)), args.warmup)
            for i, conns in enumerate(args.connections):
                shift = i % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    point = run_wrk(server, workload, conns, args.duration)
                    server.sample_rss()
                    points.append(point)
                    console.print(
                        f"  {workload.key:<13} c={conns:<3} {server.kind.key:<10} "
                        f"{point.ok_per_s:7,.0f} req/s  p50 {point.p50_ms:7.1f} ms  "
                        f"p99 {point.p99_ms:7.1f} ms  errors {point.errors}",
                        highlight=False,
                    )
    return servers, points


def fmt(value: float, spec: str = ".1f") -> str:
    return "-" if math.isnan(value) else format(value, spec)


def result_rows(points: list[Point], workload: Workload) -> list[list[str]]:
    rows = []
    for p in sorted(
        (p for p in points if p.workload is workload),
        key=lambda p: (SERVERS.index(p.server.kind), p.conns),
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
    ours, naive = (
        at("digits-json", "fastapi", TARGET_CONNS),
        at("digits-json", "naive", TARGET_CONNS),
    )
    if ours and naive:
        speedup = ours.ok_per_s / naive.ok_per_s if naive.ok_per_s > 0 else math.inf
        rows.append(
            [
                f"digits JSON @{TARGET_CONNS}: torchship FastAPI req/s >= {TARGET_SPEEDUP:g}x naive",
                f"{ours.ok_per_s:,.0f} vs {naive.ok_per_s:,.0f} req/s = {speedup:.2f}x",
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

    ceiling = ceilings.get("resnet18")
    resnet = [
        p
        for p in points
        if p.workload.key == "resnet18-jpeg"
        and p.server.kind.serve_args is not None
        and p.errors == 0
    ]
    if ceiling and resnet:
        best = max(resnet, key=lambda p: p.ok_per_s)
        share = best.ok_per_s / ceiling.items_per_s
        rows.append(
            [
                f"ResNet-18: best torchship row >= {TARGET_CEILING:g}x in-process ceiling",
                f"{best.server.kind.label} @{best.conns}: {best.ok_per_s:.1f} req/s vs "
                f"{ceiling.items_per_s:.1f} items/s ({ceiling.runtime}, batch {ceiling.batch}) "
                f"= {share:.2f}x",
                verdict(share >= TARGET_CEILING),
            ]
        )
    else:
        rows.append(["ResNet-18 vs in-process ceiling", "not measured", verdict(None)])

    default = next((s for s in servers if s.kind.key == "fastapi" and s.model == "digits"), None)
    if default:
        rows.append(
            [
                f"first prediction <= {TARGET_STARTUP_S:g} s after spawn (torchship FastAPI, digits)",
                f"{default.first_ok_s:.2f} s (first answer of any kind {default.listen_s:.2f} s)",
                verdict(default.first_ok_s <= TARGET_STARTUP_S),
            ]
        )
    else:
        rows.append(["first prediction after spawn", "not measured", verdict(None)])
    return rows


def peers() -> list[str]:
    """Peer servers: measured only where installed (this script installs nothing)."""
    lines = []
    if importlib.util.find_spec("litserve") is None:
        lines.append("LitServe skipped: the litserve package is not installed in this environment.")
    else:
        lines.append("LitServe is installed but has no row yet: add a ServerKind for it.")
    if shutil.which("torchserve") is None or importlib.util.find_spec("ts") is None:
        lines.append(
            "TorchServe skipped: no `torchserve` command / `ts` package here (it also needs Java)."
        )
    else:
        lines.append("TorchServe is installed but has no row yet: add a ServerKind for it.")
    return lines


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so SIGTERM also runs the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 s per point, 1 and 32 connections")
    parser.add_argument("--duration", type=float, help="seconds per wrk point (default 8, quick 3)")
    parser.add_argument("--connections", help="comma list (default 1,8,32,64; quick 1,32)")
    parser.add_argument(
        "--warmup", type=float, help="seconds of untimed wrk per server and workload"
    )
    parser.add_argument("--out", help="also write the results as markdown to this file")
    parser.add_argument(
        "--servers", help=f"comma list of {','.join(k.key for k in SERVERS)} (default all)"
    )
    parser.add_argument(
        "--workloads", help="comma list of digits-json,digits-png,resnet18-jpeg (default all)"
    )
    parser.add_argument("--serve-args", help="extra `torchship serve` flags for torchship rows")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    args.warmup = args.warmup or 1.0
    conns_text = args.connections or ("1,32" if args.quick else "1,8,32,64")
    args.connections = sorted({int(c) for c in conns_text.split(",") if c.strip()})
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk).")
    kinds = [k for k in SERVERS if not args.servers or k.key in args.servers.split(",")]
    wanted = set(args.workloads.split(",")) if args.workloads else None
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)

    started = time.monotonic()
    summary = machine_summary()
    console.print(f"[bold]torchship serving benchmark[/] on {summary}")
    notes: list[str] = []
    ceilings: dict[str, Ceiling] = {}
    servers: list[Server] = []
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="torchship-serving-") as tmp:
        root = Path(tmp)
        logs = root / "logs"
        logs.mkdir()
        console.print("preparing the model store (train digits, export ResNet-18) ...")
        models = [m for m in MODELS if wanted is None or any(w.startswith(m) for w in wanted)]
        store, weights, workloads = prepare(root, models, notes)
        workloads = [w for w in workloads if wanted is None or w.key in wanted]
        for model in models:
            console.print(f"in-process ceiling of {model} ...")
            sizes = (1, 8, 32) if model == "resnet18" else (1, 32, 128)
            ceilings[model] = measure_ceiling(store, model, sizes, 2.0 if args.quick else 6.0)
        set_threads(1)  # leave the cores to the servers
        for model in models:
            console.print(f"[bold]{model}[/]: starting {len(kinds)} servers ...")
            s, p = bench_model(
                model, [w for w in workloads if w.model == model], kinds, args, store, weights, logs
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
        f"{summary}; wrk {args.duration:g} s per point (after {args.warmup:g} s warm-up), "
        f"connections {','.join(map(str, args.connections))}.",
        "",
    ]
    for workload in workloads:
        rows = result_rows(points, workload)
        if not rows:
            continue
        ceiling = ceilings.get(workload.model)
        caption = (
            f"in-process ceiling: {ceiling.items_per_s:,.0f} items/s "
            f"({ceiling.runtime}, batch {ceiling.batch}, no HTTP, no decoding)"
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

    ceiling_cols = ["model", "runtime", "batch", "p50 ms / call", "items/s"]
    ceiling_rows = [row for c in ceilings.values() for row in c.rows]
    print_table(f"In-process ceiling ({cpu_count()} threads, no HTTP)", ceiling_cols, ceiling_rows)
    md += [
        "### In-process ceiling (load_predictor, all cores, no HTTP, no decoding)",
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
