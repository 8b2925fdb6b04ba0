"""``runtime="auto"``: time each verified runtime on this machine and keep the fastest.

Which runtime wins depends on the model, the batch size, the CPU and the thread count,
so it is measured rather than guessed: a few interleaved rounds (round-robin, so a
noisy moment hits every candidate alike) on the stored examples, at one item and at a
typical batch, since a server runs both (see ``Selection.score``).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from torchship.runtime.base import Predictor, Selection

logger = logging.getLogger(__name__)

BATCH_SIZE = 8
BUDGET_S = 0.3
MIN_ROUNDS = 3
MAX_ROUNDS = 50


def measure(
    predictors: Sequence[Predictor],
    batches: Sequence[torch.Tensor],
    *,
    budget_s: float = BUDGET_S,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
) -> list[dict[str, float]]:
    """Median milliseconds per ``predict(batch)``, one dict per batch, interleaved.

    Runs one untimed call of each, then rounds until ``budget_s`` is spent (at least
    ``min_rounds``, so a slow model takes longer than the budget, never fewer samples).
    """
    for p in predictors:
        for batch in batches:
            p.predict(batch)
    samples: list[dict[str, list[float]]] = [{p.runtime: [] for p in predictors} for _ in batches]
    deadline = time.monotonic() + budget_s
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.monotonic() < deadline):
        for p in predictors:
            for batch, timings in zip(batches, samples, strict=True):
                start = time.perf_counter()
                p.predict(batch)
                timings[p.runtime].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    return [{name: statistics.median(v) for name, v in timings.items()} for timings in samples]


def pick_fastest(
    predictors: Sequence[Predictor], batch: torch.Tensor | None, *, budget_s: float = BUDGET_S
) -> tuple[Predictor, Selection]:
    """Time ``predictors`` on ``batch`` and on its first item; return the best with the evidence."""
    if len(predictors) == 1 or batch is None:
        chosen = predictors[0]
        if batch is None:
            logger.info(
                "runtime auto: no examples or input spec to time with; using %s", chosen.runtime
            )
        return chosen, Selection(chosen.runtime, {}, 0)
    if len(batch) > 1:
        full, single = measure(predictors, [batch, batch[:1]], budget_s=budget_s)
    else:
        (full,), single = measure(predictors, [batch], budget_s=budget_s), {}
    evidence = Selection(predictors[0].runtime, full, len(batch), single_ms=single)
    chosen = min(predictors, key=lambda p: evidence.score(p.runtime))
    selection = replace(evidence, chosen=chosen.runtime)
    logger.info("%s", selection)
    return chosen, selection
