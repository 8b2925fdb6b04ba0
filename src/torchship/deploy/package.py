"""``torchship package``: a ready-to-build container context for one model version.

The folder has the repository's build layout, so the project's own Dockerfile builds it
unchanged::

    Dockerfile              the project's deploy/docker/Dockerfile, verbatim
    .dockerignore
    requirements.txt        pinned: the exact versions this environment runs
    pyproject.toml, README.md, src/torchship/   torchship's source (the builder makes a wheel)
    deploy/docker/entrypoint.py                 the image's PID 1
    models/<name>/<version>/                    the model, checksums verified before and after
    models/<name>/aliases.json                  production -> that version
    configs/serve.yaml      the server's settings
    torchship-package.json  what was packaged (model, files, sha256, versions)
    DEPLOY.md               how to build and run it

It is written to a temp folder beside ``out`` and renamed into place, so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import json
import platform
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from torchship import __version__
from torchship.deploy.requirements import HEADER, pinned_requirements
from torchship.errors import ConfigError
from torchship.serving.settings import ServeSettings
from torchship.settings import load_settings
from torchship.store import ModelStore, parse_ref
from torchship.store.store import DEFAULT_ALIAS, MANIFEST

MARKER = "torchship-package.json"
DOCKERFILE = Path("deploy/docker/Dockerfile")
ENTRYPOINT = Path("deploy/docker/entrypoint.py")
SOURCE_FILES = ("pyproject.toml", "README.md")
DOCKERIGNORE = """\
**/__pycache__
**/*.pyc
DEPLOY.md
torchship-package.json
"""
# Settings a package may fix in configs/serve.yaml; store, host and port come from the image.
SERVE_KEYS = ("framework", "workers", "runtime", "max_batch_size", "max_delay_ms", "timeout_s")


@dataclass
class PackageInfo:
    """What ``write_package`` wrote."""

    path: Path
    model: str
    version: str
    files: dict[str, str] = field(default_factory=dict)  # path in the context -> sha256
    requirements: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.version}"

    def default_tag(self) -> str:
        return f"torchship-{self.model}:{self.version}"


def package_tag(context: Path) -> str | None:
    """The default image tag of a folder ``torchship package`` wrote; None for others."""
    try:
        record = json.loads((context / MARKER).read_text())
        return f"torchship-{record['model']}:{record['version']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def project_root() -> Path:
    """The source checkout torchship runs from (its Dockerfile and source go in a package)."""
    import torchship

    root = Path(torchship.__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / DOCKERFILE).is_file():
        return root
    raise ConfigError(
        "torchship package needs torchship's source checkout (its Dockerfile and source "
        f"go into the image), but {root} is not one.",
        hint="Install torchship from a checkout: pip install -e /path/to/torchship.",
    )


def write_package(
    store: ModelStore,
    ref: str,
    out: str | Path,
    *,
    force: bool = False,
    **serve: Any,
) -> PackageInfo:
    """Write the build context for ``ref`` (NAME[:VERSION|ALIAS]) into ``out``.

    ``serve`` sets keys of ``configs/serve.yaml`` (framework, workers, runtime,
    max_batch_size, max_delay_ms, timeout_s). ``force`` replaces an earlier package at
    ``out``; any other non-empty folder is refused.
    """
    out = Path(out)
    unknown = set(serve) - set(SERVE_KEYS)
    if unknown:
        raise ConfigError(
            f"Unknown serve settings for a package: {', '.join(sorted(unknown))}.",
            hint=f"Use: {', '.join(SERVE_KEYS)}.",
        )
    _check_out(out, force)
    name, version = parse_ref(ref)
    version = store.resolve(name, version)
    manifest = store.verify(name, version)  # checksums, before anything is copied
    root = project_root()
    config = _serve_config(f"{name}:{version}", {k: v for k, v in serve.items() if v is not None})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        info = PackageInfo(tmp, name, version)
        # the model: its manifest and exactly the files it checksums, verified again as copied
        vdir = store.path(name, version)
        dest = tmp / "models" / name / version
        dest.mkdir(parents=True)
        for filename in [MANIFEST, *manifest.files]:
            shutil.copyfile(vdir / filename, dest / filename)
            (dest / filename).chmod(0o644)  # the store writes 0600; the image's user reads
        packaged = ModelStore(tmp / "models")
        packaged.verify(name, version)
        packaged.set_alias(name, DEFAULT_ALIAS, version)
        info.files = {
            f"models/{name}/{version}/{f}": entry.sha256 for f, entry in manifest.files.items()
        }
        # the image's build inputs
        shutil.copy2(root / DOCKERFILE, tmp / "Dockerfile")
        (tmp / ENTRYPOINT).parent.mkdir(parents=True)
        shutil.copy2(root / ENTRYPOINT, tmp / ENTRYPOINT)
        (tmp / ".dockerignore").write_text(DOCKERIGNORE)
        info.requirements = pinned_requirements()
        (tmp / "requirements.txt").write_text(HEADER + "\n".join(info.requirements) + "\n")
        for filename in SOURCE_FILES:
            shutil.copy2(root / filename, tmp / filename)
        shutil.copytree(
            root / "src" / "torchship",
            tmp / "src" / "torchship",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        (tmp / "configs").mkdir()
        (tmp / "configs" / "serve.yaml").write_text(config)
        (tmp / MARKER).write_text(json.dumps(_record(info, manifest.created_at), indent=2) + "\n")
        (tmp / "DEPLOY.md").write_text(_deploy_md(info))
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    info.path = out
    return info


def _check_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder.")
    if not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise ConfigError(
            f"{out} is not empty and is not an earlier package; nothing was written.",
            hint="Choose a new or empty folder.",
        )
    if not force:
        raise ConfigError(f"{out} already holds a package.", hint="Pass --force to replace it.")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place (an earlier package is swapped out first)."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def _serve_config(model_ref: str, serve: dict[str, Any]) -> str:
    values: dict[str, Any] = {"models": [model_ref], **serve}
    load_settings(cls=ServeSettings, **values)  # refuse bad values now, not at deploy time
    lines = [
        "# torchship serve --config configs/serve.yaml (written by torchship package).",
        "# The image sets store (/models), host (0.0.0.0) and port (8000) by environment;",
        "# TORCHSHIP_<KEY> variables override anything here at run time.",
        yaml.safe_dump(values, sort_keys=False).rstrip(),
    ]
    return "\n".join(lines) + "\n"


def _record(info: PackageInfo, created_at: str) -> dict[str, Any]:
    return {
        "model": info.model,
        "version": info.version,
        "model_created_at": created_at,
        "files": info.files,
        "torchship": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "packaged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build": f"docker build -t {info.default_tag()} .",
    }


def _deploy_md(info: PackageInfo) -> str:
    tag = info.default_tag()
    return f"""# {info.ref}, ready to build

Written by `torchship package`. The model's files were verified against their sha256
checksums before and after copying (see `torchship-package.json`).

Build (CPU; add `--build-arg TORCH_INDEX=cu128` for the CUDA build):

    docker build -t {tag} .
    # or, with no Docker engine:
    buildah bud --format docker --layers -t {tag} .
    # or: torchship image build . --tag {tag}

Run, then ask it:

    docker run --rm -p 127.0.0.1:8000:8000 {tag}
    curl -s 127.0.0.1:8000/health/ready
    curl -s -X POST 127.0.0.1:8000/predict -F file=@digit.png

`docker stop` sends SIGTERM: the server stops taking requests, finishes the ones in
flight and exits 0.
"""
