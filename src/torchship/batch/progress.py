"""A progress bar with rate and ETA on a terminal, silence elsewhere (logs, CI, pipes)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second over rich's recent-samples window (not since the start)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} items/s" if speed else "- items/s", style="progress.data.speed")


class Progress:
    """``with Progress(total, done) as p: p.advance(n)``; a no-op when disabled.

    ``enabled=None`` shows the bar only when stderr is a terminal. ``done`` items
    (committed by an earlier, resumed run) start the bar part-way without counting
    towards the rate.
    """

    def __init__(
        self,
        total: int,
        done: int = 0,
        *,
        enabled: bool | None = None,
        description: str = "inference",
        console: Console | None = None,
        on_advance: Callable[[int], None] | None = None,
    ) -> None:
        console = console or Console(stderr=True)
        self.on_advance = on_advance  # e.g. a TensorBoard throughput plot
        self.enabled = console.is_terminal if enabled is None else enabled
        self._bar: _RichProgress | None = None
        if self.enabled:
            self._bar = _RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                RateColumn(),
                TextColumn("elapsed"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._bar.add_task(description, total=total, completed=done)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def advance(self, n: int) -> None:
        if self.on_advance is not None:
            self.on_advance(n)
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            sys.stderr.flush()
