"""Lesson 08 runs to completion: archives, native serving, real TorchServe (with Java)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from serving_utils import ROOT

from torchship.torchserve.process import java_available

pytestmark = pytest.mark.slow


def test_lesson_08_runs_to_completion() -> None:
    proc = subprocess.run(
        [sys.executable, "08_torchserve_deployment.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())  # rich wraps long lines
    for expected in (
        "evil.mar refused (422)",
        "a bad image gets 400",
        "Workers scaled to 2 for model: digits_images",
        'Model "digits_tensors" unregistered',
        "native server stopped (exit 0)",
        "same answers from every server: True",
    ):
        assert expected in out, f"lesson 08 did not print {expected!r}\n{proc.stdout}"
    if java_available() is not None:
        assert "TorchServe stopped; running: False" in out
        assert out.count("digits_images") >= 4
    else:
        assert "real TorchServe is skipped" in out
