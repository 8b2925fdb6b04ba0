"""Inputs of a batch job: find every item up front, read each one later (in a worker).

``open_source(path)`` turns what the user pointed at into a :class:`Source`: an ordered
list of item ids plus a ``read(i)`` that returns one item's raw payload, encoded image
bytes or a NumPy array. Listing is cheap and happens once, in the main process; reading
and decoding happen in DataLoader workers (or Ray actors), where a failure becomes that
item's failure row instead of the job's crash.

What can be read:

* a folder: every image (``.png .jpg .jpeg .gif .bmp .webp .tif .tiff``) and ``.npy``
  file below it, recursively, in sorted path order; hidden files are skipped;
* ``.csv`` / ``.jsonl``: one item per row, with a ``path`` (or ``file``, ``image``)
  column naming a file relative to the listing, or an ``input`` (or ``tensor``) column
  holding a nested array (JSON text in a CSV), or else only numeric feature columns;
  an optional ``id`` column names the item;
* ``.parquet``: the same columns (list columns for tensors), read one row group at a time;
* ``.npy``: an array ``(N, *input shape)``, one item per row, memory-mapped;
* ``.npz``: every array in it, one item per row (or one item when it has the input's
  shape), ids ``name[i]``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torchship.errors import ConfigError, InvalidInputError, MissingDependencyError
from torchship.store.manifest import InputSpec

Payload = bytes | np.ndarray
"""One item as read: the bytes of an encoded image, or an array of numbers."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
PATH_KEYS = ("path", "file", "image")
TENSOR_KEYS = ("input", "tensor", "inputs")
ID_KEY = "id"


class Strings:
    """Many strings in two NumPy arrays (UTF-8 bytes + offsets).

    A list of a million ``str`` objects costs ~60 MB and, worse, every forked DataLoader
    worker that touches them copies the pages (reference counts are writes). Two flat
    arrays cost the bytes themselves and stay shared.
    """

    def __init__(self, values: Iterable[str]) -> None:
        encoded = [v.encode() for v in values]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._offsets[i] : self._offsets[i + 1]].tobytes().decode()

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(self._offsets.tobytes())
        h.update(self._blob.tobytes())
        return h.hexdigest()


class Source(ABC):
    """An ordered collection of input items. Subclasses must stay picklable."""

    kind: str = "items"

    def __init__(self, path: Path, ids: Strings) -> None:
        self.path = path
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} items)"

    def item_id(self, i: int) -> str:
        return self.ids[i]

    @abstractmethod
    def read(self, i: int) -> Payload:
        """Item ``i``'s payload; raises (``OSError``, ``ValueError``, ...) when unreadable."""

    def fingerprint(self) -> str:
        """Changes when the list of items changes (their ids, their order, their count)."""
        return f"{self.kind}:{len(self)}:{self.ids.digest()[:32]}"

    def describe(self) -> str:
        return f"{len(self):,} {self.kind} from {self.path}"


def read_file(path: Path) -> Payload:
    """A listed file: ``.npy`` as an array (never unpickled), anything else as bytes."""
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    return path.read_bytes()


class ImageFolder(Source):
    """Every image or ``.npy`` file below a folder, recursively, sorted by relative path."""

    kind = "files"

    def __init__(self, root: Path) -> None:
        found: list[str] = []
        self.ignored = 0  # files that are neither images nor .npy: said, not read
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(root)
            for name in filenames:
                suffix = os.path.splitext(name)[1].lower()
                if name.startswith("."):
                    continue
                if suffix not in IMAGE_SUFFIXES and suffix != ".npy":
                    self.ignored += 1
                    continue
                found.append((rel / name).as_posix())
        found.sort()
        super().__init__(root, Strings(found))

    def describe(self) -> str:
        text = super().describe()
        if self.ignored:
            text += f" ({self.ignored:,} other file{'s' if self.ignored > 1 else ''} ignored: not images or .npy)"
        return text

    def read(self, i: int) -> Payload:
        return read_file(self.path / self.ids[i])


class Records(Source):
    """Rows of a CSV or JSONL listing, kept as JSON text and decoded per item.

    Each row names a file (``path``), holds a tensor (``input``) or, when it has
    neither, holds numeric feature columns flattened in column order.
    """

    kind = "rows"

    def __init__(self, path: Path, ids: Strings, rows: Strings) -> None:
        super().__init__(path, ids)
        self.rows = rows
        self.base = path.parent

    def read(self, i: int) -> Payload:
        record = json.loads(self.rows[i])
        if not isinstance(record, dict):
            raise InvalidInputError(f"Row {i} is not an object: {self.rows[i][:80]}")
        return record_payload(record, self.base)


def record_payload(record: dict[str, Any], base: Path) -> Payload:
    for key in PATH_KEYS:
        value = record.get(key)
        if value not in (None, ""):
            return read_file(base / str(value))
    for key in TENSOR_KEYS:
        if key in record:
            value = record[key]
            if isinstance(value, str):  # a CSV cell: JSON text
                value = json.loads(value)
            if value is None:
                raise InvalidInputError(f"The {key!r} value is empty.")
            return np.asarray(value)
    features = [v for k, v in record.items() if k != ID_KEY]
    if not features:
        raise InvalidInputError(
            "The row has no data.",
            hint=f"Give a {PATH_KEYS[0]!r} column (a file) or an {TENSOR_KEYS[0]!r} column.",
        )
    try:
        return np.asarray([float(v) for v in features], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"The row has no {PATH_KEYS[0]!r} or {TENSOR_KEYS[0]!r} column and its "
            f"values are not all numbers: {exc}"
        ) from exc


def _csv_records(path: Path) -> Records:
    ids: list[str] = []
    rows: list[str] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise InvalidInputError(f"{path} has no header row.")
        for n, row in enumerate(reader):
            row.pop(None, None)  # type: ignore[call-overload]  # extra cells without a header
            ids.append(row.get(ID_KEY) or str(n))
            rows.append(json.dumps(row))
    return Records(path, Strings(ids), Strings(rows))


def _jsonl_records(path: Path) -> Records:
    ids: list[str] = []
    rows: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            text = line.strip()
            if not text:
                continue
            item_id = str(len(ids))
            try:
                record = json.loads(text)
                if isinstance(record, dict) and record.get(ID_KEY) is not None:
                    item_id = str(record[ID_KEY])
            except json.JSONDecodeError:
                item_id = f"line {n + 1}"  # kept: read() raises again, giving a failure row
            ids.append(item_id)
            rows.append(text)
    return Records(path, Strings(ids), Strings(rows))


class NpyRows(Source):
    """Rows of one ``.npy`` array ``(N, *shape)``, memory-mapped (opened lazily per process)."""

    kind = "rows"

    def __init__(self, path: Path, spec: InputSpec | None) -> None:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        self._single = array.ndim == 0 or (spec is not None and list(array.shape) == spec.shape)
        n = 1 if self._single else len(array)
        self._array: np.ndarray | None = None
        super().__init__(path, Strings(str(i) for i in range(n)))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # re-open the memory map in the receiver

    def read(self, i: int) -> Payload:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.array(self._array if self._single else self._array[i])


class NpzArrays(Source):
    """Every array of an ``.npz`` archive in stored order, one item per row."""

    kind = "rows"

    def __init__(self, path: Path, spec: InputSpec | None) -> None:
        keys: list[str] = []
        rows: list[int] = []
        ids: list[str] = []
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                shape = archive[key].shape
                if len(shape) == 0 or (spec is not None and list(shape) == spec.shape):
                    keys.append(key)
                    rows.append(-1)
                    ids.append(key)
                    continue
                for r in range(shape[0]):
                    keys.append(key)
                    rows.append(r)
                    ids.append(f"{key}[{r}]")
        self.keys = Strings(keys)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._cache: tuple[str, np.ndarray] | None = None
        super().__init__(path, Strings(ids))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def read(self, i: int) -> Payload:
        key, row = self.keys[i], int(self.rows[i])
        if self._cache is None or self._cache[0] != key:  # members decompress on each access
            with np.load(self.path, allow_pickle=False) as archive:
                self._cache = (key, archive[key])
        array = self._cache[1]
        return np.array(array if row < 0 else array[row])


def import_pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError("pyarrow", "parquet", "Reading or writing Parquet") from exc
    return pq


class ParquetRows(Source):
    """Rows of a Parquet file; payload columns are read one row group at a time."""

    kind = "rows"

    def __init__(self, path: Path) -> None:
        pq = import_pyarrow_parquet()
        meta = pq.ParquetFile(path)
        names = list(meta.schema_arrow.names)
        self.base = path.parent
        self.columns = _payload_columns(names)
        self.group_starts = np.cumsum(
            [0] + [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
        )
        n = int(self.group_starts[-1])
        if ID_KEY in names:
            ids = [str(v) for v in pq.read_table(path, columns=[ID_KEY]).column(0).to_pylist()]
        else:
            ids = [str(i) for i in range(n)]
        self._cache: tuple[int, list[dict[str, Any]]] | None = None
        super().__init__(path, Strings(ids))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def read(self, i: int) -> Payload:
        group = int(np.searchsorted(self.group_starts, i, side="right")) - 1
        if self._cache is None or self._cache[0] != group:
            pq = import_pyarrow_parquet()
            table = pq.ParquetFile(self.path).read_row_group(group, columns=self.columns)
            self._cache = (group, table.to_pylist())
        return record_payload(self._cache[1][i - int(self.group_starts[group])], self.base)


def _payload_columns(names: Sequence[str]) -> list[str]:
    for key in (*PATH_KEYS, *TENSOR_KEYS):
        if key in names:
            return [key]
    return [n for n in names if n != ID_KEY]


def open_source(path: str | Path, spec: InputSpec | None = None) -> Source:
    """The :class:`Source` for a folder or file, chosen by what it is (see the module doc)."""
    path = Path(path)
    if path.is_dir():
        return ImageFolder(path)
    if not path.is_file():
        raise ConfigError(f"Input {path} does not exist.", hint="Give a folder or a file.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return _csv_records(path)
        if suffix in (".jsonl", ".ndjson"):
            return _jsonl_records(path)
        if suffix == ".npy":
            return NpyRows(path, spec)
        if suffix == ".npz":
            return NpzArrays(path, spec)
        if suffix in (".parquet", ".pq"):
            return ParquetRows(path)
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"Cannot read the input listing {path}: {exc}") from exc
    if suffix in IMAGE_SUFFIXES:
        return _SingleFile(path)
    raise ConfigError(
        f"Cannot tell what {path.name} holds from its suffix {suffix!r}.",
        hint="Give a folder of images, or a .csv, .jsonl, .parquet, .npy or .npz file.",
    )


class _SingleFile(Source):
    kind = "files"

    def __init__(self, path: Path) -> None:
        super().__init__(path, Strings([path.name]))

    def read(self, i: int) -> Payload:
        return read_file(self.path)
