"""Open, check and unpack model archives without trusting anything inside them.

A model archive (a zip ``.mar``, a ``.tar.gz`` or a folder: see
:mod:`torchship.archive.sources`) is something a stranger may have built, so before a
byte is written:

* every entry name must stay inside the extraction folder: no absolute paths, drive
  letters, backslashes, ``..`` segments or NUL bytes (zip-slip, tar-slip);
* only regular files and folders: symlinks, hard links and device files are refused;
* no encrypted entries and no name twice;
* bounded: at most ``max_entries`` entries and ``max_total_bytes`` unpacked, and no zip
  entry (or whole ``.tar.gz``) over ``max_ratio`` times its compressed size
  (decompression bombs). Declared sizes can lie, so extraction also counts the bytes it
  really writes.

A ``.tar.gz`` from ``torch-model-archiver --archive-format tgz`` keeps its files under
one ``MODEL_NAME/`` folder; that folder is read as the archive's top level.

Extraction goes to a temp folder beside the target and is renamed into place, so a
refused archive leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from torchship.archive.errors import ArchiveError, ArchiveTooLargeError, UnsafeArchiveError
from torchship.archive.manifest import MANIFEST_PATH, MarManifest
from torchship.archive.sources import (
    READ_ERRORS,
    ArchiveLimits,
    Format,
    Member,
    Source,
    open_source,
)

__all__ = [
    "ArchiveEntry",
    "ArchiveLimits",
    "MarInfo",
    "extract_archive",
    "inspect_archive",
    "safe_entry_name",
]

_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveEntry:
    name: str  # relative to the archive's top level
    size: int
    compressed_size: int | None  # zip entries only
    is_dir: bool


@dataclass(frozen=True)
class MarInfo:
    """A checked archive: where it is, its manifest and what it holds."""

    path: Path
    manifest: MarManifest
    entries: tuple[ArchiveEntry, ...]
    sha256: str
    format: Format = "zip"

    @property
    def files(self) -> set[str]:
        return {e.name for e in self.entries if not e.is_dir}

    @property
    def unpacked_bytes(self) -> int:
        return sum(e.size for e in self.entries)


Checked = list[tuple[Member, ArchiveEntry]]


def inspect_archive(path: str | Path, limits: ArchiveLimits | None = None) -> MarInfo:
    """Check every entry of ``path`` and read its manifest; unpacks nothing."""
    path = Path(path)
    limits = limits or ArchiveLimits()
    with open_source(path, limits) as src:
        checked = _check_entries(src, limits)
        manifest = _read_manifest(src, checked, limits)
        digest = _sha256(src, checked)
    info = MarInfo(path, manifest, tuple(e for _, e in checked), digest, src.format)
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
        with open_source(path, limits) as src:
            checked = _check_entries(src, limits)
            manifest = _read_manifest(src, checked, limits)
            tmp.mkdir()
            written = 0
            for member, entry in checked:
                written += _extract_one(src, member, entry, tmp, path, limits, written)
            digest = _sha256(src, checked)
        entries = tuple(e for _, e in checked)
        info = MarInfo(path, manifest, entries, digest, src.format)
        _check_references(info)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


# --- checks -----------------------------------------------------------------------------


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


def _check_entries(src: Source, limits: ArchiveLimits) -> Checked:
    name = src.path.name
    # links, special files and encrypted entries were refused as they were listed
    members = [m for m in src.members(limits) if not _is_root(m)]
    names = _top_level([safe_entry_name(m.raw_name, name) for m in members])
    seen: set[str] = set()
    checked: Checked = []
    for m, entry_name in zip(members, names, strict=True):
        if entry_name is None:
            continue  # the folder a .tar.gz keeps everything in
        if entry_name in seen:
            raise UnsafeArchiveError(f"{name} was refused: {entry_name!r} appears twice.")
        seen.add(entry_name)
        is_dir = m.kind == "dir"
        if not is_dir and m.compressed_size is not None:
            ratio = m.size / max(1, m.compressed_size)
            if m.size > limits.ratio_floor_bytes and ratio > limits.max_ratio:
                raise ArchiveTooLargeError(
                    f"{name} was refused: {entry_name!r} unpacks to {ratio:.0f}x its "
                    f"compressed size (a decompression bomb?); at most "
                    f"{limits.max_ratio:g}x is accepted."
                )
        size = 0 if is_dir else m.size
        checked.append((m, ArchiveEntry(entry_name, size, m.compressed_size, is_dir)))
    return checked


def _is_root(m: Member) -> bool:
    """The archive's own folder entry (``./`` in ``tar -czf m.tar.gz -C folder .``)."""
    return m.kind == "dir" and all(p in ("", ".") for p in m.raw_name.split("/"))


def _top_level(names: list[str]) -> list[str | None]:
    """Names relative to the archive's top level: where the manifest is not at the root
    but in one folder holding everything (TorchServe's tgz layout), inside that folder.
    The folder's own entry becomes None."""
    if MANIFEST_PATH in names:
        return list(names)
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1:
        return list(names)
    (top,) = tops
    if f"{top}/{MANIFEST_PATH}" not in names:
        return list(names)
    return [None if n == top else n[len(top) + 1 :] for n in names]


def _read_manifest(src: Source, checked: Checked, limits: ArchiveLimits) -> MarManifest:
    found = [m for m, e in checked if e.name == MANIFEST_PATH and not e.is_dir]
    if not found:
        raise ArchiveError(
            f"{src.path.name} has no {MANIFEST_PATH}: it is not a TorchServe model archive.",
            hint="Build it with torchship archive or torch-model-archiver.",
        )
    (member,) = found
    if member.size > limits.max_manifest_bytes:
        raise ArchiveTooLargeError(f"{src.path.name}: {MANIFEST_PATH} is implausibly large.")
    try:
        with src.open(member) as fh:
            raw = fh.read(limits.max_manifest_bytes + 1)
    except READ_ERRORS as exc:
        raise ArchiveError(f"{src.path.name}: {MANIFEST_PATH} is corrupt ({exc}).") from exc
    return MarManifest.parse(raw, src.path.name)


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
    src: Source,
    member: Member,
    entry: ArchiveEntry,
    root: Path,
    path: Path,
    limits: ArchiveLimits,
    written_before: int,
) -> int:
    target = root.joinpath(*entry.name.split("/"))
    written = 0
    try:
        # Belt and braces: the normalised name cannot leave root, and no parent is a link.
        if not target.resolve().is_relative_to(root.resolve()):
            raise UnsafeArchiveError(f"{path.name} was refused: {entry.name!r} leaves the folder.")
        if entry.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            return 0
        target.parent.mkdir(parents=True, exist_ok=True)
        with src.open(member) as fh, open(target, "xb") as out:
            while block := fh.read(_CHUNK):
                written += len(block)
                if written > entry.size or written_before + written > limits.max_total_bytes:
                    raise ArchiveTooLargeError(
                        f"{path.name} was refused: {entry.name!r} unpacks to more than the "
                        f"{entry.size} bytes its header declares."
                    )
                out.write(block)
        os.chmod(target, 0o644)
    except (FileExistsError, NotADirectoryError) as exc:  # "a" as a file and "a/b"
        raise UnsafeArchiveError(
            f"{path.name} was refused: {entry.name!r} collides with another entry."
        ) from exc
    except READ_ERRORS as exc:  # damaged data, or a name this filesystem cannot hold
        raise ArchiveError(f"{path.name}: {entry.name!r} cannot be unpacked ({exc}).") from exc
    return written


def _sha256(src: Source, checked: Checked) -> str:
    """The archive file's SHA-256; for a folder, over its checked files in order, each as
    name, length and content (so no two layouts hash alike)."""
    digest = hashlib.sha256()
    if src.format != "folder":
        with src.path.open("rb") as fh:
            while block := fh.read(_CHUNK):
                digest.update(block)
        return digest.hexdigest()
    for member, entry in sorted(checked, key=lambda pair: pair[1].name):
        if entry.is_dir:
            continue
        digest.update(f"{entry.name}\x00{entry.size}\x00".encode())
        with src.open(member) as fh:
            while block := fh.read(_CHUNK):
                digest.update(block)
    return digest.hexdigest()
