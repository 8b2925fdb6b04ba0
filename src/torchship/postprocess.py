"""Turning model outputs into answers people read: top-k labels with probabilities."""

from __future__ import annotations

import torch

from torchship.errors import InferenceError


def top_k(
    logits: torch.Tensor, labels: list[str] | None, k: int = 3
) -> list[list[dict[str, float | str | int]]]:
    """Softmax over the last axis, then the ``k`` most likely classes per row."""
    probs = torch.softmax(logits.float().reshape(len(logits), -1), dim=-1)
    k = max(1, min(k, probs.shape[-1]))
    values, indices = probs.topk(k, dim=-1)
    out = []
    for vals, idxs in zip(values.tolist(), indices.tolist(), strict=True):
        if vals[0] != vals[0]:  # NaN sorts first: softmax of a NaN or infinite logit
            raise non_finite_outputs()
        out.append(
            [
                {
                    "index": i,
                    "label": labels[i] if labels and i < len(labels) else str(i),
                    "probability": round(float(v), 6),
                }
                for v, i in zip(vals, idxs, strict=True)
            ]
        )
    return out


def non_finite_outputs() -> InferenceError:
    """A model that answers NaN or infinity is broken: a 500 that says so, never a
    number a client would read as a probability."""
    return InferenceError(
        "The model produced NaN or infinite outputs.",
        hint="This is a server-side fault in the model (or its weights); check its version.",
    )
