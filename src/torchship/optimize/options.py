"""``OptimizeOptions``: every knob of ``torchship optimize``, checked when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torchship.errors import ConfigError
from torchship.optimize.data import DataChoice


@dataclass
class OptimizeOptions:
    """Defaults suit the digits models on a small CPU; the benchmark and lesson use them."""

    threads: int | None = None
    """Intra-op threads for every variant (torch and ONNX Runtime); None: all cores."""
    device: str = "auto"
    """Where variants are measured: 'auto' (CUDA when present), 'cpu', 'cuda[:N]'."""
    data: DataChoice = "auto"
    """'digits' (held-out test split, labelled), 'examples' (stored, unlabelled) or 'auto'."""
    measure_seconds: float = 5.0
    """Timing budget for all variants together (at least ``min_rounds`` rounds)."""
    min_rounds: int = 20
    prune_amount: float = 0.5
    """Fraction of weights (unstructured) or of each layer's channels (structured) removed."""
    finetune_epochs: int = 5
    finetune_lr: float = 1e-3
    student: str = "width:0.25"
    """Distillation student: 'width:F' (the teacher at F of its width) or 'module:Class'."""
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    distill_epochs: int = 30
    distill_lr: float = 3e-3
    temperature: float = 4.0
    alpha: float = 0.7
    compile_on_cpu: bool = False
    """Also try torch.compile on the CPU (tens of seconds of C++ compilation)."""
    trust_pickle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            problems.append(f"threads must be a positive integer, got {self.threads!r}")
        if not (0 < self.prune_amount < 1):
            problems.append(f"prune_amount must be between 0 and 1, got {self.prune_amount}")
        if not (math.isfinite(self.measure_seconds) and self.measure_seconds >= 0):
            problems.append(f"measure_seconds must be >= 0, got {self.measure_seconds}")
        if self.min_rounds < 1:
            problems.append(f"min_rounds must be >= 1, got {self.min_rounds}")
        for name in ("finetune_epochs", "distill_epochs"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.temperature > 0 and 0 <= self.alpha <= 1):
            problems.append("temperature must be > 0 and alpha between 0 and 1")
        if self.data not in ("auto", "digits", "examples"):
            problems.append(f"data must be auto, digits or examples, got {self.data!r}")
        if problems:
            raise ConfigError("Invalid optimize options: " + "; ".join(problems) + ".")
