"""Lesson 08 runs to completion: archives, native serving, real TorchServe (with Java)."""

from __future__ import annotations

import pytest
from serving_utils import run_lesson

from torchship.torchserve.process import java_available

pytestmark = pytest.mark.slow


def test_lesson_08_runs_to_completion() -> None:
    out, _ = run_lesson("08_torchserve_deployment.py", timeout=300)
    for expected in (
        "evil.mar refused (422)",
        "a bad image gets 400",
        "Workers scaled to 2 for model: digits_images",
        'Model "digits_tensors" unregistered',
        "native server stopped (exit 0)",
        "same answers from every server: True",
    ):
        assert expected in out, f"lesson 08 did not print {expected!r}\n{out}"
    if java_available() is not None:
        assert "TorchServe stopped; running: False" in out
        assert out.count("digits_images") >= 4
    else:
        assert "real TorchServe is skipped" in out
