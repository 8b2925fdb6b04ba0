"""Lesson 06 runs offline to completion and shows what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lesson_06_runs_and_resumes_exactly_once() -> None:
    proc = subprocess.run(
        [sys.executable, "06_batch_inference.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())  # rich wraps long lines
    for expected in [
        "302 items (2 failed)",
        "items/s",
        "The image is truncated or corrupt",
        "stopped at 150 of 302; resume to finish",
        "150 resumed past",
        "every input exactly once: True",
        "same answers as the uninterrupted run: True",
        "torchship[ray]",
    ]:
        assert expected in out, f"lesson 06 did not print {expected!r}"
