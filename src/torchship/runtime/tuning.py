"""Remember start-up measurements (runtime race, batch scaling) per model and machine.

``runtime="auto"`` and ``max_batch_size="auto"`` time the model at start-up, which costs
about a second on a small CPU model. The answer only changes when the model files, the
machine, the thread count or the library versions change, so it is kept in
``<store>/.tuning/<name>/<version>.json`` under a key made of all of those, and the
next start reuses it (the same idea as a TensorRT timing cache). Entries are hints:
a missing, stale or unreadable file just means measuring again, and a read-only store
means not remembering.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from torchship.store.manifest import Manifest

logger = logging.getLogger(__name__)

DIR = ".tuning"


@functools.lru_cache(maxsize=1)
def _machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("torch", "onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "arch": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }


def tuning_key(manifest: Manifest, *, device: str, threads: int | None, **extra: Any) -> str:
    """A digest of everything a start-up measurement depends on."""
    parts = {
        "files": {k: f.sha256 for k, f in sorted(manifest.files.items())},
        "machine": _machine(),
        "device": device,
        "threads": threads if threads is not None else torch.get_num_threads(),
        **extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class TuningCache:
    """Start-up measurements of one store, keyed by :func:`tuning_key`."""

    def __init__(
        self, store_root: str | Path, *, enabled: bool = True, refresh: bool = False
    ) -> None:
        self.root = Path(store_root) / DIR
        self.enabled = enabled
        self.refresh = refresh
        """Measure again (and record) even when an entry exists."""

    def _path(self, manifest: Manifest) -> Path:
        return self.root / manifest.name / f"{manifest.version}.json"

    def get(self, manifest: Manifest, kind: str, key: str) -> dict[str, Any] | None:
        if not self.enabled or self.refresh:
            return None
        try:
            data = json.loads(self._path(manifest).read_text())
            entry = data[kind][key]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return entry if isinstance(entry, dict) else None

    def put(self, manifest: Manifest, kind: str, key: str, entry: dict[str, Any]) -> None:
        """Record ``entry``; never fails the caller (the store may be read-only)."""
        if not self.enabled:
            return
        path = self._path(manifest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                data = json.loads(path.read_text())
                if not isinstance(data, dict):
                    data = {}
            except (OSError, ValueError):
                data = {}
            section = data.setdefault(kind, {})
            if not isinstance(section, dict) or len(section) > 32:  # old machines age out
                section = data[kind] = {}
            section[key] = {**entry, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: concurrent workers never see half a file
        except OSError as exc:
            logger.info("tuning cache not written (%s): %s", path, exc)
