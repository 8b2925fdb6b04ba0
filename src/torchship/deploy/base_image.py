"""A local stand-in for the Dockerfile's base image, made from Debian packages.

Where no image registry is reachable, ``FROM python:3.11-slim`` has nothing to pull. This
builds a root file system with ``debootstrap`` (Debian 12 "bookworm" ships Python 3.11,
the version the official image carries), trims it, and imports it into the local
container storage that buildah and podman share, under the official image's full name,
so the Dockerfile needs no change. It is built once and reused until removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torchship.deploy._tools import ToolFailedError, require, run

log = logging.getLogger("torchship.deploy")

BASE_IMAGE = "docker.io/library/python:3.11-slim"
SUITE = "bookworm"
PYTHON_VERSION = "3.11"  # what SUITE's python3 is; wheelhouses are made for it
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Dropped from the root file system: package lists and caches, docs, man pages, locales.
TRIM = (
    "var/lib/apt/lists",
    "var/cache/apt",
    "var/cache/debconf",
    "var/log",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
CHANGES = (
    "ENV LANG=C.UTF-8",
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    'CMD ["python3"]',
    f"LABEL io.torchship.base=debootstrap-{SUITE}",
)


def image_exists(name: str) -> bool:
    """True if ``name`` is in the local container storage (buildah and podman share it)."""
    podman = require("podman")
    return subprocess.run([podman, "image", "exists", name], check=False).returncode == 0


def ensure_base_image(
    name: str = BASE_IMAGE, *, force: bool = False, mirror: str | None = None
) -> bool:
    """Make ``name`` from Debian packages unless it exists; True if it was built now.

    Needs root (debootstrap) and a reachable Debian mirror (``TORCHSHIP_DEBIAN_MIRROR``
    or ``mirror`` overrides deb.debian.org). Concurrent callers wait for one build.
    """
    with _lock():
        if not force and image_exists(name):
            return False
        debootstrap = require("debootstrap")
        podman = require("podman")
        if os.geteuid() != 0:
            raise ToolFailedError(
                f"Making {name} with debootstrap needs root.",
                hint="Run it as root (sudo torchship image base), or pull the image from a "
                "registry where one is reachable.",
            )
        mirror = mirror or os.environ.get("TORCHSHIP_DEBIAN_MIRROR") or MIRROR
        with tempfile.TemporaryDirectory(prefix="torchship-rootfs-", dir="/var/tmp") as tmp:
            root = Path(tmp) / "rootfs"
            log.warning("making %s: debootstrap %s from %s (about a minute)", name, SUITE, mirror)
            run(
                [
                    debootstrap,
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    SUITE,
                    str(root),
                    mirror,
                ],
                what="debootstrap",
                timeout=900,
            )
            _trim(root)
            archive = Path(tmp) / "rootfs.tar"
            run(
                ["tar", "--numeric-owner", "-C", str(root), "-cf", str(archive), "."],
                what="tar",
            )
            cmd = [podman, "import"]
            for change in CHANGES:
                cmd += ["--change", change]
            run([*cmd, str(archive), name], what="podman import", timeout=600)
        return True


def _trim(root: Path) -> None:
    for rel in TRIM:
        path = root / rel
        if path.is_dir():
            shutil.rmtree(path)
            path.mkdir()
    # The official image answers to `python` too.
    python = root / "usr/local/bin/python"
    if not python.exists():
        python.symlink_to("/usr/bin/python3")


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    path = Path(tempfile.gettempdir()) / "torchship-base-image.lock"
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
