"""The data a method needs: calibration inputs, a training split, a labelled test split.

Quantization calibrates on real inputs, pruning fine-tunes and distillation trains on
a labelled training split, and every variant is judged on the same held-out test split.
For models of the digits input shape that is scikit-learn's bundled digits data (the
split every torchship digits model was trained on); for any other model only the
version's stored examples exist, so accuracy becomes agreement with the parent and the
methods that need labelled training data are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from torchship.errors import ConfigError
from torchship.runtime._inputs import sample_batch
from torchship.store import Manifest, ModelStore

DataChoice = Literal["auto", "digits", "examples"]

CALIBRATION_ITEMS = 512
EXAMPLE_ITEMS = 64


@dataclass(frozen=True)
class OptimizeData:
    """``y_*`` are ``None`` when no labels exist; ``augment`` jitters training batches."""

    name: str
    calibration: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor | None
    x_train: torch.Tensor | None = None
    y_train: torch.Tensor | None = None
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    @property
    def labelled(self) -> bool:
        return self.y_test is not None

    @property
    def trainable(self) -> bool:
        return self.x_train is not None and self.y_train is not None

    def calibration_batches(self, batch_size: int = 32) -> list[torch.Tensor]:
        return [
            self.calibration[i : i + batch_size]
            for i in range(0, len(self.calibration), batch_size)
        ]


def digits_data() -> OptimizeData:
    """The fixed digits split: calibrate on train images, judge on the held-out test set."""
    from torchship.zoo import digits

    split = digits.load_digits_split()
    return OptimizeData(
        name="digits (scikit-learn, held-out test split)",
        calibration=split.x_train[:CALIBRATION_ITEMS],
        x_test=split.x_test,
        y_test=split.y_test,
        x_train=split.x_train,
        y_train=split.y_train,
        augment=partial(digits.random_affine),
    )


def examples_data(store: ModelStore, manifest: Manifest) -> OptimizeData:
    """The version's stored examples (else seeded random inputs of its spec), unlabelled."""
    examples = store.load_examples(manifest.ref)
    if examples is None or len(examples) == 0:
        examples = sample_batch(manifest.input, None, EXAMPLE_ITEMS, random=True)
    if examples is None:
        raise ConfigError(
            f"{manifest.ref} has no stored examples and no input spec: nothing to "
            "calibrate or measure with.",
            hint="Save the model with examples=... or input_spec=....",
        )
    return OptimizeData(
        name=f"{len(examples)} stored examples of {manifest.ref} (unlabelled)",
        calibration=examples,
        x_test=examples,
        y_test=None,
    )


def resolve_data(store: ModelStore, manifest: Manifest, choice: DataChoice) -> OptimizeData:
    """``auto``: digits for models that take digits images, else the stored examples."""
    digits_shape = [1, 8, 8]
    takes_digits = manifest.input is not None and list(manifest.input.shape) == digits_shape
    if choice == "digits" or (choice == "auto" and takes_digits):
        if not takes_digits:
            raise ConfigError(
                f"{manifest.ref} takes inputs of shape {manifest.input.shape if manifest.input else '?'}, "
                "not the digits data's 1x8x8.",
                hint="Use --data examples (the version's stored examples).",
            )
        return digits_data()
    if choice in ("auto", "examples"):
        return examples_data(store, manifest)
    raise ConfigError(f"Unknown data choice {choice!r}; use auto, digits or examples.")
