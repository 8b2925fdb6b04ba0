"""Pinned requirements: the exact versions this environment runs, for a reproducible image."""

from __future__ import annotations

import importlib.metadata as md

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from torchship.errors import MissingDependencyError

HEADER = """\
# Pinned by `torchship package` from the environment that verified the model: every package
# torchship needs at run time, at the exact version installed there. torch is pinned without
# its local label (+cpu, +cu128): the Dockerfile's TORCH_INDEX build arg picks the build.
"""


def pinned_requirements(root: str = "torchship", extras: tuple[str, ...] = ()) -> list[str]:
    """``name==version`` for ``root``'s installed dependency closure (``root`` excluded).

    Markers are evaluated for this interpreter, so only what this platform installs is
    pinned; a package required with extras pulls in the extras' dependencies too.
    """
    found: dict[str, tuple[md.Distribution, set[str]]] = {}
    todo: list[tuple[str, set[str]]] = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise MissingDependencyError(name, "dev", f"Pinning {root}'s requirements") from None
        key = canonicalize_name(dist.metadata["Name"])
        seen = found.get(key)
        if seen is not None and wanted <= seen[1]:
            continue
        found[key] = (dist, (seen[1] if seen else set()) | wanted)
        for line in dist.requires or []:
            req = Requirement(line)
            if _applies(req.marker, found[key][1]):
                todo.append((req.name, set(req.extras)))
    pins = [
        f"{dist.metadata['Name']}=={_public(dist.version)}"
        for key, (dist, _) in sorted(found.items())
        if key != canonicalize_name(root)
    ]
    return pins


def _applies(marker: Marker | None, extras: set[str]) -> bool:
    if marker is None:
        return True
    return any(marker.evaluate({"extra": extra}) for extra in extras or {""})


def _public(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: the local label names a build, not a release."""
    return version.split("+", 1)[0]
