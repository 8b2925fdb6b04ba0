"""Small printing helpers that keep the lesson scripts short and readable."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)


def section(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def say(text: str) -> None:
    console.print(text)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title)
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*(str(c) for c in row))
    console.print(t)


def workdir(name: str) -> Path:
    """A fresh scratch folder under ``runs/`` for one lesson (git-ignored, wiped per run)."""
    path = Path("runs") / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
