"""The garbage collector off while a process starts, back on once it serves.

Importing torch, onnxruntime and the web stack creates ~200k objects; the collector
keeps walking the growing heap while they are made (a sixth of the import time
measured here) and finds next to nothing to free. The CLI pauses it first thing;
``InferenceService.start`` freezes what is alive and resumes it.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_paused = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The collector off inside the block (the package's own imports), as it was after."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def pause_gc() -> None:
    """Turn the collector off, unless someone else already did (then leave it to them)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_gc() -> None:
    """Undo :func:`pause_gc` (a no-op when it did not turn the collector off)."""
    global _paused
    if _paused:
        _paused = False
        gc.enable()
