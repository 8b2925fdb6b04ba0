"""Package names imported on first use (PEP 562), so a process that needs only part of
a package (``torchship serve``'s supervisor: settings and the store) skips torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torchship._startup import gc_paused


def lazy_names(namespace: dict[str, Any], names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` giving ``name`` from the module ``names[name]``, imported
    then (with the collector paused: it is usually torch) and kept in ``namespace``."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        with gc_paused():
            value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
