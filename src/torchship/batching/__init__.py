"""Dynamic batching shared by every front end: a collector, a batcher, a sizer.

``collect_batch`` is the plain function that takes one batch off a queue;
``DynamicBatcher`` runs it on a worker thread and hands results back to threads
(``submit``) or coroutines (``asubmit``); ``measure_batch_scaling`` picks
``max_batch_size`` from measured throughput at warm-up.
"""

from torchship.batching.batcher import DynamicBatcher, PredictFn
from torchship.batching.collect import SupportsGet, collect_batch
from torchship.batching.scaling import (
    BatchMeasurement,
    BatchScaling,
    choose_max_batch_size,
    measure_batch_scaling,
)
from torchship.batching.stats import BatcherStats, BatchEvent
from torchship.errors import InferenceError

__all__ = [
    "BatchEvent",
    "BatchMeasurement",
    "BatchScaling",
    "BatcherStats",
    "DynamicBatcher",
    "InferenceError",
    "PredictFn",
    "SupportsGet",
    "choose_max_batch_size",
    "collect_batch",
    "measure_batch_scaling",
]
