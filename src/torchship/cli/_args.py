"""Argument types shared by the CLI's commands."""

from __future__ import annotations


def int_or_auto(value: str) -> int | str:
    """A count such as ``--workers 4``, or ``auto`` to let torchship measure and choose."""
    return value if value == "auto" else int(value)
