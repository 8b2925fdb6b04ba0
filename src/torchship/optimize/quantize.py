"""int8 quantization in PyTorch: dynamic (weights ahead, activations per batch) and static.

* **dynamic int8** (``torch.ao.quantization.quantize_dynamic``): Linear/LSTM/GRU weights
  are stored as int8; activations are quantized on the fly per batch. No calibration;
  pays off where matrix multiplies dominate (MLPs, transformers' projections).
* **static int8** (FX graph mode post-training quantization): Conv-BN-ReLU are fused,
  observers record activation ranges on real calibration batches, and the whole graph
  runs in int8 between a quantize at the input and a dequantize at the output.

Both use ``torch.ao.quantization``, which PyTorch marks as deprecated in favour of the
separate ``torchao`` package but still ships and runs in torch 2.13; its x86 (FBGEMM /
oneDNN) kernels are what make int8 fast on a CPU without ``torch.compile``.

Storage: a quantized module's state_dict holds quantized tensors and packed-parameter
tuples, which safetensors cannot store. The wrappers here translate them into plain
tensors (the int8 values plus scales and zero points) when saved and back when loaded,
so an int8 version is a safetensors file about a quarter of the fp32 size, loaded
without unpickling anything. Quantized kernels here are CPU-only: on a CUDA device the
module stays on the CPU and moves inputs and outputs.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from torchship.errors import ModelLoadError
from torchship.optimize._wrap import WrapperModule, build_base
from torchship.optimize.errors import MethodSkipped, OptimizeError

logger = logging.getLogger(__name__)

_SCRIPT_LOCK = threading.Lock()  # compiling is rare; one lock for every module
_GENERATIONS = itertools.count(1)  # next() is atomic under the GIL
DYNAMIC_LAYERS: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "LSTM": nn.LSTM, "GRU": nn.GRU}
_SEP = "::"


def default_engine(kind: str = "static") -> str:
    """The quantized kernel library to pack weights for.

    Static: ``x86`` (picks FBGEMM or oneDNN per op). Dynamic Linear: ``fbgemm``, which
    measured 1.3x faster than ``x86``'s packing for the digits MLP on this kind of CPU
    (the engine that runs the op afterwards makes no difference). Else qnnpack (ARM).
    """
    engines = torch.backends.quantized.supported_engines
    order = ("x86", "fbgemm", "onednn", "qnnpack")
    if kind == "dynamic":
        order = ("fbgemm", "x86", "onednn", "qnnpack")
    for engine in order:
        if engine in engines:
            return engine
    raise MethodSkipped("this torch build has no quantized engine")


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Pack weights for ``engine`` inside the block, then restore the process's engine.

    Packed weights remember their backend, so restoring the global afterwards is safe.
    """
    if engine not in torch.backends.quantized.supported_engines:
        raise ModelLoadError(
            f"This model was quantized for the {engine!r} engine, which this torch build "
            f"lacks (it has {torch.backends.quantized.supported_engines}).",
            hint="Quantize it again on this machine (torchship optimize).",
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@contextlib.contextmanager
def quiet_quantization() -> Iterator[None]:
    """Hide torch.ao's deprecation notices and uncalibrated-observer warnings (known)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*")
        warnings.filterwarnings("ignore", message=".*observer.*")
        yield


# --- quantized state_dict <-> plain tensors ------------------------------------------


def encode_entry(key: str, value: Any, out: dict[str, Any]) -> None:
    """Write ``value`` (tensor, quantized tensor, tuple of them, dtype) as plain tensors."""
    if isinstance(value, torch.Tensor):
        if not value.is_quantized:
            out[key] = value
            return
        out[f"{key}{_SEP}int"] = value.int_repr()
        scheme = value.qscheme()
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            out[f"{key}{_SEP}scale"] = torch.tensor([value.q_scale()], dtype=torch.float64)
            out[f"{key}{_SEP}zero_point"] = torch.tensor([value.q_zero_point()])
        elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[f"{key}{_SEP}scales"] = value.q_per_channel_scales().to(torch.float64)
            out[f"{key}{_SEP}zero_points"] = value.q_per_channel_zero_points().to(torch.int64)
            out[f"{key}{_SEP}axis"] = torch.tensor([value.q_per_channel_axis()])
        else:
            raise OptimizeError(f"Cannot store a quantized tensor with scheme {scheme}.")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            if item is not None:
                encode_entry(f"{key}{_SEP}{i}", item, out)
    # dtypes and other constants are rebuilt by the constructor; nothing to store


def decode_entry(key: str, template: Any, flat: dict[str, Any], used: set[str]) -> Any:
    """The inverse of :func:`encode_entry`, shaped like ``template`` (the rebuilt value).

    Raises ``KeyError`` naming the first missing stored key.
    """
    if isinstance(template, torch.Tensor):
        if not template.is_quantized:
            used.add(key)
            return flat[key]
        ints = flat[f"{key}{_SEP}int"]
        used.add(f"{key}{_SEP}int")
        if f"{key}{_SEP}scale" in flat:
            names = [f"{key}{_SEP}scale", f"{key}{_SEP}zero_point"]
            scale, zero = (flat[n] for n in names)
            used.update(names)
            return torch._make_per_tensor_quantized_tensor(
                ints, float(scale.item()), int(zero.item())
            )
        names = [f"{key}{_SEP}scales", f"{key}{_SEP}zero_points", f"{key}{_SEP}axis"]
        scales, zeros, axis = (flat[n] for n in names)
        used.update(names)
        return torch._make_per_channel_quantized_tensor(ints, scales, zeros, int(axis.item()))
    if isinstance(template, (tuple, list)):
        items = [
            None if t is None else decode_entry(f"{key}{_SEP}{i}", t, flat, used)
            for i, t in enumerate(template)
        ]
        return type(template)(items)
    return template


def _encode_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    inner = f"{prefix}model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        value = state_dict[key]
        if isinstance(value, torch.Tensor) and not value.is_quantized:
            continue
        del state_dict[key]
        encode_entry(key, value, state_dict)


def _decode_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    inner = f"{prefix}model."
    model = module.model
    assert isinstance(model, nn.Module)
    template = model.state_dict()
    used: set[str] = set()
    decoded: dict[str, Any] = {}
    for key, value in template.items():
        if isinstance(value, torch.Tensor) and not value.is_quantized:
            continue  # plain tensors load as they are (and are reported missing if absent)
        try:
            decoded[inner + key] = decode_entry(inner + key, value, state_dict, used)
        except KeyError:
            continue  # left missing: load_state_dict reports the key
    for key in used:
        state_dict.pop(key, None)
    state_dict.update(decoded)


def script_quantized(model: nn.Module) -> torch.jit.ScriptModule | None:
    """``model`` compiled with TorchScript, or None where it cannot be scripted.

    Why: torch.ao's quantized modules are thin Python shells around one C++ op each,
    and on a small model their Python dispatch costs as much as the int8 matrix
    multiplies (the digits MLP at batch 32: 145 us eager, 70 us scripted). Scripting,
    not tracing, so that shapes and control flow stay as written. FX writes its own
    annotation aliases into generated code, which TorchScript cannot resolve, so an FX
    graph's types are dropped first (they are annotations only).
    """
    try:
        if isinstance(model, torch.fx.GraphModule):
            for node in model.graph.nodes:
                node.type = None
            model.recompile()
        with quiet_quantization(), warnings.catch_warnings():
            # the zoo's plain ``self.init_kwargs = {...}`` attributes, which it skips
            warnings.filterwarnings("ignore", message=".*TorchScript type system.*")
            scripted = torch.jit.script(model)
    except Exception as exc:  # TorchScript rejects unsupported Python in many ways
        logger.info("Quantized model runs eagerly (TorchScript refused it: %s)", exc)
        return None
    return scripted


def _new_weights_hook(module: QuantizedModule, _keys: Any) -> None:
    module._new_weights()


class QuantizedModule(WrapperModule):
    """Base of the int8 wrappers: CPU-only, saved as plain tensors (see module docstring).

    Inference runs through a TorchScript copy of the quantized model (see
    :func:`script_quantized`), compiled on the first call in eval mode. The copy holds
    the packed weights of its time, so loading a state_dict into this module (or into
    any module holding it) makes the next call compile again; code that swaps packed
    weights in ``self.model`` by hand must load through this module instead.
    """

    # class defaults: whole-module pickles from before the compiled copy existed load
    _compiled: tuple[int, torch.jit.ScriptModule | None] | None = None  # (generation, copy)
    _generation: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_encode_hook)
        self.register_load_state_dict_pre_hook(_decode_hook)
        self.register_load_state_dict_post_hook(_new_weights_hook)

    def _new_weights(self) -> None:
        # plain attribute, not a submodule: the compiled copy is not part of the state.
        # A compile that began before this loaded keeps an older generation: not used.
        object.__setattr__(self, "_generation", next(_GENERATIONS))

    def _runner(self) -> nn.Module:
        tracing = torch._C._get_tracing_state() is not None  # a trace records eager ops
        if self.training or tracing:
            return self.model
        compiled = self._compiled
        if compiled is None or compiled[0] != self._generation:
            with _SCRIPT_LOCK:
                compiled = self._compiled
                generation = self._generation
                if compiled is None or compiled[0] != generation:
                    compiled = (generation, script_quantized(self.model))
                    object.__setattr__(self, "_compiled", compiled)
        return compiled[1] if compiled[1] is not None else self.model

    def scripted(self) -> bool:
        """Whether inference runs through TorchScript (compiles it now if not yet)."""
        was_training = self.training
        self.eval()
        try:
            return self._runner() is not self.model
        finally:
            self.train(was_training)

    def __getstate__(self) -> dict[str, Any]:
        # pickles and deep copies leave the compiled copy behind (it cannot be pickled
        # and would hold the old weights); it is compiled again on first use
        state = dict(super().__getstate__())
        state.pop("_compiled", None)
        return state

    def forward(self, x: torch.Tensor) -> Any:
        run = self._runner()
        if x.device.type == "cpu":
            return run(x)
        out = run(x.cpu())
        return out.to(x.device) if isinstance(out, torch.Tensor) else out

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedModule:
        # int8 kernels and packed weights live on the CPU; .to(cuda)/.half() leave them.
        return self


class DynamicInt8(QuantizedModule):
    """``base`` with its ``layers`` (Linear, LSTM, GRU) dynamically quantized to int8.

    ``mode="fx"`` quantizes a ``torch.fx`` trace, which also fuses Linear+ReLU into one
    int8 kernel; ``"eager"`` swaps the modules in place and works for any model.
    ``input_shape`` (one item) is needed for the trace.
    """

    def __init__(
        self,
        base: dict[str, Any],
        layers: Sequence[str] = ("Linear",),
        engine: str = "fbgemm",
        mode: str = "eager",
        input_shape: Sequence[int] | None = None,
        *,
        _module: nn.Module | None = None,
    ) -> None:
        super().__init__()
        unknown = set(layers) - set(DYNAMIC_LAYERS)
        if unknown:
            raise ModelLoadError(f"Cannot quantize layer types {sorted(unknown)} dynamically.")
        if mode not in ("fx", "eager") or (mode == "fx" and not input_shape):
            raise ModelLoadError(f"Unknown dynamic quantization mode {mode!r} (or no input shape).")
        self.init_kwargs: dict[str, Any] = {
            "base": base,
            "layers": list(layers),
            "engine": engine,
            "mode": mode,
            "input_shape": list(input_shape) if input_shape else None,
        }
        from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig, quantize_dynamic
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        with torch.device("cpu"), quiet_quantization(), quantized_engine(engine):
            module = (_module if _module is not None else build_base(base)).eval()
            classes = [DYNAMIC_LAYERS[name] for name in layers]
            if mode == "fx":
                # global, so that a ReLU after a Linear fuses with it (same qconfig)
                mapping = QConfigMapping().set_global(default_dynamic_qconfig)
                example = torch.zeros(2, *(input_shape or ()))
                self.model = convert_fx(prepare_fx(module, mapping, (example,)))
            else:
                self.model = quantize_dynamic(module, set(classes), dtype=torch.qint8)
        self.eval()


class StaticInt8(QuantizedModule):
    """``base`` fused and quantized to int8 end to end (FX graph mode, post-training).

    The constructor traces ``base`` with ``torch.fx`` and inserts observers; with
    ``_calibration`` batches it records real activation ranges, otherwise (when
    rebuilding for a stored state_dict) the stored scales replace the defaults.
    """

    def __init__(
        self,
        base: dict[str, Any],
        input_shape: Sequence[int],
        engine: str = "x86",
        *,
        _module: nn.Module | None = None,
        _calibration: Sequence[torch.Tensor] = (),
    ) -> None:
        super().__init__()
        self.init_kwargs = {"base": base, "input_shape": list(input_shape), "engine": engine}
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        with torch.device("cpu"), quiet_quantization(), quantized_engine(engine):
            module = _module if _module is not None else build_base(base)
            example = torch.zeros(2, *input_shape)
            try:
                prepared = prepare_fx(
                    module.eval(), get_default_qconfig_mapping(engine), (example,)
                )
            except Exception as exc:  # torch.fx raises many types on untraceable code
                raise OptimizeError(
                    f"Static quantization needs a torch.fx trace of {type(module).__name__}, "
                    f"which failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                    hint="Models with data-dependent control flow cannot be FX-traced; use "
                    "dynamic-int8 or ort-static-int8 instead.",
                ) from exc
            with torch.inference_mode():
                for batch in _calibration:
                    prepared(batch)
            self.model = convert_fx(prepared)
        self.eval()


def dynamic_layer_types(module: nn.Module) -> list[str]:
    """Which of the dynamically quantizable layer types ``module`` contains."""
    found = {type(m) for m in module.modules()}
    return [name for name, cls in DYNAMIC_LAYERS.items() if cls in found]


def quantize_dynamic_int8(
    module: nn.Module,
    base: dict[str, Any],
    example: torch.Tensor,
    engine: str | None = None,
) -> DynamicInt8:
    """A dynamically quantized copy of ``module`` (left untouched): FX mode when the
    model can be traced, eager module swapping otherwise."""
    layers = dynamic_layer_types(module)
    if not layers:
        raise MethodSkipped("no Linear, LSTM or GRU layers to quantize dynamically")
    engine = engine or default_engine("dynamic")
    shape = list(example.shape[1:])
    try:
        return DynamicInt8(base, layers, engine, "fx", shape, _module=copy.deepcopy(module))
    except Exception as exc:  # torch.fx fails in many ways on untraceable code
        logger.info("FX dynamic quantization failed (%s); swapping modules instead", exc)
        return DynamicInt8(base, layers, engine, "eager", _module=copy.deepcopy(module))


def quantize_static_int8(
    module: nn.Module,
    base: dict[str, Any],
    calibration: Sequence[torch.Tensor],
    engine: str | None = None,
) -> StaticInt8:
    """A statically quantized copy of ``module`` calibrated on ``calibration`` batches."""
    if not calibration:
        raise OptimizeError("Static quantization needs calibration batches of real inputs.")
    shape = list(calibration[0].shape[1:])
    return StaticInt8(
        base,
        shape,
        engine or default_engine("static"),
        _module=copy.deepcopy(module).eval(),
        _calibration=calibration,
    )
