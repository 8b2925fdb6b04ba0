"""The optimize report: one row per variant, as a table, Markdown, JSON and a plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["parent", "ok", "skipped", "failed"]

COLUMNS = [
    "method",
    "version",
    "top-1",
    "drop (pts)",
    "agreement",
    "size",
    "p50 ms (b1)",
    "p99 ms (b1)",
    "items/s (b32)",
    "speed-up (b32)",
    "speed-up (b1 p50)",
    "notes",
]


@dataclass
class VariantRow:
    """One variant's measurements; ``None`` where not measured (skipped or failed)."""

    method: str
    family: str
    status: Status
    ref: str | None = None
    reason: str = ""
    top1: float | None = None
    drop_points: float | None = None
    agreement: float | None = None
    size_bytes: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    items_per_s: float | None = None
    speedup: float | None = None  # items/s at batch 32 vs the parent
    latency_speedup: float | None = None  # p50 at batch 1: parent / variant
    seconds_to_make: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def version(self) -> str | None:
        return self.ref.partition(":")[2] if self.ref else None

    @property
    def measured(self) -> bool:
        return self.status in ("parent", "ok")

    def cells(self) -> list[str]:
        if not self.measured:
            return [
                self.method,
                self.version or "-",
                *["-"] * (len(COLUMNS) - 3),
                f"{self.status}: {self.reason}",
            ]
        return [
            self.method,
            self.version or "-",
            _pct(self.top1),
            _num(self.drop_points, "+.2f"),
            _pct(self.agreement),
            human_size(self.size_bytes),
            _num(self.p50_ms, ".3f"),
            _num(self.p99_ms, ".3f"),
            _num(self.items_per_s, ",.0f"),
            _num(self.speedup, ".2f", "x"),
            _num(self.latency_speedup, ".2f", "x"),
            "; ".join(self.notes),
        ]


@dataclass
class OptimizeReport:
    model: str
    parent: str
    machine: str
    device: str
    threads: int
    data: str
    labelled: bool
    rows: list[VariantRow]
    measure_seconds: float
    budget_points: float | None = None
    picked: str | None = None
    pick_reason: str = ""
    tag: str | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def parent_row(self) -> VariantRow:
        return next(r for r in self.rows if r.status == "parent")

    def row(self, method: str) -> VariantRow:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)

    def description(self) -> list[str]:
        """How it was measured, in sentences (Markdown header and CLI caption)."""
        drop = (
            "drop = parent's top-1 minus the variant's, in percentage points"
            if self.labelled
            else "no labels: drop = share of test items classified differently from the parent, in points"
        )
        lines = [
            f"{self.machine}; device {self.device}, {self.threads} intra-op "
            f"thread{'' if self.threads == 1 else 's'} for every variant.",
            f"Data: {self.data}. {drop}.",
            f"Timing: interleaved rounds ({self.measure_seconds:g} s budget), batch 1 for latency "
            "(p50/p99) and batch 32 for items/s (median call); speed-ups are against the fp32 "
            "eager parent. Size is the stored weights file.",
        ]
        if self.budget_points is not None:
            lines.append(
                f"Accuracy budget {points(self.budget_points)}: "
                + (
                    f"picked {self.picked} (tagged '{self.tag}'), {self.pick_reason}."
                    if self.picked
                    else f"nothing picked: {self.pick_reason}."
                )
            )
        return lines + self.notes

    def to_markdown(self) -> str:
        header = "| " + " | ".join(COLUMNS) + " |"
        align = "| " + " | ".join(":---" if i < 2 else "---:" for i in range(len(COLUMNS) - 1))
        lines = [
            f"# torchship optimize: {self.parent}",
            "",
            *[f"- {line}" for line in self.description()],
            "",
            header,
            align + " | :--- |",
        ]
        lines += [
            "| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |" for r in self.rows
        ]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row in data["rows"]:
            for key, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    row[key] = None
        return data

    def write(self, folder: str | Path) -> dict[str, str]:
        """Write ``optimize.md`` and ``optimize.json`` into ``folder``; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        md, js = folder / "optimize.md", folder / "optimize.json"
        self.files = {"markdown": str(md), "json": str(js)}
        md.write_text(self.to_markdown())
        js.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return self.files


def points(value: float) -> str:
    """``1 point``, ``0.5 points``, ``2 points``."""
    return f"{value:g} point" + ("" if value == 1 else "s")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:{spec}}{suffix}"
