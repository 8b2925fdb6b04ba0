"""Lesson 06 runs offline to completion and shows what it promises."""

from __future__ import annotations

from serving_utils import run_lesson


def test_lesson_06_runs_and_resumes_exactly_once() -> None:
    out, _ = run_lesson("06_batch_inference.py")
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
