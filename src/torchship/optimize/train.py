"""One small training loop for fine-tuning (after pruning) and distillation.

Deterministic (seeded order and augmentation) and run on the CPU with one intra-op
thread by default: these models are so small that thread hand-offs cost more than
they save (the same choice :func:`torchship.zoo.digits.train` makes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from torchship.optimize.data import OptimizeData

Hook = Callable[[nn.Module], None]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block, then restore the previous count."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit(
    model: nn.Module,
    data: OptimizeData,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    label_smoothing: float = 0.1,
    seed: int = 0,
    threads: int | None = 1,
    after_step: Hook | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``data``'s training split; returns it in eval mode.

    With a ``teacher`` the loss is Hinton et al.'s distillation loss: ``alpha`` times the
    KL divergence between the temperature-softened outputs (scaled by T², so its
    gradients keep their size as T changes) plus ``1 - alpha`` times the usual
    cross-entropy on the labels. ``after_step`` runs after each optimiser step (e.g. to
    re-apply a pruning mask).
    """
    if not data.trainable or data.x_train is None or data.y_train is None:
        raise ValueError("fit() needs a labelled training split")
    if epochs <= 0:
        return model.eval()
    x_all, y_all = data.x_train, data.y_train
    if teacher is not None:
        teacher.eval()
    with torch_threads(threads):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        n = len(x_all)
        for _epoch in range(epochs):
            model.train()
            x_epoch = data.augment(x_all, generator) if data.augment is not None else x_all
            order = torch.randperm(n, generator=generator)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                x, y = x_epoch[idx], y_all[idx]
                optimizer.zero_grad(set_to_none=True)
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        soft = F.log_softmax(teacher(x) / temperature, dim=1)
                    kd = F.kl_div(
                        F.log_softmax(logits / temperature, dim=1),
                        soft,
                        reduction="batchmean",
                        log_target=True,
                    )
                    loss = alpha * kd * temperature**2 + (1 - alpha) * loss
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step(model)
            scheduler.step()
    return model.eval()


@torch.inference_mode()
def top1(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` (batches of 256)."""
    correct = 0
    for i in range(0, len(x), 256):
        correct += int((model(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum())
    return correct / max(1, len(x))
