from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from torchship.errors import ModelNotFoundError
from torchship.store import CheckpointManager
from torchship.zoo import digits


def _setup(seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = digits.DigitsMLP(hidden=64, layers=1, dropout=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    return model, opt, sched


def _epoch(model, opt, sched, loader) -> float:  # type: ignore[no-untyped-def]
    model.train()
    total = 0.0
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total += loss.item()
    # consume the other RNGs too, so restoring them is what makes the runs agree
    total += 0.0 * (np.random.rand() + random.random())
    sched.step()
    return total


def test_resumed_run_reaches_the_same_weights(tmp_path, digits_data) -> None:
    ds = TensorDataset(digits_data.x_train[:512], digits_data.y_train[:512])
    epochs, crash_after = 4, 2

    model, opt, sched = _setup()
    torch.manual_seed(123)
    for _ in range(epochs):
        _epoch(model, opt, sched, DataLoader(ds, batch_size=32, shuffle=True))
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    # the same run, "killed" after two epochs and resumed with fresh objects
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, metric="loss", mode="min")
    model, opt, sched = _setup()
    torch.manual_seed(123)
    for epoch in range(crash_after):
        loss = _epoch(model, opt, sched, DataLoader(ds, batch_size=32, shuffle=True))
        manager.save(epoch + 1, model, opt, sched, metrics={"loss": loss})

    torch.manual_seed(999)  # the crash: the new process has different RNG state
    np.random.seed(5)
    model, opt, sched = _setup(seed=7)
    resumed = CheckpointManager(tmp_path / "ckpt").resume(model, opt, sched)
    assert resumed is not None and resumed.step == crash_after
    for _ in range(resumed.step, epochs):
        _epoch(model, opt, sched, DataLoader(ds, batch_size=32, shuffle=True))

    for key, value in model.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key


def test_keeps_last_n_and_best_k(tmp_path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2, keep_best=1, metric="val_loss", mode="min")
    model = torch.nn.Linear(2, 2)
    losses = [0.9, 0.2, 0.5, 0.6, 0.7]
    for step, loss in enumerate(losses, start=1):
        manager.save(step, model, metrics={"val_loss": loss})
    kept = [c.step for c in manager.checkpoints()]
    assert kept == [2, 4, 5]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == [
        "checkpoint-00000002.pt",
        "checkpoint-00000004.pt",
        "checkpoint-00000005.pt",
    ]
    best = manager.best()
    assert best is not None and best.step == 2
    assert manager.load("best")["metrics"] == {"val_loss": 0.2}
    assert manager.load(4)["step"] == 4
    with pytest.raises(ModelNotFoundError, match="Kept steps"):
        manager.load(3)


def test_resume_with_nothing_returns_none(tmp_path) -> None:
    assert CheckpointManager(tmp_path / "none").resume(torch.nn.Linear(1, 1)) is None


def test_checkpoints_load_without_unpickling_code(tmp_path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    opt_model = torch.nn.Linear(3, 3)
    opt = torch.optim.Adam(opt_model.parameters())
    opt_model(torch.ones(1, 3)).sum().backward()
    opt.step()
    manager.save(1, opt_model, opt, metrics={"acc": 1.0}, extra={"note": "ok"})
    payload = manager.load()  # weights_only=True inside; would raise on any object
    assert payload["extra"] == {"note": "ok"}
    assert "state" in payload["optimizer"]
