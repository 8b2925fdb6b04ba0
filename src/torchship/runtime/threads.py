"""CPU thread settings: the main performance trap of CPU inference is oversubscription.

PyTorch and ONNX Runtime each start a pool sized to the machine's cores. Several such
pools in one process (two runtimes, several workers, a web server's own threads) fight
for the same cores and every request gets slower. Pick one number per process and give
it to every runtime: ``set_threads(n)`` for torch, the same ``threads`` for ONNX Runtime
sessions (``load_predictor(..., threads=n)`` does both).

With ``threads=None`` torchship leaves torch's setting as it is (its default: one
thread per physical core) and gives ONNX Runtime the same count, so the two are
compared fairly. Running ``k`` worker processes on ``c`` cores? Use ``threads=c // k``.
"""

from __future__ import annotations

import logging

import torch

from torchship.errors import ConfigError

logger = logging.getLogger(__name__)


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads for torch in this process (and ``n`` inter-op if possible).

    Inter-op threads can only be set before torch first uses its inter-op pool; after
    that torch raises, and the existing setting is kept (logged at DEBUG).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"threads must be a positive integer, got {n!r}.")
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError as exc:  # "cannot set number of interop threads after ..."
            logger.debug(
                "torch inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc
            )


def resolve_threads(threads: int | None) -> int:
    """The thread count a runtime should use: ``threads``, else torch's current setting."""
    if threads is None:
        return torch.get_num_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads must be a positive integer or None, got {threads!r}.")
    return threads
