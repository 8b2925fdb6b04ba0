"""The methods ``torchship optimize`` knows, by name, and how each makes its variant.

Each method takes a :class:`Context` (the trained parent, its data, the options) and
returns a :class:`Candidate`: an ``nn.Module`` that the store can save as a state_dict
and rebuild from its recorded architecture. A method that does not apply here raises
:class:`~torchship.optimize.errors.MethodSkipped` with the reason.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchship.errors import ConfigError
from torchship.optimize import cuda, distill, ort, precision, prune, quantize
from torchship.optimize._wrap import arch_spec
from torchship.optimize.data import OptimizeData
from torchship.optimize.errors import MethodSkipped
from torchship.optimize.options import OptimizeOptions
from torchship.optimize.train import fit
from torchship.store import Manifest, ModelStore
from torchship.store.manifest import Architecture

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What every method may use. ``parent`` is the fp32 eager model, on the CPU."""

    store: ModelStore
    manifest: Manifest
    parent: nn.Module
    architecture: Architecture
    data: OptimizeData
    options: OptimizeOptions
    device: torch.device
    cache: dict[str, Any] = field(default_factory=dict)  # shared by methods (the ONNX graph)

    @property
    def base(self) -> dict[str, Any]:
        return arch_spec(self.architecture)

    @property
    def example(self) -> torch.Tensor:
        return self.data.x_test[:8]


@dataclass
class Candidate:
    """A variant ready to be stored. ``architecture`` None: the module's own class."""

    module: nn.Module
    notes: list[str] = field(default_factory=list)
    architecture: Architecture | None = None


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    summary: str
    make: Callable[[Context], Candidate]


# --- quantization -----------------------------------------------------------------------


def _dynamic_int8(ctx: Context) -> Candidate:
    module = quantize.quantize_dynamic_int8(ctx.parent, ctx.base, ctx.example)
    kw = module.init_kwargs
    how = "FX trace, Linear+ReLU fused" if kw["mode"] == "fx" else "modules swapped"
    note = f"{', '.join(kw['layers'])} weights int8, activations per batch ({how}, {kw['engine']})"
    return Candidate(module, [note, _script_note(module)])


def _script_note(module: quantize.QuantizedModule) -> str:
    if module.scripted():
        return "runs as TorchScript (the quantized modules' Python overhead removed)"
    return "runs eagerly: TorchScript refused the quantized model"


def _static_int8(ctx: Context) -> Candidate:
    batches = ctx.data.calibration_batches()
    module = quantize.quantize_static_int8(ctx.parent, ctx.base, batches)
    items = sum(len(b) for b in batches)
    notes = [f"FX graph mode, fused, calibrated on {items} real inputs", _script_note(module)]
    return Candidate(module, notes)


def _ort(mode: str | None) -> Callable[[Context], Candidate]:
    def make(ctx: Context) -> Candidate:
        if "onnx" not in ctx.cache:
            x = ctx.data.x_test[:64]
            ctx.cache["onnx"] = ort.parent_onnx(ctx.store, ctx.manifest, ctx.parent, x)
        fp32, source = ctx.cache["onnx"]
        notes = [f"graph: {source}"]
        graph = fp32
        if mode is not None:
            graph, more = ort.quantize_ort(fp32, mode, ctx.data.calibration_batches())
            notes += more
        return Candidate(ort.OnnxModule(len(graph), _data=graph), notes)

    return make


# --- pruning ----------------------------------------------------------------------------


def _finetune(ctx: Context, model: nn.Module, notes: list[str], **kwargs: Any) -> None:
    epochs = ctx.options.finetune_epochs
    if not ctx.data.trainable:
        notes.append("not fine-tuned: no labelled training data for this model")
        return
    if epochs > 0:
        fit(
            model,
            ctx.data,
            epochs=epochs,
            lr=ctx.options.finetune_lr,
            seed=ctx.options.seed,
            **kwargs,
        )
        notes.append(f"fine-tuned {epochs} epochs")


def _prune_unstructured(ctx: Context) -> Candidate:
    model = copy.deepcopy(ctx.parent)
    params = prune.prune_unstructured(model, ctx.options.prune_amount)
    notes: list[str] = []
    _finetune(ctx, model, notes)  # the masks stay applied while training
    prune.make_permanent(params)
    notes.insert(0, f"{prune.sparsity(model):.0%} of Conv/Linear weights zero (dense storage)")
    return Candidate(model.eval(), notes, architecture=ctx.architecture)


def _prune_structured(ctx: Context) -> Candidate:
    before = prune.count_parameters(ctx.parent)
    model, groups = prune.prune_structured(
        ctx.parent, ctx.base, ctx.example, ctx.options.prune_amount
    )
    notes = [
        f"{len(groups)} layers lost {ctx.options.prune_amount:.0%} of their channels; "
        f"parameters {before:,} -> {prune.count_parameters(model):,}"
    ]
    _finetune(ctx, model, notes)
    return Candidate(model.eval(), notes)


# --- distillation -----------------------------------------------------------------------


def _distill(ctx: Context) -> Candidate:
    if not ctx.data.trainable:
        raise MethodSkipped("needs labelled training data (only the digits data is built in)")
    opts = ctx.options
    student, arch, what = distill.build_student(
        opts.student, ctx.parent, ctx.base, ctx.example, opts.student_kwargs
    )
    teacher_params = prune.count_parameters(ctx.parent)
    fit(
        student,
        ctx.data,
        epochs=opts.distill_epochs,
        lr=opts.distill_lr,
        teacher=ctx.parent,
        temperature=opts.temperature,
        alpha=opts.alpha,
        seed=opts.seed,
    )
    notes = [
        f"student: {what}, {prune.count_parameters(student):,} parameters "
        f"(teacher {teacher_params:,})",
        f"{opts.distill_epochs} epochs, T={opts.temperature:g}, alpha={opts.alpha:g}",
    ]
    return Candidate(student.eval(), notes, architecture=arch)


# --- precision and CUDA -----------------------------------------------------------------


def _autocast(dtype: str) -> Callable[[Context], Candidate]:
    def make(ctx: Context) -> Candidate:
        precision.check_autocast(ctx.device, dtype)
        notes = ["weights stay float32 (autocast casts per op)"]
        if ctx.device.type == "cpu":
            notes.append(precision.cpu_half_support(dtype))
        module = precision.Autocast(ctx.base, dtype, _module=copy.deepcopy(ctx.parent))
        return Candidate(module, notes)

    return make


def _cuda(mode: str) -> Callable[[Context], Candidate]:
    def make(ctx: Context) -> Candidate:
        notes = []
        on_cpu = False
        if mode == "compile" and ctx.device.type == "cpu":
            if not ctx.options.compile_on_cpu:
                reason = "no CUDA" if not torch.cuda.is_available() else "measuring on the CPU"
                raise MethodSkipped(
                    f"{reason}; torch.compile on this CPU costs tens of seconds of C++ "
                    "compilation per model and batch shape (--compile-on-cpu to measure it)"
                )
            why_not = cuda.compile_on_cpu_reason()
            if why_not:
                raise MethodSkipped(why_not)
            on_cpu = True
            notes.append("torch.compile (inductor, C++) on the CPU")
        else:
            cuda.require_cuda(ctx.device)
        module = cuda.CudaOptimized(
            ctx.base, mode, compile_on_cpu=on_cpu, _module=copy.deepcopy(ctx.parent)
        )
        if mode == "cuda-graphs":
            probe = ctx.example.to(ctx.device)
            try:
                with torch.inference_mode():
                    cuda.capture(module.model.to(ctx.device), probe)
            except Exception as exc:  # capture fails in many ways
                raise MethodSkipped(f"the model cannot be captured in a CUDA graph: {exc}") from exc
            finally:
                module.model.cpu()
            notes.append("one graph per input shape, replayed")
        if mode == "cudnn-benchmark":
            notes.append("process-wide switch: cuDNN autotunes per input shape")
        return Candidate(module, notes)

    return make


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dynamic-int8", "quantize", "torch dynamic int8 (Linear/LSTM/GRU)", _dynamic_int8),
        Method("static-int8", "quantize", "torch static int8, FX post-training", _static_int8),
        Method(
            "onnxruntime", "onnxruntime", "ONNX Runtime fp32, all graph optimizations", _ort(None)
        ),
        Method("ort-dynamic-int8", "onnxruntime", "ONNX Runtime dynamic int8", _ort("dynamic")),
        Method("ort-static-int8", "onnxruntime", "ONNX Runtime static int8 (QDQ)", _ort("static")),
        Method(
            "prune-unstructured", "prune", "L1 magnitude pruning + fine-tune", _prune_unstructured
        ),
        Method("prune-structured", "prune", "channel pruning + fine-tune", _prune_structured),
        Method("distill", "distill", "knowledge distillation into a smaller student", _distill),
        Method("bf16", "precision", "bfloat16 autocast", _autocast("bfloat16")),
        Method("fp16", "precision", "float16 autocast", _autocast("float16")),
        Method("cudnn-benchmark", "cuda", "cuDNN autotuning", _cuda("cudnn-benchmark")),
        Method("compile", "cuda", "torch.compile (inductor)", _cuda("compile")),
        Method("cuda-graphs", "cuda", "CUDA graphs, one per input shape", _cuda("cuda-graphs")),
    )
}

GROUPS: dict[str, list[str]] = {
    "all": list(METHODS),
    "quantize": ["dynamic-int8", "static-int8", "ort-dynamic-int8", "ort-static-int8"],
    "ort": ["onnxruntime", "ort-dynamic-int8", "ort-static-int8"],
    "prune": ["prune-unstructured", "prune-structured"],
    "precision": ["bf16", "fp16"],
    "cuda": ["cudnn-benchmark", "compile", "cuda-graphs"],
}


def resolve_methods(names: Iterable[str] | str) -> list[Method]:
    """Method names (comma-separated or a list; group names expand), deduplicated, in
    the order of :data:`METHODS` (families stay together in the report)."""
    if isinstance(names, str):
        names = [names]
    wanted: list[str] = []
    for item in names:
        for name in (n.strip() for n in item.split(",")):
            if not name:
                continue
            if name in METHODS:
                expanded = [name]
            elif name in GROUPS:
                expanded = GROUPS[name]
            else:
                raise ConfigError(
                    f"Unknown optimization method {name!r}.",
                    hint=f"Methods: {', '.join(METHODS)}; groups: {', '.join(GROUPS)}.",
                )
            wanted += [n for n in expanded if n not in wanted]
    if not wanted:
        raise ConfigError("No optimization method given.", hint=f"Methods: {', '.join(METHODS)}.")
    order = list(METHODS)
    return [METHODS[n] for n in sorted(wanted, key=order.index)]
