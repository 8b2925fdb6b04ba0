"""A deliberately unreliable digits model, for rollout drills and fault tests.

It is a real, trained-or-not :class:`DigitsMLP` whose forward pass fails on a fraction
of batches and/or adds latency, so canaries, SLO guards and retries can be shown and
tested against something that misbehaves the way production models do.
"""

from __future__ import annotations

import time

import torch

from torchship.zoo.digits import DigitsMLP


class FaultyDigits(DigitsMLP):
    """``fail_rate``: share of forward calls that raise; ``delay_ms``: added latency.

    The first ``healthy_calls`` forward passes always succeed, so it passes a warm-up
    and fails only under traffic, like a bug that needs production load to show.
    """

    def __init__(
        self,
        hidden: int = 512,
        layers: int = 2,
        dropout: float = 0.1,
        fail_rate: float = 0.5,
        delay_ms: float = 0.0,
        seed: int = 0,
        healthy_calls: int = 0,
    ) -> None:
        super().__init__(hidden=hidden, layers=layers, dropout=dropout)
        self.init_kwargs.update(
            {
                "fail_rate": fail_rate,
                "delay_ms": delay_ms,
                "seed": seed,
                "healthy_calls": healthy_calls,
            }
        )
        self.healthy_calls = healthy_calls
        self._calls = 0
        self.fail_rate = fail_rate
        self.delay_ms = delay_ms
        self._rng = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        self._calls += 1
        if self._calls <= self.healthy_calls:
            return super().forward(x)
        if self.fail_rate and float(torch.rand(1, generator=self._rng)) < self.fail_rate:
            raise RuntimeError("FaultyDigits failed on purpose (a simulated production bug)")
        return super().forward(x)
