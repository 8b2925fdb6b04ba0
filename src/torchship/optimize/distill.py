"""Knowledge distillation: train a smaller student to imitate the teacher's outputs.

The student learns from the teacher's temperature-softened probabilities ("dark
knowledge": which wrong classes look alike) as well as from the labels, so it gets
closer to the teacher than the same network trained on labels alone.

Students (``student`` spec):

* ``"width:F"`` (default ``width:0.25``): the teacher's own architecture with every
  independently prunable layer cut to the fraction ``F`` of its channels (see
  :mod:`torchship.optimize.prune`), starting from the teacher's most important
  channels; works for any traceable model.
* ``"package.module:Class"`` plus ``student_kwargs``: any importable ``nn.Module``
  (e.g. ``torchship.zoo.digits:DigitsMLP`` with ``{"hidden": 64, "layers": 1}``), from
  random initialisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchship.errors import ConfigError, ModelLoadError
from torchship.optimize.errors import OptimizeError
from torchship.optimize.prune import prune_structured
from torchship.store.manifest import Architecture
from torchship.store.serialization import architecture_of, build_architecture


def parse_width(spec: str) -> float | None:
    """``"width:0.25"`` -> 0.25; None for an import path; ConfigError when malformed."""
    if not spec.startswith("width:"):
        return None
    try:
        width = float(spec.removeprefix("width:"))
    except ValueError:
        width = float("nan")
    if not 0 < width < 1:
        raise ConfigError(
            f"Student width must be a fraction between 0 and 1, got {spec!r}.",
            hint="e.g. --student width:0.25",
        )
    return width


def build_student(
    spec: str,
    teacher: nn.Module,
    base: dict[str, Any],
    example: torch.Tensor,
    kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, Architecture | None, str]:
    """The untrained student, its architecture (None: record it from the module), a note."""
    width = parse_width(spec)
    student: nn.Module
    if width is not None:
        student, groups = prune_structured(teacher, base, example, amount=1 - width)
        return (
            student,
            None,
            f"teacher's architecture at {width:g} width ({len(groups)} layers cut)",
        )
    if ":" not in spec:
        raise ConfigError(
            f"Unknown student {spec!r}.",
            hint="Use width:F (e.g. width:0.25) or an import path package.module:Class "
            "with --student-kwargs '{...}'.",
        )
    arch = Architecture(target=spec, kwargs=dict(kwargs or {}))
    try:
        student = build_architecture(arch)
    except ModelLoadError as exc:
        raise ConfigError(f"Cannot build the student {spec}: {exc.message}", hint=exc.hint) from exc
    with torch.no_grad():
        try:
            got = student.eval()(example[:2])
        except Exception as exc:  # a user class can fail in any way
            raise ConfigError(
                f"The student {spec}({kwargs or {}}) cannot take the teacher's inputs "
                f"{tuple(example.shape[1:])}: {type(exc).__name__}: {exc}"
            ) from exc
        want = teacher.eval()(example[:2])
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise OptimizeError(
            f"The student returns {getattr(got, 'shape', type(got).__name__)}, the teacher "
            f"{tuple(want.shape)}: they must agree to distill."
        )
    return student, architecture_of(student), f"{spec.rpartition(':')[2]}({kwargs or {}})"
