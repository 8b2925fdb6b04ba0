"""Build and run the server image with buildah and podman (no Docker engine needed).

``build_image`` runs ``buildah bud`` on a build context (the repository root or a
``torchship package`` folder) with layer caching, so a rebuild after a code change
reuses the dependency layers. ``make_wheelhouse`` downloads the pinned requirements on
the host so the build can run with no index reachable from inside it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchship.deploy._tools import ToolFailedError, require, run
from torchship.deploy.base_image import PYTHON_VERSION
from torchship.errors import ConfigError

WHEELHOUSE_MOUNT = "/wheelhouse"
BUILD_REQUIREMENTS = ("setuptools>=68", "wheel")  # pyproject.toml's [build-system]
VARIANTS = ("cpu", "cu118", "cu121", "cu124", "cu126", "cu128", "cu129", "cu130")


@dataclass
class BuildResult:
    tag: str
    image_id: str
    seconds: float
    size_bytes: int


def make_wheelhouse(
    requirements: Path, dest: Path, *, python_version: str = PYTHON_VERSION
) -> Path:
    """Download ``requirements`` and their dependencies (and the wheel build's tools) as
    binary wheels for the image's Python.

    Uses this environment's pip configuration (index, find-links), so a torch wheel
    that lies on disk is taken from there. Wheels already in ``dest`` are not fetched
    again.
    """
    dest.mkdir(parents=True, exist_ok=True)
    build_reqs = dest / ".build-requirements.txt"
    build_reqs.write_text("\n".join(BUILD_REQUIREMENTS) + "\n")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--dest",
            str(dest),
            "-r",
            str(requirements),
            "-r",
            str(build_reqs),
        ],
        what="pip download (wheelhouse)",
        timeout=1800,
    )
    return dest


def build_image(
    context: Path,
    tag: str,
    *,
    dockerfile: Path | None = None,
    variant: str = "cpu",
    wheelhouse: Path | None = None,
    target: str | None = None,
    quiet: bool = True,
) -> BuildResult:
    """``buildah bud`` the image (docker format, so HEALTHCHECK is kept; layers cached).

    ``variant`` is the Dockerfile's ``TORCH_INDEX`` (cpu, cu128, ...). With ``wheelhouse``
    the build installs only from that folder (mounted read-only), with no index.
    """
    buildah = require("buildah")
    if variant not in VARIANTS:
        raise ConfigError(
            f"Unknown variant {variant!r}.", hint=f"Use one of: {', '.join(VARIANTS)}."
        )
    dockerfile = dockerfile or context / "Dockerfile"
    if not dockerfile.is_file():
        raise ConfigError(f"No Dockerfile at {dockerfile}.")
    cmd = [
        buildah,
        "bud",
        "--format",
        "docker",
        "--layers",
        "--force-rm",  # a failed step leaves no working container behind
        "--file",
        str(dockerfile),
        "--tag",
        tag,
        "--build-arg",
        f"TORCH_INDEX={variant}",
    ]
    if target:
        cmd += ["--target", target]
    if wheelhouse is not None:
        cmd += [
            "--volume",
            f"{wheelhouse.resolve()}:{WHEELHOUSE_MOUNT}:ro",
            "--build-arg",
            "PIP_NO_INDEX=1",
            "--build-arg",
            f"PIP_FIND_LINKS={WHEELHOUSE_MOUNT}",
        ]
    if quiet:
        cmd.append("--quiet")
    start = time.monotonic()
    try:
        run([*cmd, str(context)], what=f"buildah bud {tag}", timeout=3600)
    except ToolFailedError as exc:
        if wheelhouse is None:  # most often: no index (or its certificates) from the build
            exc.hint = (
                f"{exc.hint} If pip could not reach its index from inside the build, "
                "build with --offline: the wheels are downloaded here and mounted."
            )
        raise
    seconds = time.monotonic() - start
    info = inspect_image(tag)
    return BuildResult(tag, str(info["Id"]), seconds, int(info.get("Size", 0)))


def inspect_image(name: str) -> dict[str, Any]:
    podman = require("podman")
    out = run([podman, "image", "inspect", name], what="podman image inspect")
    data = json.loads(out)
    return dict(data[0])


def ulimit_args() -> list[str]:
    """Explicit ``--ulimit`` flags within this process's own hard limits.

    podman's default raises the container's limits to the maximum; where the caller lacks
    CAP_SYS_RESOURCE (sandboxes, CI runners) runc then fails with 'error setting rlimits'.
    A model server needs far less than either limit.
    """
    flags = []
    for name, rlim, want in (
        ("nofile", resource.RLIMIT_NOFILE, 8192),
        ("nproc", resource.RLIMIT_NPROC, 4096),
    ):
        _soft, hard = resource.getrlimit(rlim)
        value = want if hard == resource.RLIM_INFINITY else min(hard, want)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


def run_container(
    image: str,
    *,
    name: str,
    port: int,
    host: str = "127.0.0.1",
    read_only: bool = True,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> str:
    """Start ``image`` detached, its port 8000 published on ``host:port``; returns its id.

    ``read_only`` runs it as Kubernetes' ``readOnlyRootFilesystem`` would, with a tmpfs
    at /tmp as the only writable place.
    """
    podman = require("podman")
    cmd = [podman, "run", "--detach", "--name", name, "--publish", f"{host}:{port}:8000"]
    cmd += ulimit_args()
    if read_only:
        cmd += ["--read-only", "--tmpfs", "/tmp"]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    out = run([*cmd, image, *args], what=f"podman run {image}")
    return out.strip().splitlines()[-1]


def stop_container(name: str, *, timeout: int = 30) -> int:
    """SIGTERM the container (SIGKILL after ``timeout`` s) and return its exit code."""
    podman = require("podman")
    run([podman, "stop", "--time", str(timeout), name], what="podman stop")
    out = run([podman, "inspect", "--format", "{{.State.ExitCode}}", name], what="podman inspect")
    return int(out.strip())


def container_logs(name: str) -> str:
    podman = require("podman")
    proc = subprocess.run(
        [podman, "logs", name], capture_output=True, text=True, check=False, timeout=30
    )
    return proc.stdout + proc.stderr


def remove_container(name: str) -> None:
    podman = require("podman")
    subprocess.run(
        [podman, "rm", "--force", "--ignore", name], capture_output=True, check=False, timeout=60
    )


def healthcheck(name: str) -> bool:
    """Run the image's HEALTHCHECK once now (podman has no scheduler here); True if healthy."""
    podman = require("podman")
    proc = subprocess.run(
        [podman, "healthcheck", "run", name], capture_output=True, check=False, timeout=60
    )
    return proc.returncode == 0


def prune_images(label: str = "org.opencontainers.image.title=torchship") -> None:
    """Remove untagged images a rebuild left behind (their shared layers stay)."""
    podman = require("podman")
    subprocess.run(
        [podman, "image", "prune", "--force", "--filter", f"label={label}"],
        capture_output=True,
        check=False,
        timeout=300,
    )


def why_no_image() -> str | None:
    """Why images cannot be built and run here (None: they can)."""
    import shutil

    from torchship.deploy.base_image import BASE_IMAGE, image_exists

    for tool in ("buildah", "podman"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install buildah podman)"
    if not image_exists(BASE_IMAGE):
        if os.geteuid() != 0:
            return f"{BASE_IMAGE} is missing, and making it with debootstrap needs root"
        if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
            return f"{BASE_IMAGE} is missing, and debootstrap is not installed"
    return None


def wait_ready(base_url: str, *, timeout: float = 120.0, name: str | None = None) -> float:
    """Poll ``base_url``/health/ready until 200; the seconds it took. With ``name`` (a
    container), a container that exits early ends the wait with its logs."""
    import requests

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if requests.get(f"{base_url}/health/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:
            pass
        if name is not None and not _running(name):
            raise ToolFailedError(f"container {name} exited:\n{container_logs(name)[-3000:]}")
        time.sleep(0.1)
    raise ToolFailedError(f"{base_url} was not ready after {timeout:.0f} s.")


def _running(name: str) -> bool:
    podman = require("podman")
    proc = subprocess.run(
        [podman, "inspect", "--format", "{{.State.Running}}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() == "true"


def default_wheelhouse() -> Path:
    """Where wheelhouses are cached between runs: ``$TORCHSHIP_WHEELHOUSE`` or ~/.cache."""
    env = os.environ.get("TORCHSHIP_WHEELHOUSE")
    if env:
        return Path(env)
    return (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchship" / "wheelhouse"
    )


__all__ = [
    "BuildResult",
    "ToolFailedError",
    "build_image",
    "container_logs",
    "default_wheelhouse",
    "healthcheck",
    "inspect_image",
    "make_wheelhouse",
    "prune_images",
    "remove_container",
    "run_container",
    "stop_container",
    "ulimit_args",
    "wait_ready",
    "why_no_image",
]
