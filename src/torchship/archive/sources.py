"""The three shapes a TorchServe model archive comes in, read as one list of members.

``torch-model-archiver --archive-format`` writes ``default`` (a zip named ``.mar``),
``tgz`` (a gzipped tar, every file under a ``MODEL_NAME/`` folder) or ``no-archive`` (a
plain folder). Each reader here lists its members as they are stored (raw names, kinds,
declared sizes) and opens them for reading; judging them is :mod:`torchship.archive.reader`'s
job. The format is told from the content (zip and gzip magic bytes, or a folder), not
from the file name.

Reading never follows a link and never unpacks more than the caller's limits allow: a
tar is walked header by header, its declared sizes are checked before the bytes between
headers are decompressed, links and odd member types are refused at their header, and
the gzip stream under it refuses to decompress past a budget (the size limit, or the
compression ratio limit times the file's size) or to hand out a header over 1 MiB (PAX
and GNU long-name headers are read whole). A folder's files are opened without
following links and must still be the files that were scanned.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from torchship.archive.errors import ArchiveError, ArchiveTooLargeError, UnsafeArchiveError

Kind = Literal["file", "dir", "symbolic link", "hard link", "sparse file", "other"]
MAX_HEADER_READ = (1 << 20) + 512
"""The most a tar read may ask for at once: extraction reads 1 MiB blocks, headers are
512 bytes, so only an oversized PAX or long-name header asks for more."""
READ_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    tarfile.TarError,
    zipfile.BadZipFile,
    NotImplementedError,
    ValueError,
)
"""What reading a damaged archive raises (zip CRCs, unknown methods, bad gzip, ...)."""
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


class Source(ABC):
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
            self._refuse_odd(member)
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

    def _refuse_odd(self, m: Member) -> None:
        """Links, sparse and special files, encrypted entries: refused at their header,
        before anything after it is read."""
        name = self.path.name
        if m.kind in ("symbolic link", "hard link", "sparse file"):
            raise UnsafeArchiveError(
                f"{name} was refused: entry {m.raw_name!r} is a {m.kind}.",
                hint="Archive the file itself, as a regular file (no links, tar without --sparse).",
            )
        if m.kind == "other":
            raise UnsafeArchiveError(
                f"{name} was refused: entry {m.raw_name!r} is not a regular file "
                f"(mode {oct(m.mode)})."
            )
        if m.encrypted:
            raise UnsafeArchiveError(f"{name} was refused: entry {m.raw_name!r} is encrypted.")

    @abstractmethod
    def open(self, member: Member) -> IO[bytes]: ...

    def stored_bytes(self) -> int:
        """The archive's size on disk (for the whole-archive compression ratio)."""
        return self.path.stat().st_size

    def close(self) -> None:  # noqa: B027 (a folder has nothing to close)
        """Release what the reader holds open."""

    @abstractmethod
    def _scan(self) -> Iterator[Member]: ...

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


class _Bounded(io.RawIOBase):
    """A gzip stream that refuses to decompress past ``budget`` bytes or to return more
    than ``max_read`` at once (tarfile reads PAX and long-name headers whole)."""

    def __init__(self, raw: gzip.GzipFile, budget: int, max_read: int, source: str) -> None:
        super().__init__()
        self.raw, self.budget, self.max_read, self.source = raw, budget, max_read, source
        self.name = source

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self.max_read:
            raise ArchiveTooLargeError(
                f"{self.source} was refused: a tar header or read of "
                f"{'unbounded' if size is None or size < 0 else size} bytes (at most "
                f"{self.max_read} are read at once)."
            )
        self._check(self.raw.tell() + size)
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.raw.tell() + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR):
            raise io.UnsupportedOperation("seek from the end of a gzip stream")
        self._check(target)
        return self.raw.seek(target)

    def _check(self, position: int) -> None:
        if position > self.budget:
            raise ArchiveTooLargeError(
                f"{self.source} was refused: it decompresses to more than {self.budget} "
                f"bytes (its size limit, or {self.source}'s size times the compression "
                f"ratio limit: a decompression bomb?).",
                hint="Raise the archive size limit if the model really is that big.",
            )

    def close(self) -> None:
        self.raw.close()
        super().close()


class TarSource(Source):
    format: Format = "tgz"

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        super().__init__(path)
        stored = path.stat().st_size
        # tar's own bytes on top of the members': a header (and padding) per entry
        slack = 2 * tarfile.BLOCKSIZE * (limits.max_entries + 2) + MAX_HEADER_READ
        budget = min(
            limits.max_total_bytes, max(limits.ratio_floor_bytes, int(limits.max_ratio * stored))
        )
        self.stream = _Bounded(
            gzip.GzipFile(path, "rb"), budget + slack, MAX_HEADER_READ, path.name
        )
        try:
            self.tf = tarfile.open(fileobj=self.stream, mode="r:")  # noqa: SIM115 (close())
        except ArchiveTooLargeError:
            self.stream.close()
            raise
        except READ_ERRORS as exc:
            self.stream.close()
            raise _unreadable(path, ".tar.gz", exc) from exc

    def _scan(self) -> Iterator[Member]:
        # next() reads one header and (on the following call) skips that member's data:
        # the caller sees each declared size, and refuses, before those bytes are read.
        while True:
            try:
                m = self.tf.next()
            except ArchiveTooLargeError:
                raise
            except READ_ERRORS as exc:
                raise ArchiveError(f"{self.path.name} is corrupt ({exc}).") from exc
            if m is None:
                return
            kind: Kind
            if m.issym():
                kind = "symbolic link"
            elif m.islnk():
                kind = "hard link"
            elif m.issparse():
                kind = "sparse file"
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
        self.stream.close()


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
                ref = (Path(entry.path), info.st_dev, info.st_ino)
                yield Member(name, kind, size, None, False, info.st_mode, ref)

    def open(self, member: Member) -> IO[bytes]:
        # The file scanned, still: not a link (O_NOFOLLOW), not a FIFO swapped in (no
        # blocking open), not another file reached through a folder swapped for a link.
        path, dev, ino = member.ref
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise UnsafeArchiveError(
                f"{self.path.name} was refused: {member.raw_name!r} cannot be opened as the "
                f"file that was checked ({exc.strerror})."
            ) from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != (dev, ino):
            os.close(fd)
            raise UnsafeArchiveError(
                f"{self.path.name} was refused: {member.raw_name!r} changed while it was read."
            )
        return os.fdopen(fd, "rb")

    def stored_bytes(self) -> int:
        return 0  # nothing is compressed: no ratio to check


def open_source(path: Path, limits: ArchiveLimits) -> Source:
    """The reader for ``path``: a folder, or a file told by its first bytes."""
    if path.is_dir():
        return FolderSource(path)
    if not path.is_file():
        raise ArchiveError(f"{path} does not exist or is not a file or folder.")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":
        return TarSource(path, limits)
    return ZipSource(path)  # a zip, or a clear "not a readable zip" error


ARCHIVE_SUFFIXES = (".mar", ".tar.gz", ".tgz")


def is_archive_name(name: str) -> bool:
    """A file name TorchServe's model store would load (its ``no-archive`` folders are
    named like models, so they are found by content: :func:`find_archives`)."""
    return name.endswith(ARCHIVE_SUFFIXES)


def find_archives(folder: Path) -> list[str]:
    """What ``--models all`` loads from a model store, as ``--models`` specs: every archive
    file by name, and every folder holding ``MAR-INF/MANIFEST.json`` as ``NAME=NAME`` (a
    bare name is a store model); hidden ones skipped."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and is_archive_name(entry.name):
            found.append(entry.name)
        elif entry.is_dir() and (entry / "MAR-INF" / "MANIFEST.json").is_file():
            found.append(f"{entry.name}={entry.name}")
    return found
