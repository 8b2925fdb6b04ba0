"""Lesson 10 runs as the module shows it: the table, the plot, the picked variant."""

from __future__ import annotations

from serving_utils import ROOT, run_lesson


def test_lesson_10_prints_the_table_and_writes_the_plot() -> None:
    png = ROOT / "runs" / "lesson_10" / "accuracy_vs_latency.png"
    out, _ = run_lesson("10_inference_optimization.py", timeout=240)
    for expected in (
        "and its optimized versions",
        "fp32 eager",
        "dynamic-int8",
        "prune-structured",
        "distill",
        "bf16",
        "plot saved",
    ):
        assert expected in out, f"lesson 10 did not print {expected!r}"
    assert "skipped: no CUDA" in out or "cuda-graphs: saved" in out
    assert "digits:optimized ->" in out or "nothing fits the budget" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = ROOT / "runs" / "lesson_10" / "report"
    assert (report / "optimize.md").is_file() and (report / "optimize.json").is_file()
