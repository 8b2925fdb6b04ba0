"""Lesson 11 runs to completion and shows what it promises."""

from __future__ import annotations

import re

from serving_utils import run_lesson


def test_lesson_11_serves_sends_errors_and_shows_metrics_and_logs() -> None:
    out, proc = run_lesson("11_monitoring_logging.py", timeout=240)
    for expected in (
        "with 2 workers",
        "requests by status code",
        "latency of digits:1 from the histograms",
        "queue wait",
        "errors by type",
        "invalid_image",
        "inference_error",
        "gauges: 2 workers",
        '"request_id": "lesson-',
        '"password":"[REDACTED]"',
        "authorization=[REDACTED]",
        "TensorBoard run batch-digits-v1-",
        "Grafana dashboard",
        "server stopped (exit 0)",
    ):
        assert expected in out, f"lesson 11 did not print {expected!r}"
    assert "hunter2" not in out and "s3cr3t" not in out
    failed, logged = map(
        int, re.search(r"(\d+) requests failed with 500 -> (\d+) error", out).groups()
    )
    assert failed >= 1 and 1 <= logged <= failed  # one traceback per failed batch
    assert "Traceback" not in proc.stderr
