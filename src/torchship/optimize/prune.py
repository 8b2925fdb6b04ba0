"""Pruning: zero small weights (unstructured) or remove whole channels (structured).

* **unstructured**: global L1 magnitude pruning of every Conv/Linear weight
  (``torch.nn.utils.prune``), fine-tuned with the mask held, then made permanent. The
  zeros sit in dense tensors: the file and the latency stay the same with dense
  kernels (the report says so); the win is only for sparse kernels or compression.
* **structured** (channels): the least important output channels of every Conv/Linear
  whose output only flows, through channel-wise ops (BatchNorm, activations, dropout,
  pooling, flatten), into other Conv/Linear layers, are cut out; those layers' inputs
  (and the BatchNorms between) shrink with them. The result is a genuinely smaller
  dense model: fewer parameters, a smaller file, fewer FLOPs. Then it is fine-tuned.

Which layers can shrink is found by tracing the model with ``torch.fx``; outputs that
meet a residual ``add``, a ``cat``, a reshape or the model's output are left alone
(ResNet's block-internal convolutions shrink; the residual stream keeps its width).
The shrunk model is stored as :class:`Shrunk`: the parent's architecture plus the kept
width of each layer, rebuilt by running the same analysis on a fresh parent.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import prune as torch_prune

from torchship.errors import ModelLoadError
from torchship.optimize._wrap import WrapperModule, build_base
from torchship.optimize.errors import MethodSkipped, OptimizeError

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_CHANNELWISE_FUNCTIONS: set[Any] = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.sigmoid,
    F.tanh,
}
_POOL_FUNCTIONS: set[Any] = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d,
}
_CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh"}


# --- unstructured -----------------------------------------------------------------------


def prune_unstructured(model: nn.Module, amount: float) -> list[tuple[nn.Module, str]]:
    """Mask the ``amount`` fraction of smallest weights, over all Conv/Linear layers at once.

    The masks stay attached (as ``torch.nn.utils.prune`` hooks) so fine-tuning keeps the
    pruned weights at zero; :func:`make_permanent` bakes them in.
    """
    params: list[tuple[nn.Module, str]] = [
        (m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)
    ]
    if not params:
        raise MethodSkipped("no float Conv/Linear layers to prune")
    torch_prune.global_unstructured(
        params, pruning_method=torch_prune.L1Unstructured, amount=amount
    )
    return params


def make_permanent(params: Sequence[tuple[nn.Module, str]]) -> None:
    for module, name in params:
        torch_prune.remove(module, name)


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the Conv/Linear weights."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, PRUNABLE):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / max(1, total)


# --- structured: which layers can lose channels ------------------------------------------


@dataclass
class Consumer:
    name: str
    expand: int = 1  # after a flatten, each channel is this many consecutive features


@dataclass
class Group:
    """A layer whose output channels can be removed, and what must shrink with it."""

    producer: str
    channels: int
    norms: list[tuple[str, int]] = field(default_factory=list)  # (name, expand)
    consumers: list[Consumer] = field(default_factory=list)


def _module_uses(graph: fx.Graph) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[str(node.target)] = uses.get(str(node.target), 0) + 1
    return uses


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[str(node.target)]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return bool(start == 1 and end == -1)
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return bool(start == 1 and len(node.args) <= 2 and "end_dim" not in node.kwargs)
    return False


def _only_input(user: fx.Node, node: fx.Node) -> bool:
    """``node`` is ``user``'s first argument and no other argument is a graph value."""
    if not user.args or user.args[0] is not node:
        return False
    others = [*user.args[1:], *user.kwargs.values()]
    return not any(isinstance(a, fx.Node) for a in fx.node.map_arg(others, lambda n: n))


def find_groups(model: nn.Module, example: torch.Tensor) -> list[Group]:
    """Trace ``model`` and list the layers whose output channels can be removed."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many types on untraceable code
        raise OptimizeError(
            f"Structured pruning needs a torch.fx trace of {type(model).__name__}, which "
            f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            hint="Models with data-dependent control flow cannot be traced; use "
            "prune-unstructured or distill instead.",
        ) from exc
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(traced).propagate(example)
    modules = dict(traced.named_modules())
    uses = _module_uses(traced.graph)
    groups = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or uses[str(node.target)] != 1:
            continue
        producer = modules[str(node.target)]
        if not isinstance(producer, PRUNABLE) or getattr(producer, "groups", 1) != 1:
            continue
        group = _follow(node, producer, modules, uses)
        if group is not None and group.consumers:
            groups.append(group)
    return groups


def _width(layer: nn.Module, side: str) -> int:
    """A Conv/Linear layer's input or output channel count."""
    if isinstance(layer, nn.Linear):
        return layer.in_features if side == "in" else layer.out_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return layer.in_channels if side == "in" else layer.out_channels
    raise TypeError(f"not a Conv/Linear layer: {type(layer).__name__}")


def _follow(
    start: fx.Node, producer: nn.Module, modules: dict[str, nn.Module], uses: dict[str, int]
) -> Group | None:
    """Walk from ``start``'s output to the layers that consume its channels, or None."""
    is_linear = isinstance(producer, nn.Linear)
    channels = _width(producer, "out")
    group = Group(str(start.target), channels)
    todo: list[tuple[fx.Node, int]] = [(start, 0)]  # (node, expand; 0 = not flattened)
    seen: set[fx.Node] = set()
    while todo:
        node, expand = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if not _only_input(user, node):
                return None
            target = str(user.target)
            module = modules.get(target) if user.op == "call_module" else None
            if isinstance(module, PRUNABLE):
                if uses[target] != 1 or getattr(module, "groups", 1) != 1:
                    return None
                fan_in = _width(module, "in")
                want = channels * max(1, expand)
                if fan_in != want or (expand and not isinstance(module, nn.Linear)):
                    return None
                group.consumers.append(Consumer(target, max(1, expand)))
            elif isinstance(module, _NORMS):
                if uses[target] != 1 or module.num_features != channels * max(1, expand):
                    return None
                group.norms.append((target, max(1, expand)))
                todo.append((user, expand))
            elif (
                isinstance(module, _CHANNELWISE_MODULES)
                or (user.op == "call_function" and user.target in _CHANNELWISE_FUNCTIONS)
                or (user.op == "call_method" and user.target in _CHANNELWISE_METHODS)
            ):
                todo.append((user, expand))
            elif isinstance(module, _POOL_MODULES) or (
                user.op == "call_function" and user.target in _POOL_FUNCTIONS
            ):
                if is_linear or expand:
                    return None  # pooling over features would mix them
                todo.append((user, expand))
            elif _is_flatten(user, modules):
                if is_linear or expand:
                    return None
                shape = node.meta.get("tensor_meta")
                if shape is None or len(shape.shape) < 2:
                    return None
                todo.append((user, max(1, math.prod(shape.shape[2:]))))
            else:
                return None  # add, cat, reshape, output, ...: channels are coupled there
    return group


# --- structured: cutting ---------------------------------------------------------------


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _importance(model: nn.Module, group: Group) -> torch.Tensor:
    """L1 norm of each output channel's weights, scaled by a following BatchNorm's gain."""
    producer = _get(model, group.producer)
    assert isinstance(producer, PRUNABLE)
    weight = producer.weight.detach()
    score = weight.abs().reshape(weight.shape[0], -1).sum(1)
    for name, expand in group.norms:
        bn = _get(model, name)
        if expand == 1 and isinstance(bn, _NORMS) and bn.affine and bn.running_var is not None:
            score = score * bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
    return score


def _expanded(keep: torch.Tensor, expand: int) -> torch.Tensor:
    if expand == 1:
        return keep
    return (keep[:, None] * expand + torch.arange(expand)[None, :]).reshape(-1)


def _resized(
    layer: nn.Module, fan_in: int, fan_out: int
) -> nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear:
    """An empty layer like ``layer`` with other channel counts."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(fan_in, fan_out, bias=layer.bias is not None)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return type(layer)(
            fan_in,
            fan_out,
            layer.kernel_size,  # type: ignore[arg-type]
            stride=layer.stride,  # type: ignore[arg-type]
            padding=layer.padding,  # type: ignore[arg-type]
            dilation=layer.dilation,  # type: ignore[arg-type]
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
        )
    raise TypeError(f"not a Conv/Linear layer: {type(layer).__name__}")


def _cut_out(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    assert isinstance(layer, PRUNABLE)
    new = _resized(layer, _width(layer, "in"), len(keep))
    with torch.no_grad():
        new.weight.copy_(layer.weight[keep])
        if layer.bias is not None and new.bias is not None:
            new.bias.copy_(layer.bias[keep])
    return new


def _cut_in(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    assert isinstance(layer, PRUNABLE)
    new = _resized(layer, len(keep), _width(layer, "out"))
    with torch.no_grad():
        new.weight.copy_(layer.weight[:, keep])
        if layer.bias is not None and new.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def _cut_norm(bn: nn.Module, keep: torch.Tensor) -> nn.Module:
    assert isinstance(bn, _NORMS)
    new = type(bn)(len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
        if bn.running_mean is not None and bn.running_var is not None:
            assert new.running_mean is not None and new.running_var is not None
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
    return new


def shrink(
    model: nn.Module, groups: Sequence[Group], widths: dict[str, int], *, by_importance: bool
) -> None:
    """Cut each group's producer to ``widths[producer]`` channels, in place.

    ``by_importance`` keeps the most important channels (pruning a trained model);
    otherwise the first ones (rebuilding a stored shape before loading its weights).
    """
    for group in groups:
        width = widths.get(group.producer)
        if width is None or width >= group.channels:
            continue
        if by_importance:
            keep = torch.topk(_importance(model, group), width).indices.sort().values
        else:
            keep = torch.arange(width)
        _set(model, group.producer, _cut_out(_get(model, group.producer), keep))
        for name, expand in group.norms:
            _set(model, name, _cut_norm(_get(model, name), _expanded(keep, expand)))
        for consumer in group.consumers:
            _set(
                model,
                consumer.name,
                _cut_in(_get(model, consumer.name), _expanded(keep, consumer.expand)),
            )


class Shrunk(WrapperModule):
    """``base`` with some layers' output channels removed: ``widths`` maps layer -> kept."""

    def __init__(
        self,
        base: dict[str, Any],
        input_shape: Sequence[int],
        widths: dict[str, int],
        *,
        _module: nn.Module | None = None,
        _groups: Sequence[Group] | None = None,
    ) -> None:
        super().__init__()
        self.init_kwargs = {"base": base, "input_shape": list(input_shape), "widths": widths}
        with torch.device("cpu"):
            model = _module if _module is not None else build_base(base)
            groups = _groups
            if groups is None:
                groups = find_groups(model.eval(), torch.zeros(2, *input_shape))
            unknown = set(widths) - {g.producer for g in groups}
            if unknown:
                raise ModelLoadError(
                    f"Cannot shrink {sorted(unknown)}: not prunable in this architecture "
                    "(was it changed since the model was pruned?)."
                )
            shrink(model, groups, widths, by_importance=_module is not None)
        self.model = model
        self.eval()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def prune_structured(
    model: nn.Module, base: dict[str, Any], example: torch.Tensor, amount: float
) -> tuple[Shrunk, list[Group]]:
    """A copy of ``model`` with ``amount`` of each prunable layer's channels removed."""
    work = copy.deepcopy(model).eval()
    groups = find_groups(work, example[:2])
    if not groups:
        raise MethodSkipped(
            "no layer's channels can be removed independently (every Conv/Linear output "
            "meets an add, a cat, a reshape or the model's output)"
        )
    widths = {g.producer: max(1, round(g.channels * (1 - amount))) for g in groups}
    return Shrunk(base, list(example.shape[1:]), widths, _module=work, _groups=groups), groups


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
