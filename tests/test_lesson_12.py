"""Lesson 12 runs to completion and shows each protection working."""

from __future__ import annotations

import os

import pytest
from serving_utils import run_lesson


@pytest.mark.slow
def test_lesson_12_shows_every_protection() -> None:
    out, _ = run_lesson("12_production_best_practices.py", env={**os.environ, "COLUMNS": "200"})
    for expected in [
        "no key │ /predict │ 401 │ This endpoint needs an API key.",  # a refused key
        "lacks the 'admin' scope",  # a key without the scope
        "Bearer realm=",
        "│ 429 │ 0 │ 1 │",  # a 429 and its headers
        "its headers: Retry-After: 1, RateLimit-Limit: 10, RateLimit-Remaining: 0",
        "first time │ MISS │ 1",  # a cache miss, then a hit
        "same image again │ HIT │ 1",
        "BYPASS",
        "after switching to version 2 │ MISS │ 2",
        "a hit skips decoding and the model",
        'torchship_cache_hits_total{model="digits",version="1"}',
        "nosniff",
        "from https://evil.example -> 403",
        "│ 200 │ 503 │ 503 │",  # live before startup and ready during warm-up
        "│ 503 │ 200 (Connection: close) │",  # not ready, still serving, while draining
        "server stopped (exit 0)",
    ]:
        assert expected in out, f"lesson 12 did not print {expected!r}"
