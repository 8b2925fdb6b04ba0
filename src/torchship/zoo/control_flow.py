"""A model whose forward pass depends on its input's values: why tracing can be wrong.

``torch.jit.trace`` runs the model once on an example and records the tensor
operations that ran. Python control flow is not recorded, only its outcome for that
example: :class:`ControlFlowNet` branches on the sign of the batch's sum and loops a
data-dependent number of times, so a trace taken on a positive input applies the
"positive" branch and that input's loop count to every later input, silently (one
``TracerWarning`` at trace time, nothing at run time). ``torch.jit.script`` compiles
the Python source instead, keeps the ``if`` and the ``for`` and matches eager mode;
``torch.export`` refuses the branch unless it is rewritten with ``torch.cond``.
"""

from __future__ import annotations

import torch
from torch import nn

from torchship.store.manifest import InputSpec


class ControlFlowNet(nn.Module):
    """Branch on ``x.sum() > 0``, then refine ``ceil(max |x|)`` times (at most ``max_steps``).

    ``forward`` is fully type-annotated so that ``torch.jit.script`` compiles it.
    """

    def __init__(self, features: int = 8, num_classes: int = 4, max_steps: int = 4) -> None:
        super().__init__()
        self.init_kwargs = {
            "features": features,
            "num_classes": num_classes,
            "max_steps": max_steps,
        }
        self.max_steps = max_steps
        self.positive = nn.Linear(features, features)
        self.negative = nn.Linear(features, features)
        self.refine = nn.Linear(features, features)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Data-dependent branch: a trace freezes whichever side its example took.
        if bool(x.sum() > 0):
            h = torch.relu(self.positive(x))
        else:
            h = torch.tanh(self.negative(x)) - 1.0
        # Data-dependent loop count: a trace unrolls its example's count.
        steps = int(torch.clamp(torch.ceil(x.abs().max()), 0, self.max_steps))
        for _ in range(steps):
            h = h + torch.tanh(self.refine(h))
        return self.head(h)


def control_flow_input_spec(features: int = 8) -> InputSpec:
    return InputSpec(shape=[features], kind="tensor")
