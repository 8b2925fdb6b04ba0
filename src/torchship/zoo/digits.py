"""Reference models for scikit-learn's bundled 8x8 digits: trained offline in seconds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchship.store.manifest import InputSpec

LABELS = [str(i) for i in range(10)]
SEED = 0
TEST_SIZE = 0.2


class DigitsCNN(nn.Module):
    """Two conv layers and a classifier head; ~98-99% on the held-out digits."""

    def __init__(self, channels: int = 16, hidden: int = 64, dropout: float = 0.25) -> None:
        super().__init__()
        self.init_kwargs = {"channels": channels, "hidden": hidden, "dropout": dropout}
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels * 2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels * 2)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(channels * 2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = self.dropout(torch.flatten(x, 1))
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class DigitsMLP(nn.Module):
    """A Linear-heavy MLP: the natural candidate for dynamic int8 quantization."""

    def __init__(self, hidden: int = 512, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.init_kwargs = {"hidden": hidden, "layers": layers, "dropout": dropout}
        dims = [64] + [hidden] * layers
        blocks: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in itertools.pairwise(dims):
            blocks += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout)]
        blocks.append(nn.Linear(dims[-1], 10))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Pixel statistics of the training split (values scaled to [0, 1]); fixed so that a
# model's input spec never depends on which split was loaded.
MEAN = 0.3068
STD = 0.3793


def input_spec() -> InputSpec:
    """Digits images: grayscale 8x8, light ink on dark as the data set stores them."""
    return InputSpec(
        shape=[1, 8, 8],
        kind="image",
        color="L",
        size=(8, 8),
        fit="ink",
        invert="auto",
        mean=[MEAN],
        std=[STD],
    )


@dataclass(frozen=True)
class DigitsData:
    """The fixed train/test split, already normalized as ``input_spec()`` describes."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    raw_test: np.ndarray  # (N, 8, 8) uint8 in 0..16, for rendering sample images


def load_digits_split(seed: int = SEED, test_size: float = TEST_SIZE) -> DigitsData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)  # (1797, 8, 8), 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=test_size, random_state=seed, stratify=digits.target
    )

    def norm(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a / 16.0 - MEAN) / STD)[:, None, :, :].astype(np.float32))

    return DigitsData(
        x_train=norm(x_tr),
        y_train=torch.from_numpy(y_tr.astype(np.int64)),
        x_test=norm(x_te),
        y_test=torch.from_numpy(y_te.astype(np.int64)),
        raw_test=x_te.astype(np.uint8),
    )


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(x)


@dataclass
class TrainResult:
    model: nn.Module
    test_accuracy: float
    epochs: int
    seconds: float


def build(arch: str) -> nn.Module:
    if arch == "cnn":
        return DigitsCNN()
    if arch == "mlp":
        return DigitsMLP()
    raise ValueError(f"Unknown digits architecture {arch!r}; use 'cnn' or 'mlp'.")


def train(
    arch: str = "cnn",
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = SEED,
    data: DigitsData | None = None,
    log: bool = False,
) -> TrainResult:
    """Train a digits model deterministically (fixed seed, fixed split) on the CPU."""
    import time

    start = time.monotonic()
    data = data or load_digits_split()
    torch.manual_seed(seed)
    model = build(arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
        scheduler.step()
        if log:
            acc = accuracy(model, data.x_test, data.y_test)
            print(f"  epoch {epoch + 1:2d}/{epochs}  loss {loss.item():.4f}  test acc {acc:.4f}")
    model.eval()
    acc = accuracy(model, data.x_test, data.y_test)
    return TrainResult(model, acc, epochs, time.monotonic() - start)
