"""Running the external programs deployment needs, with errors that say what to do."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from torchship.errors import TorchshipError


class ToolNotFoundError(TorchshipError):
    """A program (buildah, podman, debootstrap, nginx) is not installed."""

    status_code = 501
    code = "tool_not_found"


class ToolFailedError(TorchshipError):
    """A program ran and failed; the message carries the end of its output."""

    status_code = 500
    code = "tool_failed"


DEBIAN_PACKAGES = {
    "buildah": "buildah",
    "podman": "podman",
    "debootstrap": "debootstrap",
    "nginx": "nginx",
}


def require(program: str) -> str:
    """The path of ``program``, or a ``ToolNotFoundError`` naming the package to install."""
    path = shutil.which(program) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / program).is_file()), None
    )
    if path is None:
        package = DEBIAN_PACKAGES.get(program, program)
        raise ToolNotFoundError(
            f"{program} is not installed.",
            hint=f"apt-get install {package} (or: sudo make system-deps).",
        )
    return path


def run(
    cmd: Sequence[str],
    *,
    what: str,
    input: bytes | None = None,
    timeout: float | None = None,
    capture: bool = True,
) -> str:
    """Run ``cmd``; return its stdout, or raise ``ToolFailedError`` with its last lines."""
    proc = subprocess.run(
        list(cmd),
        input=input,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout.decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise ToolFailedError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd[:3])} ...\n{tail}",
            hint="Read the output above; rerun the command by hand to see all of it.",
        )
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
