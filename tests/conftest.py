"""Shared fixtures: a temp store and real (tiny, quickly trained) digits models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchship.store import ModelStore
from torchship.zoo import digits

torch.set_num_threads(1)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture(scope="session")
def digits_data() -> digits.DigitsData:
    return digits.load_digits_split()


@pytest.fixture(scope="session")
def quick_mlp(digits_data: digits.DigitsData) -> torch.nn.Module:
    """A digits MLP trained for two epochs: real weights, well above chance, ~1 s."""
    return digits.train("mlp", epochs=2, data=digits_data).model
