"""``--accuracy-budget``: the fastest variant whose accuracy drop is within the budget.

"Fastest" means the most items/s at batch 32 (throughput, what a batch job or a server
with dynamic batching sees). A variant must also beat the fp32 parent there by at least
``MIN_SPEEDUP``: tagging something slower, or a tie within one run's noise, as
"optimized" would be wrong even if it is accurate. A pick that is slower than the parent
on single requests says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchship.optimize.report import VariantRow, points

EPSILON = 1e-9  # drops are float arithmetic on percentages
MIN_SPEEDUP = 1.05  # interleaved rounds still move a few percent from run to run


def pick_within_budget(
    rows: Sequence[VariantRow], budget_points: float
) -> tuple[VariantRow | None, str]:
    """The chosen row (or None) and a sentence saying why."""
    measured = [
        r for r in rows if r.status == "ok" and r.drop_points is not None and r.speedup is not None
    ]
    if not measured:
        return None, "no variant was measured"
    within = [
        r
        for r in measured
        if r.drop_points is not None and r.drop_points <= budget_points + EPSILON
    ]
    faster = [r for r in within if r.speedup is not None and r.speedup >= MIN_SPEEDUP]
    if not faster:
        closest = min(measured, key=lambda r: r.drop_points or 0.0)
        if not within:
            why = (
                f"every variant drops more than {points(budget_points)} (the smallest drop is "
                f"{closest.method} with {closest.drop_points:.2f})"
            )
        else:
            why = (
                f"{', '.join(r.method for r in within)} stay within {points(budget_points)} "
                f"but none is faster than the parent at batch 32 by {MIN_SPEEDUP:.2f}x or more"
            )
        return None, why
    best = max(faster, key=lambda r: r.items_per_s or 0.0)
    why = (
        f"the most items/s at batch 32 ({best.speedup:.2f}x the parent) among "
        f"{len(faster)} variant(s) within {points(budget_points)} and faster than the parent"
    )
    if best.latency_speedup is not None and best.latency_speedup < 1.0:
        why += (
            f"; note: slower than the parent on single requests ({best.latency_speedup:.2f}x "
            "at batch 1), so it pays where requests are batched"
        )
    return best, why
