"""Inference optimization, measured: quantization, pruning, distillation, precision, CUDA.

>>> from torchship.optimize import optimize
>>> report = optimize("models", "digits", ["dynamic-int8", "prune-structured"],
...                   accuracy_budget=1.0, out_dir="runs/optimize")  # doctest: +SKIP
>>> print(report.to_markdown())  # doctest: +SKIP

Each method makes a new store version (``parent`` recorded) that loads back through
:func:`torchship.runtime.load_predictor` without unpickling anything; all variants are
then measured the same way, interleaved (:mod:`torchship.optimize.measure`).
"""

from torchship.optimize.errors import MethodSkipped, NoVariantQualifiesError, OptimizeError
from torchship.optimize.measure import Measurement, measure_variants
from torchship.optimize.methods import GROUPS, METHODS, resolve_methods
from torchship.optimize.options import OptimizeOptions
from torchship.optimize.pick import pick_within_budget
from torchship.optimize.pipeline import optimize, remeasure
from torchship.optimize.plot import plot_tradeoff
from torchship.optimize.report import OptimizeReport, VariantRow

__all__ = [
    "GROUPS",
    "METHODS",
    "Measurement",
    "MethodSkipped",
    "NoVariantQualifiesError",
    "OptimizeError",
    "OptimizeOptions",
    "OptimizeReport",
    "VariantRow",
    "measure_variants",
    "optimize",
    "pick_within_budget",
    "plot_tradeoff",
    "remeasure",
    "resolve_methods",
]
