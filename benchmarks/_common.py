"""Timing helpers shared by the benchmark scripts: interleaved runs, percentiles, tables.

Interleaving matters on a shared machine: running A for 10 s and then B for 10 s lets a
burst of background load land on one of them only. Here every round runs each
contender once, in a rotating order, so noise is spread over all of them alike.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough for the tables when output is piped (rich would assume 80 columns).
console = Console(width=None if sys.stdout.isatty() else 120)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, like ``numpy.percentile``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Summary of one contender's samples, in milliseconds per call."""

    samples_ms: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples_ms, 99)

    def items_per_s(self, batch_size: int) -> float:
        return batch_size * 1e3 / self.p50 if self.p50 > 0 else math.nan


def interleaved(
    contenders: Mapping[str, Callable[[], object]],
    *,
    budget_s: float,
    min_rounds: int = 5,
    max_rounds: int = 10_000,
    warmup: int = 2,
) -> dict[str, Stats]:
    """Time each callable round-robin until ``budget_s`` is spent (at least ``min_rounds``).

    Each round starts with a different contender so none always runs right after the
    same neighbour (cache and frequency effects).
    """
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.monotonic() + budget_s
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.monotonic() < deadline):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    return {name: Stats(tuple(values)) for name, values in samples.items()}


def ratio(value: float, baseline: float) -> str:
    """``value / baseline`` as ``1.23x``; '-' when either is missing."""
    if not (baseline > 0 and value > 0) or math.isnan(value) or math.isnan(baseline):
        return "-"
    return f"{value / baseline:.2f}x"


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    caption: str | None = None,
) -> None:
    table = Table(title=title, caption=caption, caption_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    from torchship.monitoring.tensorboard import table_from_env

    table_from_env(title, columns, rows)  # TORCHSHIP_TENSORBOARD=DIR: also a TensorBoard run


def machine_summary() -> str:
    import torch

    try:
        import onnxruntime

        ort = f", onnxruntime {onnxruntime.__version__}"
    except ImportError:
        ort = ""
    try:
        load = f", load average {os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):  # not available on this platform
        load = ""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs{load}, "
        f"python {platform.python_version()}, torch {torch.__version__}{ort}"
    )


def cpu_count() -> int:
    """Cores this process may use (respects taskset/cgroup affinity where visible)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; the first three columns left-aligned, as above."""
    align = [":---" if i < 3 else "---:" for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (psutil when installed, else ``/proc``)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            return [pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:  # exited meanwhile
            continue
        # the command name (field 2) may hold spaces and parentheses: split after it
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MiB (summed, so pages that
    forked workers share are counted once per process, like ``ps`` would)."""
    total_kb = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kb / 1024


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by ``pid`` and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (after comm)
    return total / ticks


def wait_idle(
    pid: int, *, busy: float = 0.05, window_s: float = 0.25, limit_s: float = 30.0
) -> float:
    """Wait until ``pid``'s process tree uses under ``busy`` of a core over a window:
    a server still answering the requests queued before the last client left would
    compete with the next measurement. Returns the seconds waited."""
    started = time.monotonic()
    before = cpu_seconds(pid)
    while time.monotonic() - started < limit_s:
        time.sleep(window_s)
        now = cpu_seconds(pid)
        if now - before < busy * window_s:
            break
        before = now
    return time.monotonic() - started


def synthetic_photo(seed: int, size: tuple[int, int] = (224, 224)) -> Any:
    """A deterministic, photo-like RGB ``PIL.Image``: smooth gradients, blurred shapes,
    sensor noise, so JPEG sizes and decode costs resemble a real photo's.

    Shared by serving.py and batch.py.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

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
