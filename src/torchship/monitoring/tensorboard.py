"""TensorBoard event files for offline work: batch jobs, optimisation runs, benchmarks.

>>> with TensorBoardLogger("runs/tb", "quantize") as tb:  # doctest: +SKIP
...     tb.scalar("latency_ms/p50", 1.9, step=0)
...     tb.table("results", ["variant", "size_mb", "p50_ms"], [["int8", 0.3, 1.2]])

then ``tensorboard --logdir runs/tb``. Needs the ``tensorboard`` package
(``pip install 'torchship[monitoring]'``), imported only when a logger is created.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from torchship.errors import MissingDependencyError

__all__ = ["TensorBoardLogger", "read_scalars", "read_text", "table_from_env"]

_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def _part(name: object) -> str:
    """One part of a tag: TensorBoard groups tags by ``/``, so a name (a column like
    "req/s", a row) keeps to safe characters and never adds a level."""
    return _TAG_UNSAFE.sub("_", str(name))


def _tag(prefix: str, *names: object) -> str:
    return "/".join([prefix, *map(_part, names)] if prefix else map(_part, names))


# "1,234", "1.23 ms", "1.5x", "97.2%", "12 items/s": a number and at most a short unit
_FORMATTED = re.compile(r"\s*([-+]?(?:\d[\d,]*)?\.?\d+(?:[eE][-+]?\d+)?)\s*[A-Za-zµ%/]{0,8}\s*")


def _number(value: Any) -> float | None:
    """A finite number from a number or a formatted table cell; None otherwise."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (m := _FORMATTED.fullmatch(value)):
        value = float(m.group(1).replace(",", ""))
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


class TensorBoardLogger:
    """Writes scalars, tables, text and hyper-parameters for one run, as event files in
    ``logdir/run`` (``run`` defaults to a timestamp, so runs sit side by side)."""

    def __init__(self, logdir: str | Path, run: str | None = None, *, flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise MissingDependencyError(
                "tensorboard", "monitoring", "Writing TensorBoard logs"
            ) from exc
        self.path = Path(logdir) / (run or time.strftime("%Y%m%d-%H%M%S"))
        self._writer = SummaryWriter(log_dir=str(self.path), flush_secs=flush_secs)

    def scalar(self, tag: str, value: float, step: int | None = None) -> None:
        self._writer.add_scalar(tag, float(value), global_step=step)

    def scalars(
        self, values: Mapping[str, Any], step: int | None = None, *, prefix: str = ""
    ) -> None:
        """Every finite number of ``values`` as ``prefix/key``; other values are skipped."""
        for key, value in values.items():
            number = _number(value)
            if number is not None:
                self.scalar(_tag(prefix, key), number, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Markdown, shown in the Text tab."""
        self._writer.add_text(tag, text, global_step=step)

    def table(
        self,
        tag: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        step: int = 0,
    ) -> None:
        """A results table (an optimisation comparison, a benchmark): the whole table as
        Markdown text, and every numeric cell as the scalar ``tag/<column>/<first cell>``
        so runs can be compared in charts."""
        rows = [list(r) for r in rows]
        header = "| " + " | ".join(map(str, columns)) + " |"
        rule = "|" + "|".join("---" for _ in columns) + "|"
        lines = [header, rule, *("| " + " | ".join(map(str, r)) + " |" for r in rows)]
        self.text(tag, "\n".join(lines), step)
        for row in rows:
            name = row[0] if row else ""
            for column, cell in zip(columns[1:], row[1:], strict=False):
                number = _number(cell)
                if number is not None:
                    self.scalar(_tag(tag, column, name), number, step)

    def records(
        self, tag: str, records: Iterable[Mapping[str, Any]], key: str, step: int = 0
    ) -> None:
        """Result records (dicts, e.g. an optimize report's rows): every numeric field
        as the scalar ``tag/<field>/<record[key]>``, and the whole as a table."""
        records = list(records)
        fields = list(dict.fromkeys(k for r in records for k in r if k != key))
        self.table(
            tag, [key, *fields], [[r.get(key), *(r.get(f) for f in fields)] for r in records], step
        )

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """One run's settings and results, for the HParams tab's comparison of runs."""
        clean = {
            k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in hparams.items()
        }
        numbers = {k: n for k, v in metrics.items() if (n := _number(v)) is not None}
        self._writer.add_hparams(clean, numbers, run_name=".")

    def histogram(self, tag: str, values: Sequence[float], step: int | None = None) -> None:
        import numpy as np

        self._writer.add_histogram(tag, np.asarray(values, dtype=np.float64), global_step=step)

    def throughput(self, prefix: str, done: int = 0) -> Callable[[int], None]:
        """A progress callback: call it with each increment of items; it plots
        ``prefix/items_done`` and ``prefix/items_per_s`` (since the first call) against
        the items done. ``done`` items were finished earlier (a resumed job)."""
        first = done
        start = time.monotonic()

        def advance(n: int) -> None:
            nonlocal done
            done += n
            self.scalar(f"{prefix}/items_done", done, done)
            elapsed = time.monotonic() - start
            if elapsed > 0:
                self.scalar(f"{prefix}/items_per_s", (done - first) / elapsed, done)

        return advance

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _accumulator(path: str | Path) -> Any:
    try:
        from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
            EventAccumulator,
        )
    except ImportError as exc:
        raise MissingDependencyError(
            "tensorboard", "monitoring", "Reading TensorBoard logs"
        ) from exc
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_scalars(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A run's scalars as ``{tag: [(step, value), ...]}`` (what TensorBoard would plot)."""
    acc = _accumulator(path)
    return {
        tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
    }


def read_text(path: str | Path) -> dict[str, str]:
    """A run's text summaries (latest per tag)."""
    acc = _accumulator(path)
    out = {}
    for tag in acc.Tags()["tensors"]:
        if tag.endswith("/text_summary"):
            events = acc.Tensors(tag)
            if events:
                out[tag.removesuffix("/text_summary")] = (
                    events[-1].tensor_proto.string_val[0].decode("utf-8")
                )
    return out


ENV_DIR = "TORCHSHIP_TENSORBOARD"
_env_logger: TensorBoardLogger | None = None


def table_from_env(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Also write a printed results table to TensorBoard when ``TORCHSHIP_TENSORBOARD``
    names a folder (the benchmark scripts call this for every table they print): one
    run per process, named after the script."""
    global _env_logger
    logdir = os.environ.get(ENV_DIR)
    if not logdir:
        return
    if _env_logger is None:
        script = Path(sys.argv[0]).stem or "python"
        _env_logger = TensorBoardLogger(logdir, f"{script}-{time.strftime('%Y%m%d-%H%M%S')}")
        atexit.register(_env_logger.close)
    _env_logger.table(_part(title), columns, rows)
    _env_logger.flush()
