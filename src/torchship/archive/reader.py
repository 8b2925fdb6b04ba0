"""Open, check and unpack ``.mar`` archives without trusting anything inside them.

A model archive is a zip a stranger may have built, so before a byte is written:

* every entry name must stay inside the extraction folder: no absolute paths, drive
  letters, backslashes, ``..`` segments or NUL bytes (zip-slip);
* only regular files and folders: symlinks and device files are refused (their mode
  sits in the entry's ``external_attr``);
* no encrypted entries and no name twice;
* bounded: at most ``max_entries`` entries and ``max_total_bytes`` unpacked, and no
  entry over ``max_ratio`` times its compressed size (decompression bombs). The sizes
  a zip declares can lie, so extraction also counts the bytes it really writes.

Extraction goes to a temp folder beside the target and is renamed into place, so a
refused archive leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from torchship.archive.errors import ArchiveError, ArchiveTooLargeError, UnsafeArchiveError
from torchship.archive.manifest import MANIFEST_PATH, MarManifest

_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may hold; raise them for very large models."""

    max_entries: int = 10_000
    max_total_bytes: int = 8 << 30  # 8 GiB unpacked
    max_ratio: float = 200.0  # unpacked / compressed, per entry ...
    ratio_floor_bytes: int = 1 << 20  # ... for entries that unpack to more than 1 MiB
    max_manifest_bytes: int = 1 << 20


@dataclass(frozen=True)
class ArchiveEntry:
    name: str
    size: int
    compressed_size: int
    is_dir: bool


@dataclass(frozen=True)
class MarInfo:
    """A checked archive: where it is, its manifest and what it holds."""

    path: Path
    manifest: MarManifest
    entries: tuple[ArchiveEntry, ...]
    sha256: str

    @property
    def files(self) -> set[str]:
        return {e.name for e in self.entries if not e.is_dir}

    @property
    def unpacked_bytes(self) -> int:
        return sum(e.size for e in self.entries)


def inspect_archive(path: str | Path, limits: ArchiveLimits | None = None) -> MarInfo:
    """Check every entry of ``path`` and read its manifest; unpacks nothing."""
    path = Path(path)
    limits = limits or ArchiveLimits()
    with _open_zip(path) as zf:
        entries = _check_entries(zf, path, limits)
        manifest = _read_manifest(zf, path, limits)
    info = MarInfo(path, manifest, entries, _sha256(path))
    _check_references(info)
    return info


def extract_archive(
    path: str | Path, dest: str | Path, limits: ArchiveLimits | None = None
) -> MarInfo:
    """Check ``path`` as :func:`inspect_archive` does and unpack it into ``dest`` (which
    must not exist yet); returns what it unpacked."""
    path, dest = Path(path), Path(dest)
    limits = limits or ArchiveLimits()
    if dest.exists():
        raise ArchiveError(f"Cannot unpack {path.name}: {dest} already exists.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        with _open_zip(path) as zf:
            entries = _check_entries(zf, path, limits)
            manifest = _read_manifest(zf, path, limits)
            tmp.mkdir()
            written = 0
            for member, entry in zip(zf.infolist(), entries, strict=True):
                written += _extract_one(zf, member, entry, tmp, path, limits, written)
        info = MarInfo(path, manifest, entries, _sha256(path))
        _check_references(info)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


# --- checks -----------------------------------------------------------------------------


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise ArchiveError(f"{path} does not exist or is not a file.")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveError(
            f"{path.name} is not a model archive (not a readable zip file: {exc}).",
            hint="torchship reads .mar files in TorchServe's default (zip) format; "
            "re-create it with torch-model-archiver --archive-format default.",
        ) from exc


def safe_entry_name(raw: str, source: str) -> str:
    """The entry's normalised relative name, or ``UnsafeArchiveError``."""

    def refuse(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(
            f"{source} was refused: entry {raw!r} {why}.",
            hint="Archives may hold only relative paths inside the archive.",
        )

    if not raw or "\x00" in raw:
        raise refuse("has an empty or NUL-containing name")
    if "\\" in raw:
        raise refuse("contains a backslash")
    if raw.startswith("/") or _DRIVE.match(raw):
        raise refuse("is an absolute path")
    parts = [p for p in PurePosixPath(raw).parts if p not in ("", ".")]
    if ".." in parts:
        raise refuse("points outside the archive ('..')")
    if not parts:
        raise refuse("has no file name")
    return "/".join(parts)


def _check_entries(
    zf: zipfile.ZipFile, path: Path, limits: ArchiveLimits
) -> tuple[ArchiveEntry, ...]:
    members = zf.infolist()
    if len(members) > limits.max_entries:
        raise ArchiveTooLargeError(
            f"{path.name} holds {len(members)} entries; at most {limits.max_entries} are accepted."
        )
    seen: set[str] = set()
    total = 0
    entries = []
    for m in members:
        name = safe_entry_name(m.filename, path.name)
        mode = m.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise UnsafeArchiveError(
                f"{path.name} was refused: entry {m.filename!r} is a symbolic link.",
                hint="Put the file itself into the archive, not a link to it.",
            )
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(
                f"{path.name} was refused: entry {m.filename!r} is not a regular file "
                f"(mode {oct(mode)})."
            )
        if m.flag_bits & 0x1:
            raise UnsafeArchiveError(f"{path.name} was refused: entry {m.filename!r} is encrypted.")
        if name in seen:
            raise UnsafeArchiveError(f"{path.name} was refused: {name!r} appears twice.")
        seen.add(name)
        is_dir = m.is_dir() or kind == stat.S_IFDIR
        if not is_dir:
            total += m.file_size
            if total > limits.max_total_bytes:
                raise ArchiveTooLargeError(
                    f"{path.name} unpacks to more than {limits.max_total_bytes} bytes.",
                    hint="Raise the archive size limit if the model really is that big.",
                )
            ratio = m.file_size / max(1, m.compress_size)
            if m.file_size > limits.ratio_floor_bytes and ratio > limits.max_ratio:
                raise ArchiveTooLargeError(
                    f"{path.name} was refused: {name!r} unpacks to {ratio:.0f}x its compressed "
                    f"size (a decompression bomb?); at most {limits.max_ratio:g}x is accepted."
                )
        entries.append(ArchiveEntry(name, m.file_size, m.compress_size, is_dir))
    return tuple(entries)


def _read_manifest(zf: zipfile.ZipFile, path: Path, limits: ArchiveLimits) -> MarManifest:
    try:
        member = zf.getinfo(MANIFEST_PATH)
    except KeyError:
        raise ArchiveError(
            f"{path.name} has no {MANIFEST_PATH}: it is not a TorchServe model archive.",
            hint="Build it with torchship archive or torch-model-archiver.",
        ) from None
    if member.file_size > limits.max_manifest_bytes:
        raise ArchiveTooLargeError(f"{path.name}: {MANIFEST_PATH} is implausibly large.")
    with zf.open(member) as fh:
        raw = fh.read(limits.max_manifest_bytes + 1)
    return MarManifest.parse(raw, path.name)


def _check_references(info: MarInfo) -> None:
    """Every file the manifest names must be in the archive, at its top level."""
    model = info.manifest.model
    for role, name in model.files().items():
        if "/" in name or name not in info.files:
            raise ArchiveError(
                f"{info.path.name}: the manifest's {role} {name!r} is not in the archive.",
                hint=f"It holds: {', '.join(sorted(info.files))}.",
            )
    module = model.handler.split(":", 1)[0]
    if module.endswith(".py") and module not in info.files:
        raise ArchiveError(
            f"{info.path.name}: the handler file {module!r} is not in the archive.",
            hint=f"It holds: {', '.join(sorted(info.files))}.",
        )


def _extract_one(
    zf: zipfile.ZipFile,
    member: zipfile.ZipInfo,
    entry: ArchiveEntry,
    root: Path,
    path: Path,
    limits: ArchiveLimits,
    written_before: int,
) -> int:
    target = root.joinpath(*entry.name.split("/"))
    # Belt and braces: the normalised name cannot leave root, and no parent is a link.
    if not target.resolve().is_relative_to(root.resolve()):
        raise UnsafeArchiveError(f"{path.name} was refused: {entry.name!r} leaves the folder.")
    if entry.is_dir:
        target.mkdir(parents=True, exist_ok=True)
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with zf.open(member) as src, open(target, "xb") as out:
            while block := src.read(_CHUNK):
                written += len(block)
                if written > entry.size or written_before + written > limits.max_total_bytes:
                    raise ArchiveTooLargeError(
                        f"{path.name} was refused: {entry.name!r} unpacks to more than the "
                        f"{entry.size} bytes its header declares."
                    )
                out.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ArchiveError(f"{path.name}: {entry.name!r} is corrupt ({exc}).") from exc
    os.chmod(target, 0o644)
    return written


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()
