"""Check an exported artifact against the eager model on real inputs.

An export can silently change what a model computes: tracing bakes in one branch of an
``if``, a fixed batch size, a Python constant. The only proof is to run both on real
inputs, at several batch sizes, and compare.

Pass/fail uses a tolerance scaled to the outputs' magnitude::

    max |candidate - reference| <= tolerance + rtol * max |reference|

with ``rtol`` defaulting to ``tolerance``. Logits of size 20 may differ by ~1e-5
between float32 kernels, which a flat 1e-4 would still accept, but outputs of size
1e4 legitimately differ by more; the relative term keeps one default sensible for
both. The recorded ``Verification.tolerance`` is that effective bound.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from torchship.errors import ConfigError, ExportVerificationError, InvalidInputError
from torchship.runtime._inputs import fill_batch
from torchship.store.manifest import Verification

Model = Callable[[torch.Tensor], torch.Tensor]

ITEMS_PER_BATCH_SIZE = 32  # small batch sizes still cover this many inputs
LATENCY_BUDGET_S = 0.05  # per model, batch 1
LATENCY_MAX_RUNS = 50


def verify_outputs(
    reference: Model,
    candidate: Model,
    inputs: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    tolerance: float = 1e-4,
    rtol: float | None = None,
) -> Verification:
    """Compare ``candidate`` with ``reference`` on ``inputs`` at each batch size.

    For batch size ``b`` the inputs are run in consecutive chunks of ``b`` covering
    ``max(b, min(len(inputs), 32))`` items (cycling when ``b`` exceeds the inputs), so
    batch 1 still sees many different items. A numerical difference gives
    ``passed=False``; a candidate that raises or returns another shape raises
    ``ExportVerificationError``, since there is nothing to compare.

    Also records the median batch-1 latency of both (interleaved, about 0.1 s).
    """
    if inputs.ndim == 0 or len(inputs) == 0:
        raise InvalidInputError("verify_outputs needs at least one input item.")
    rtol = tolerance if rtol is None else rtol
    if not (tolerance >= 0 and rtol >= 0):  # also catches NaN
        raise ConfigError(f"tolerance and rtol must be >= 0, got {tolerance} and {rtol}.")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise InvalidInputError(f"batch_sizes must be positive, got {list(batch_sizes)}.")
    worst = 0.0
    ref_max = 0.0
    with torch.inference_mode():
        for size in sizes:
            items = fill_batch(inputs, max(size, min(len(inputs), ITEMS_PER_BATCH_SIZE)))
            for start in range(0, len(items) - size + 1, size):
                batch = items[start : start + size]
                expected = _as_tensor(reference(batch)).float()
                got = _run_candidate(candidate, batch, size)
                if got.shape != expected.shape:
                    raise ExportVerificationError(
                        f"At batch size {size} the export returned shape {tuple(got.shape)}, "
                        f"the eager model {tuple(expected.shape)}.",
                        hint="Was it exported with a fixed batch size? Use a dynamic batch axis.",
                    )
                diff = (got.float() - expected).abs().max().item() if got.numel() else 0.0
                worst = math.inf if math.isnan(diff) else max(worst, diff)
                if expected.numel():
                    ref_max = max(ref_max, expected.abs().max().item())
        allowed = tolerance + rtol * ref_max
        one = fill_batch(inputs, 1)
        ref_ms, cand_ms = _median_latency_ms(reference, candidate, one)
    return Verification(
        batch_sizes=sizes,
        max_abs_diff=worst,
        tolerance=allowed,
        passed=worst <= allowed,
        latency_ms=cand_ms,
        reference_latency_ms=ref_ms,
    )


def _run_candidate(candidate: Model, batch: torch.Tensor, size: int) -> torch.Tensor:
    try:
        return _as_tensor(candidate(batch))
    except ExportVerificationError:
        raise
    except Exception as exc:
        raise ExportVerificationError(
            f"The export failed to run at batch size {size}: {type(exc).__name__}: {exc}",
            hint="Was it exported with a fixed batch size, or does it lose a code path?",
        ) from exc


def _as_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().cpu()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].detach().cpu()
    raise ExportVerificationError(f"Expected a tensor output, got {type(out).__name__}.")


def _median_latency_ms(
    reference: Model, candidate: Model, batch: torch.Tensor
) -> tuple[float, float]:
    """Median ms of each at ``batch``: one warm-up call, then interleaved runs."""
    reference(batch)
    candidate(batch)
    ref: list[float] = []
    cand: list[float] = []
    deadline = time.monotonic() + 2 * LATENCY_BUDGET_S
    while len(ref) < LATENCY_MAX_RUNS and (len(ref) < 3 or time.monotonic() < deadline):
        start = time.perf_counter()
        reference(batch)
        middle = time.perf_counter()
        candidate(batch)
        end = time.perf_counter()
        ref.append((middle - start) * 1e3)
        cand.append((end - middle) * 1e3)
    return statistics.median(ref), statistics.median(cand)
