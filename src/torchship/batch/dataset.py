"""The per-item and per-batch steps every engine shares: read, preprocess, predict, rank.

``InferenceDataset[i]`` reads and preprocesses one item with the same functions the
servers use (:mod:`torchship.preprocessing`); any failure becomes a :class:`Sample`
carrying the reason instead of an exception, so one corrupt file never stops a job.
``collate`` stacks the good ones into a :class:`Batch` and keeps the failures beside
them; ``predict_rows`` runs the model on a batch and turns it into output rows, in
the batch's order. The local engine drives these through a DataLoader, the Ray engine
through ``map_batches``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from torchship.batch.sources import Payload, Source
from torchship.batch.writers import Row
from torchship.errors import InvalidInputError, TorchshipError
from torchship.postprocess import top_k as _top_k
from torchship.preprocessing import DEFAULT_MAX_PIXELS, preprocess_image, validate_tensor
from torchship.runtime import Predictor
from torchship.store.manifest import InputSpec

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One item after preprocessing: its input tensor, or why there is none."""

    index: int
    id: str
    tensor: torch.Tensor | None = None
    error: str | None = None


@dataclass
class Batch:
    """Consecutive items in input order; ``inputs`` stacks those that preprocessed."""

    indices: list[int]
    ids: list[str]
    inputs: torch.Tensor | None
    ok: list[int] = field(default_factory=list)  # positions in ``indices`` with an input
    errors: dict[int, str] = field(default_factory=dict)  # position -> reason

    def __len__(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread when ``pin_memory=True`` (CUDA)."""
        if self.inputs is not None:
            self.inputs = self.inputs.pin_memory()
        return self


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failure row: what went wrong, never a traceback."""
    if isinstance(exc, TorchshipError):
        reason = exc.details.get("reason")
        return f"{exc.message} ({reason})" if reason else exc.message
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot read{where}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def to_input(payload: Payload, spec: InputSpec, *, max_pixels: int) -> torch.Tensor:
    """One item's model input ``spec.shape`` from image bytes or an array."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return preprocess_image(bytes(payload), spec, max_pixels=max_pixels)
    array = np.asarray(payload)
    size = int(np.prod(spec.shape))
    if array.ndim == 1 and array.size == size and len(spec.shape) > 1:
        array = array.reshape(spec.shape)  # flat features, e.g. a CSV row of 64 pixels
    tensor = validate_tensor(array, spec)
    if len(tensor) != 1:
        raise InvalidInputError(
            f"An item holds {len(tensor)} inputs; each row must hold exactly one.",
            hint="Store one input per row or file.",
        )
    return tensor[0]


class InferenceDataset(Dataset[Sample]):
    """Items ``indices`` of ``source``, preprocessed for a model with input ``spec``."""

    def __init__(
        self,
        source: Source,
        spec: InputSpec,
        indices: range | None = None,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.source = source
        self.spec = spec
        self.indices = range(len(source)) if indices is None else indices
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        index = self.indices[i]
        item_id = self.source.item_id(index)
        try:
            payload = self.source.read(index)
            return Sample(index, item_id, to_input(payload, self.spec, max_pixels=self.max_pixels))
        except Exception as exc:  # any reason an item cannot be used becomes its row
            return Sample(index, item_id, error=describe_error(exc))

    def load(self, indices: Sequence[int]) -> Batch:
        """Items by position (not source index), collated: what one DataLoader batch is."""
        return collate([self[i] for i in indices])


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack the preprocessed inputs; failures stay in place as reasons."""
    ok = [pos for pos, s in enumerate(samples) if s.tensor is not None]
    errors = {pos: s.error or "no input" for pos, s in enumerate(samples) if s.tensor is None}
    inputs = torch.stack([samples[pos].tensor for pos in ok]) if ok else None  # type: ignore[misc]
    return Batch([s.index for s in samples], [s.id for s in samples], inputs, ok, errors)


def predict_rows(predictor: Predictor, batch: Batch, *, top_k: int, amp: bool = False) -> list[Row]:
    """Run the model on ``batch`` and return one row per item, in order.

    If the model fails on the whole batch, each item is retried alone so one bad input
    fails only its own row (the reason is the model's error).
    """
    errors = dict(batch.errors)
    ranked: dict[int, list[dict[str, float | str | int]]] = {}
    if batch.inputs is not None:
        try:
            for pos, r in zip(batch.ok, _rank(predictor, batch.inputs, top_k, amp), strict=True):
                ranked[pos] = r
        except Exception as exc:
            logger.warning(
                "model failed on a batch of %d (%s); retrying one by one",
                len(batch.ok),
                describe_error(exc),
            )
            for n, pos in enumerate(batch.ok):
                try:
                    ranked[pos] = _rank(predictor, batch.inputs[n : n + 1], top_k, amp)[0]
                except Exception as item_exc:
                    errors[pos] = f"model failed: {describe_error(item_exc)}"
    rows = []
    for pos, (index, item_id) in enumerate(zip(batch.indices, batch.ids, strict=True)):
        if pos in ranked:
            top = ranked[pos]
            rows.append(
                Row(
                    index,
                    item_id,
                    "ok",
                    None,
                    tuple(str(t["label"]) for t in top),
                    tuple(float(t["probability"]) for t in top),
                )
            )
        else:
            rows.append(Row(index, item_id, "error", errors.get(pos, "no output")))
    return rows


def _rank(
    predictor: Predictor, inputs: torch.Tensor, top_k: int, amp: bool
) -> list[list[dict[str, float | str | int]]]:
    autocast: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if amp and predictor.device.type == "cuda" and predictor.runtime != "onnxruntime":
        autocast = torch.autocast("cuda", dtype=torch.float16)
    with torch.inference_mode(), autocast:
        outputs = predictor.predict(inputs)
    return _top_k(outputs, predictor.labels, top_k)
