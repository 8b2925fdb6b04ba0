"""The three shapes a TorchServe model archive comes in, read as one list of members.

``torch-model-archiver --archive-format`` writes ``default`` (a zip named ``.mar``),
``tgz`` (a gzipped tar, every file under a ``MODEL_NAME/`` folder) or ``no-archive`` (a
plain folder). Each reader here lists its members as they are stored (raw names, kinds,
declared sizes) and opens them for reading; judging them is :mod:`torchship.archive.reader`'s
job. The format is told from the content (zip and gzip magic bytes, or a folder), not
from the file name.

Reading never follows a link and never unpacks more than the caller's limits allow: a
tar is walked header by header, and its declared sizes are checked before the bytes
between headers are decompressed.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from torchship.archive.errors import ArchiveError, ArchiveTooLargeError

Kind = Literal["file", "dir", "symbolic link", "hard link", "other"]
Format = Literal["zip", "tgz", "folder"]
FORMATS_HINT = (
    "torchship reads TorchServe's three archive formats: a zip .mar (default), a .tar.gz "
    "(--archive-format tgz) or a folder with MAR-INF/MANIFEST.json (no-archive)."
)


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may hold; raise them for very large models."""

    max_entries: int = 10_000
    max_total_bytes: int = 8 << 30  # 8 GiB unpacked
    max_ratio: float = 200.0  # unpacked / compressed, per zip entry or per .tar.gz ...
    ratio_floor_bytes: int = 1 << 20  # ... once it unpacks to more than 1 MiB
    max_manifest_bytes: int = 1 << 20


@dataclass(frozen=True)
class Member:
    """One stored entry, as the container declares it (nothing checked yet)."""

    raw_name: str
    kind: Kind
    size: int  # declared, unpacked
    compressed_size: int | None  # per entry: zip only
    encrypted: bool
    mode: int
    ref: Any  # the reader's own handle (ZipInfo, TarInfo, Path)


class Source:
    """An opened archive. Use as a context manager."""

    format: Format

    def __init__(self, path: Path) -> None:
        self.path = path

    def members(self, limits: ArchiveLimits) -> list[Member]:
        """Every member, refusing (``ArchiveTooLargeError``) as soon as a limit is passed:
        entries, unpacked bytes and, for a compressed whole (.tar.gz), its ratio."""
        found: list[Member] = []
        total = 0
        stored = self.stored_bytes()
        for member in self._scan():
            found.append(member)
            if len(found) > limits.max_entries:
                raise ArchiveTooLargeError(
                    f"{self.path.name} holds more than {limits.max_entries} entries; at "
                    f"most {limits.max_entries} are accepted."
                )
            if member.kind != "file":
                continue
            total += member.size
            if total > limits.max_total_bytes:
                raise ArchiveTooLargeError(
                    f"{self.path.name} unpacks to more than {limits.max_total_bytes} bytes.",
                    hint="Raise the archive size limit if the model really is that big.",
                )
            ratio = total / max(1, stored)
            if stored and total > limits.ratio_floor_bytes and ratio > limits.max_ratio:
                raise ArchiveTooLargeError(
                    f"{self.path.name} was refused: it unpacks to over {ratio:.0f}x its "
                    f"compressed size (a decompression bomb?); at most "
                    f"{limits.max_ratio:g}x is accepted."
                )
        return found

    def open(self, member: Member) -> IO[bytes]:
        raise NotImplementedError

    def stored_bytes(self) -> int:
        """The archive's size on disk (for the whole-archive compression ratio)."""
        return self.path.stat().st_size

    def close(self) -> None:
        pass

    def _scan(self) -> Iterator[Member]:
        raise NotImplementedError

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unreadable(path: Path, what: str, exc: BaseException) -> ArchiveError:
    return ArchiveError(
        f"{path.name} is not a model archive (not a readable {what}: {exc}).", hint=FORMATS_HINT
    )


class ZipSource(Source):
    format: Format = "zip"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise _unreadable(path, "zip file", exc) from exc

    def _scan(self) -> Iterator[Member]:
        for m in self.zf.infolist():
            mode = m.external_attr >> 16
            fmt = stat.S_IFMT(mode)
            kind: Kind
            if fmt == stat.S_IFLNK:
                kind = "symbolic link"
            elif fmt == stat.S_IFDIR or m.is_dir():
                kind = "dir"
            elif fmt in (0, stat.S_IFREG):
                kind = "file"
            else:
                kind = "other"
            yield Member(
                m.filename, kind, m.file_size, m.compress_size, bool(m.flag_bits & 1), mode, m
            )

    def open(self, member: Member) -> IO[bytes]:
        return self.zf.open(member.ref)

    def stored_bytes(self) -> int:
        return 0  # the ratio is checked per entry, from the sizes each one declares

    def close(self) -> None:
        self.zf.close()


class TarSource(Source):
    format: Format = "tgz"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self.tf = tarfile.open(path, "r:gz")  # noqa: SIM115 (closed by close())
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _unreadable(path, ".tar.gz", exc) from exc

    def _scan(self) -> Iterator[Member]:
        # next() reads one header and (on the following call) skips that member's data:
        # the caller sees each declared size before those bytes are decompressed.
        while True:
            try:
                m = self.tf.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ArchiveError(f"{self.path.name} is corrupt ({exc}).") from exc
            if m is None:
                return
            kind: Kind
            if m.issym():
                kind = "symbolic link"
            elif m.islnk():
                kind = "hard link"
            elif m.isdir():
                kind = "dir"
            elif m.isreg():
                kind = "file"
            else:
                kind = "other"
            yield Member(m.name, kind, m.size, None, False, m.mode, m)

    def open(self, member: Member) -> IO[bytes]:
        fh = self.tf.extractfile(member.ref)
        if fh is None:
            raise ArchiveError(f"{self.path.name}: {member.raw_name!r} has no data.")
        return fh

    def close(self) -> None:
        self.tf.close()


class FolderSource(Source):
    """A ``no-archive`` model folder; walked without following links."""

    format: Format = "folder"

    def _scan(self) -> Iterator[Member]:
        stack = [(self.path, "")]
        while stack:
            folder, prefix = stack.pop()
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                name = f"{prefix}{entry.name}"
                info = entry.stat(follow_symlinks=False)
                kind: Kind
                if entry.is_symlink():
                    kind = "symbolic link"
                elif stat.S_ISDIR(info.st_mode):
                    kind = "dir"
                    stack.append((Path(entry.path), f"{name}/"))
                elif stat.S_ISREG(info.st_mode):
                    kind = "file"
                else:
                    kind = "other"
                size = info.st_size if kind == "file" else 0
                yield Member(name, kind, size, None, False, info.st_mode, Path(entry.path))

    def open(self, member: Member) -> IO[bytes]:
        # O_NOFOLLOW: a file swapped for a link after the scan is not followed either
        fd = os.open(member.ref, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        return os.fdopen(fd, "rb")

    def stored_bytes(self) -> int:
        return 0  # nothing is compressed: no ratio to check


def open_source(path: Path) -> Source:
    """The reader for ``path``: a folder, or a file told by its first bytes."""
    if path.is_dir():
        return FolderSource(path)
    if not path.is_file():
        raise ArchiveError(f"{path} does not exist or is not a file or folder.")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":
        return TarSource(path)
    return ZipSource(path)  # a zip, or a clear "not a readable zip" error


ARCHIVE_SUFFIXES = (".mar", ".tar.gz", ".tgz")


def is_archive_name(name: str) -> bool:
    """A file name TorchServe's model store would load (its ``no-archive`` folders are
    named like models, so they are found by content: :func:`find_archives`)."""
    return name.endswith(ARCHIVE_SUFFIXES)


def find_archives(folder: Path) -> list[str]:
    """What ``--models all`` loads from a model store: every archive file and every
    folder holding ``MAR-INF/MANIFEST.json``, by name, hidden ones skipped."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        packed = entry.is_file() and is_archive_name(entry.name)
        if packed or (entry.is_dir() and (entry / "MAR-INF" / "MANIFEST.json").is_file()):
            found.append(entry.name)
    return found
