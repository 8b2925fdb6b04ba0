"""``Predictor``: one interface over every runtime, ``predict(batch) -> outputs``.

Callers (handlers, the batcher, offline batch jobs) hand over a CPU float tensor
``(N, *input_spec.shape)`` and get CPU outputs back, whatever the runtime or device.
Subclasses implement ``_run``; the base class checks the input and moves it.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from torchship.errors import InvalidInputError, ModelLoadError
from torchship.runtime._inputs import sample_batch
from torchship.store.manifest import InputSpec, Manifest

RuntimeName = Literal["eager", "torchscript", "onnxruntime"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """Why ``runtime="auto"`` chose what it chose: median ms per candidate.

    ``timings_ms`` is per call at ``batch_size`` items, ``single_ms`` per call at one
    item; the choice is the candidate with the lowest :meth:`score`.
    """

    chosen: RuntimeName
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 8
    cached: bool = False
    """True when the timings were measured at an earlier start (see runtime.tuning)."""
    single_ms: dict[str, float] = field(default_factory=dict)

    def score(self, name: str) -> float:
        """Geometric mean of ms per item alone and ms per item in a full batch.

        A server runs both: single requests when traffic is light (latency) and full
        batches under load (throughput). Ranking by one size alone picked, for a
        1-thread ResNet-18, a runtime 1.3x slower on single requests for a 2% gain
        on batches of 8.
        """
        per_item = self.timings_ms[name] / max(self.batch_size, 1)
        single = self.single_ms.get(name)
        return per_item if single is None else math.sqrt(single * per_item)

    def __str__(self) -> str:
        ranked = sorted(self.timings_ms, key=self.score)
        how = "remembered" if self.cached else "picked"
        if self.single_ms:
            parts = [
                f"{name} {self.single_ms[name]:.3g}/{self.timings_ms[name]:.3g} ms"
                for name in ranked
            ]
            sizes = f"batch 1/{self.batch_size}"
        else:
            parts = [f"{name} {self.timings_ms[name]:.3g} ms" for name in ranked]
            sizes = f"batch {self.batch_size}"
        return f"runtime auto {how} {self.chosen} ({sizes}): " + " vs ".join(parts)


class Predictor(ABC):
    """A loaded model ready to serve. Create with :func:`torchship.runtime.load_predictor`."""

    runtime: RuntimeName

    def __init__(
        self,
        manifest: Manifest,
        device: torch.device,
        *,
        examples: torch.Tensor | None = None,
        threads: int | None = None,
    ) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.device = device
        self.threads = threads
        self.selection: Selection | None = None
        self._examples = examples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.manifest.ref!r}, runtime={self.runtime!r}, "
            f"device={str(self.device)!r})"
        )

    @property
    def input_spec(self) -> InputSpec | None:
        return self.manifest.input

    @property
    def labels(self) -> list[str] | None:
        return self.manifest.labels

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Run one batch ``(N, *input_spec.shape)``; returns the (first) output on the CPU.

        Torch runtimes run under ``torch.inference_mode``, so their outputs are
        inference tensors: read them, slice them, convert them; do not modify them in
        place or feed them to autograd (``.clone()`` first if you must).
        """
        self._check(batch)
        return self._run(batch)

    def warmup(self, batch_sizes: Iterable[int] = (1,), runs: int = 2) -> None:
        """Run each batch size ``runs`` times so lazy initialisation happens now, not on
        the first request (TorchScript's profiling executor optimises on the 2nd call).

        Uses the version's stored examples, else zeros shaped like the input spec; does
        nothing (logged at DEBUG) when neither exists.
        """
        for size in batch_sizes:
            batch = self.sample_batch(size)
            if batch is None:
                logger.debug("%s: no examples and no input spec; skipping warm-up", self)
                return
            for _ in range(runs):
                self.predict(batch)

    def sample_batch(self, size: int) -> torch.Tensor | None:
        """``size`` stored examples (cycled), else zeros of the input spec, else ``None``."""
        return sample_batch(self.input_spec, self._examples, size)

    @abstractmethod
    def close(self) -> None:
        """Release the model (and device memory). The predictor is unusable afterwards."""

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _run(self, batch: torch.Tensor) -> torch.Tensor: ...

    def _check(self, batch: torch.Tensor) -> None:
        if not isinstance(batch, torch.Tensor):
            raise InvalidInputError(f"predict() takes a torch.Tensor, got {type(batch).__name__}.")
        if not batch.is_floating_point():
            raise InvalidInputError(
                f"predict() takes a float tensor, got {batch.dtype}.",
                hint="Convert with batch.float() (and normalise as the input spec says).",
            )
        spec = self.input_spec
        if spec is not None and tuple(batch.shape[1:]) != tuple(spec.shape):
            raise InvalidInputError(
                f"{self.manifest.ref} expects batches of shape (N, "
                f"{', '.join(map(str, spec.shape))}), got {tuple(batch.shape)}.",
                hint="Add the batch dimension: a single item x becomes x.unsqueeze(0).",
            )
        if batch.ndim == 0 or batch.shape[0] == 0:
            raise InvalidInputError("predict() needs a batch with at least one item.")


class TorchPredictor(Predictor):
    """Shared by eager and TorchScript: inference mode, pinned host-device copies."""

    def __init__(
        self,
        module: torch.nn.Module,
        manifest: Manifest,
        device: torch.device,
        *,
        examples: torch.Tensor | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(manifest, device, examples=examples, threads=threads)
        self.module: torch.nn.Module | None = module

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if self.module is None:
            raise RuntimeError(f"{self!r} was closed.")
        with torch.inference_mode():
            if self.device.type == "cuda":
                return self._run_cuda(self.module, batch)
            out = self.module(batch.to(self.device))
            return _first_tensor(out).cpu()

    def _run_cuda(self, module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        # Pinned host memory lets the copies run asynchronously on the current stream;
        # one synchronize at the end waits for copy-in, compute and copy-out together.
        host = batch if batch.is_pinned() else batch.pin_memory()
        out = _first_tensor(module(host.to(self.device, non_blocking=True)))
        result = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        result.copy_(out, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return result

    def close(self) -> None:
        self.module = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _first_tensor(out: object) -> torch.Tensor:
    """Models may return a tensor, or a tuple/list/dict whose first entry is the output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and out:
        first = next(iter(out.values()))
        if isinstance(first, torch.Tensor):
            return first
    raise ModelLoadError(
        f"The model returned {type(out).__name__}, not a tensor.",
        hint="Return a tensor (or a tuple/dict whose first entry is the output tensor).",
    )
