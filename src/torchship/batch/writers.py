"""Batch output: CSV, JSONL or Parquet, committed in chunks so a killed job can resume.

While a job runs, its output lives in ``<output>.parts/``::

    part-000000.csv      # rows 0..n0-1, complete and fsynced before it got this name
    part-000001.csv      # rows n0..n1-1
    journal.json         # which parts count, how many rows they hold, what the job was

A chunk is committed in two atomic steps: its part file is written under a temp name,
fsynced and renamed; then ``journal.json`` is rewritten (temp, fsync, rename) to list it.
A part that the journal does not list (the job died between the two steps) is deleted on
resume and its rows are computed again, so every input ends up in the output exactly
once. When all rows are committed the parts are merged, in order, into a temp file that
is renamed onto ``<output>``, and the parts folder is removed.

Columns, in every format: ``index`` (position in the input), ``id``, ``status``
(``ok`` or ``error``), ``error`` (the reason, empty when ok), then ``label_1``,
``probability_1`` ... ``label_k``, ``probability_k``. JSONL keeps the top-k as a list
of ``{"label", "probability"}`` objects instead.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torchship.errors import ConfigError
from torchship.store._atomic import fsync_dir, read_json, write_json_atomic

logger = logging.getLogger(__name__)

JOURNAL = "journal.json"
JOURNAL_VERSION = 1
PARTS_SUFFIX = ".parts"

Status = Literal["ok", "error"]


@dataclass(frozen=True)
class Row:
    """One output row: an input item's top-k predictions, or why it has none."""

    index: int
    id: str
    status: Status
    error: str | None = None
    labels: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()


class OutputFormat(ABC):
    """How rows become a file, and how part files merge into one."""

    suffix: str

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k

    @property
    def columns(self) -> list[str]:
        ranked = [
            f"{what}_{i}" for i in range(1, self.top_k + 1) for what in ("label", "probability")
        ]
        return ["index", "id", "status", "error", *ranked]

    def flat(self, row: Row) -> dict[str, Any]:
        record: dict[str, Any] = {
            "index": row.index,
            "id": row.id,
            "status": row.status,
            "error": row.error,
        }
        for i in range(self.top_k):
            has = i < len(row.labels)
            record[f"label_{i + 1}"] = row.labels[i] if has else None
            record[f"probability_{i + 1}"] = row.probabilities[i] if has else None
        return record

    @abstractmethod
    def write(self, rows: Sequence[Row], path: Path) -> None:
        """Write ``rows`` as one complete part file (no header for text formats)."""

    @abstractmethod
    def merge(self, parts: Sequence[Path], dest: Path) -> None:
        """Concatenate ``parts`` in order into the final file ``dest``."""


class CsvFormat(OutputFormat):
    suffix = ".csv"

    def write(self, rows: Sequence[Row], path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns)
            writer.writerows(self.flat(r) for r in rows)

    def merge(self, parts: Sequence[Path], dest: Path) -> None:
        with dest.open("w", newline="", encoding="utf-8") as out:
            csv.writer(out).writerow(self.columns)
            out.flush()
            _concat(parts, out.buffer)


class JsonlFormat(OutputFormat):
    suffix = ".jsonl"

    def write(self, rows: Sequence[Row], path: Path) -> None:
        with path.open("w", encoding="utf-8") as fh:
            for r in rows:
                record = {
                    "index": r.index,
                    "id": r.id,
                    "status": r.status,
                    "error": r.error,
                    "top_k": [
                        {"label": label, "probability": p}
                        for label, p in zip(r.labels, r.probabilities, strict=True)
                    ],
                }
                fh.write(json.dumps(record) + "\n")

    def merge(self, parts: Sequence[Path], dest: Path) -> None:
        with dest.open("wb") as out:
            _concat(parts, out)


class ParquetFormat(OutputFormat):
    suffix = ".parquet"

    def _schema(self) -> Any:
        import pyarrow as pa

        fields = [
            pa.field("index", pa.int64()),
            pa.field("id", pa.string()),
            pa.field("status", pa.string()),
            pa.field("error", pa.string()),
        ]
        for i in range(1, self.top_k + 1):
            fields += [
                pa.field(f"label_{i}", pa.string()),
                pa.field(f"probability_{i}", pa.float64()),
            ]
        return pa.schema(fields)

    def write(self, rows: Sequence[Row], path: Path) -> None:
        import pyarrow as pa

        pq = _pq()
        table = pa.Table.from_pylist([self.flat(r) for r in rows], schema=self._schema())
        pq.write_table(table, path)

    def merge(self, parts: Sequence[Path], dest: Path) -> None:
        pq = _pq()
        with pq.ParquetWriter(dest, self._schema()) as writer:
            for part in parts:
                writer.write_table(pq.read_table(part))


def _pq() -> Any:
    from torchship.batch.sources import import_pyarrow_parquet

    return import_pyarrow_parquet()


def _concat(parts: Sequence[Path], out: Any) -> None:
    for part in parts:
        with part.open("rb") as fh:
            shutil.copyfileobj(fh, out, 1 << 20)


FORMATS: dict[str, type[OutputFormat]] = {
    ".csv": CsvFormat,
    ".jsonl": JsonlFormat,
    ".ndjson": JsonlFormat,
    ".parquet": ParquetFormat,
}


def output_format(path: Path, top_k: int) -> OutputFormat:
    cls = FORMATS.get(path.suffix.lower())
    if cls is None:
        raise ConfigError(
            f"Cannot tell the output format of {path.name}.",
            hint="Name the output .csv, .jsonl or .parquet.",
        )
    if cls is ParquetFormat:
        _pq()  # fail before any work is done, not at the first commit
    return cls(top_k)


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + PARTS_SUFFIX)


class ChunkedOutput:
    """The output of one job, committed chunk by chunk; resumable after a crash.

    ``fingerprint`` describes the job (inputs, model version, top-k); resuming with a
    different one is refused, since its rows would not belong together.
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any],
        *,
        top_k: int,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.format = output_format(self.path, top_k)
        self.fingerprint = fingerprint
        self.dir = parts_dir(self.path)
        self.parts: list[str] = []
        self.committed = 0
        self.failures = 0
        self.already_complete = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        journal = self.dir / JOURNAL
        if resume and journal.is_file():
            self._load(journal)
        elif resume and self.path.exists() and not self.dir.exists():
            self.already_complete = True
        elif self.path.exists() and not overwrite:
            raise ConfigError(
                f"{self.path} already exists.",
                hint="Pass --overwrite (overwrite=True) to replace it.",
            )
        elif journal.is_file() and not overwrite:
            raise ConfigError(
                f"{self.path} has an interrupted run ({self.dir.name}/ holds its committed rows).",
                hint="Pass --resume to finish it, or --overwrite to start over.",
            )
        if not self.parts:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _load(self, journal: Path) -> None:
        state = read_json(journal)
        if state.get("journal_version") != JOURNAL_VERSION:
            raise ConfigError(f"{journal} was written by another torchship version.")
        theirs = state.get("fingerprint", {})
        changed = [
            k
            for k in sorted(set(theirs) | set(self.fingerprint))
            if theirs.get(k) != self.fingerprint.get(k)
        ]
        if changed:
            details = "; ".join(
                f"{k}: was {theirs.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in changed
            )
            raise ConfigError(
                f"Cannot resume {self.path}: the job changed ({details}).",
                hint="Resume with the same model, inputs and top-k, or pass --overwrite.",
            )
        self.parts = list(state["parts"])
        self.committed = int(state["committed"])
        self.failures = int(state["failures"])
        keep = {*self.parts, JOURNAL}
        for stray in self.dir.iterdir():  # a part written but never journalled, temp files
            if stray.name not in keep:
                logger.info("resume: removing uncommitted %s", stray.name)
                stray.unlink()

    def commit(self, rows: Sequence[Row]) -> None:
        """Make ``rows`` durable; they must continue exactly where the last commit ended."""
        if not rows:
            return
        expected = range(self.committed, self.committed + len(rows))
        if [r.index for r in rows] != list(expected):
            raise RuntimeError(
                f"rows {rows[0].index}..{rows[-1].index} do not continue the output at "
                f"{self.committed} (a bug: rows must be committed in input order)"
            )
        self.dir.mkdir(exist_ok=True)
        name = f"part-{len(self.parts):06d}{self.format.suffix}"
        tmp = self.dir / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            self.format.write(rows, tmp)
            _fsync_file(tmp)
            os.replace(tmp, self.dir / name)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.dir)
        self.parts.append(name)
        self.committed += len(rows)
        self.failures += sum(r.status != "ok" for r in rows)
        write_json_atomic(
            self.dir / JOURNAL,
            {
                "journal_version": JOURNAL_VERSION,
                "fingerprint": self.fingerprint,
                "committed": self.committed,
                "failures": self.failures,
                "parts": self.parts,
            },
        )

    def finish(self) -> Path:
        """Merge every committed part into the output file (atomically) and clean up."""
        if self.already_complete:
            return self.path
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.format.merge([self.dir / p for p in self.parts], tmp)
            _fsync_file(tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.path.parent)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.path


class Committer:
    """Buffers rows and commits them every ``chunk_size`` rows or ``interval_s`` seconds."""

    def __init__(self, output: ChunkedOutput, chunk_size: int, interval_s: float) -> None:
        self.output = output
        self.chunk_size = chunk_size
        self.interval_s = interval_s
        self.pending: list[Row] = []
        self.last = time.monotonic()

    def add(self, rows: list[Row]) -> None:
        self.pending.extend(rows)
        due = time.monotonic() - self.last >= self.interval_s
        if len(self.pending) >= self.chunk_size or due:
            self.flush()

    def flush(self) -> None:
        self.output.commit(self.pending)
        self.pending = []
        self.last = time.monotonic()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def count_rows(path: str | Path) -> int:
    """Rows in a finished output file, without reading them all into memory."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return int(_pq().ParquetFile(path).metadata.num_rows)
    with path.open(newline="", encoding="utf-8") as fh:
        if suffix == ".csv":
            return sum(1 for _ in csv.reader(fh)) - 1  # ids may hold quoted newlines
        return sum(1 for line in fh if line.strip())


def read_rows(path: str | Path) -> list[Row]:
    """Read a finished output file back as rows (any of the three formats)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                rows.append(
                    Row(
                        r["index"],
                        r["id"],
                        r["status"],
                        r["error"],
                        tuple(t["label"] for t in r["top_k"]),
                        tuple(t["probability"] for t in r["top_k"]),
                    )
                )
        return rows
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            records: list[dict[str, Any]] = list(csv.DictReader(fh))
    elif suffix == ".parquet":
        records = _pq().read_table(path).to_pylist()
    else:
        raise ConfigError(f"Cannot read {path.name}: not .csv, .jsonl or .parquet.")
    return [_from_flat(r) for r in records]


def _from_flat(r: dict[str, Any]) -> Row:
    labels: list[str] = []
    probs: list[float] = []
    i = 1
    while f"label_{i}" in r:
        if r[f"label_{i}"] not in (None, ""):
            labels.append(str(r[f"label_{i}"]))
            probs.append(float(r[f"probability_{i}"]))
        i += 1
    return Row(
        int(r["index"]), str(r["id"]), r["status"], r["error"] or None, tuple(labels), tuple(probs)
    )
