"""Argument types shared by the CLI's commands."""

from __future__ import annotations

import argparse
import math
from typing import TypeAlias

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def int_or_auto(value: str) -> int | str:
    """A count such as ``--workers 4``, or ``auto`` to let torchship measure and choose."""
    return value if value == "auto" else int(value)


def top_k_count(value: str) -> int:
    """``--top-k``: 1 to 1000, as the server takes it."""
    k = int(value)
    if not 1 <= k <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000, got {k}")
    return k


def non_negative(value: str) -> float:
    """A tolerance: a finite number >= 0."""
    x = float(value)
    if not (math.isfinite(x) and x >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value}")
    return x
