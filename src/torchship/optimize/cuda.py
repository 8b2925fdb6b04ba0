"""CUDA paths: cuDNN autotuning, ``torch.compile`` and CUDA graphs.

All three need a GPU to pay off and are only offered when ``torch.cuda.is_available()``
(the report says ``skipped: no CUDA`` otherwise). The stored version is the parent's
weights plus the mode; the wrapper applies it on the first CUDA call:

* ``cudnn-benchmark``: ``torch.backends.cudnn.benchmark = True``: cuDNN times its
  convolution algorithms for each new input shape and keeps the fastest. It is a
  process-wide switch (it affects every model in the process).
* ``compile``: ``torch.compile`` (TorchInductor): fused Triton kernels. On a CPU it would
  build C++ kernels instead, which takes tens of seconds per model and input shape;
  it is only tried there when asked for (``compile_on_cpu``).
* ``cuda-graphs``: each input shape is captured once into a CUDA graph and replayed,
  which removes the per-kernel launch cost that dominates small models. "Where the
  model allows": capture needs static shapes, no CPU synchronisation and no
  data-dependent control flow; a shape that cannot be captured runs eagerly instead
  (logged once), and the optimize step refuses a model that cannot be captured at all.
"""

from __future__ import annotations

import logging
import shutil
import threading
from typing import Any

import torch
from torch import nn

from torchship.optimize._wrap import WrapperModule, build_base, first_tensor
from torchship.optimize.errors import MethodSkipped

logger = logging.getLogger(__name__)

MODES = ("cudnn-benchmark", "compile", "cuda-graphs")
MAX_GRAPHS = 16  # captured shapes kept per module; others run eagerly


class CudaOptimized(WrapperModule):
    """``base`` run with one of :data:`MODES` on CUDA (eagerly elsewhere)."""

    def __init__(
        self,
        base: dict[str, Any],
        mode: str,
        compile_on_cpu: bool = False,
        *,
        _module: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.init_kwargs = {"base": base, "mode": mode, "compile_on_cpu": compile_on_cpu}
        self.model = _module if _module is not None else build_base(base)
        self.mode = mode
        self.compile_on_cpu = compile_on_cpu
        # plain dicts, not submodules: nothing here belongs in the state_dict
        self._compiled: dict[str, Any] = {}
        self._graphs: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, Any]] = {}
        self._eager_shapes: set[tuple[Any, ...]] = set()
        # a graph replays into fixed buffers: one caller at a time per module
        self._lock = threading.Lock()
        self.eval()

    def forward(self, x: torch.Tensor) -> Any:
        if x.device.type != "cuda":
            if self.mode == "compile" and self.compile_on_cpu:
                return self._compiled_model()(x)
            return self.model(x)
        if self.mode == "cudnn-benchmark":
            torch.backends.cudnn.benchmark = True
            return self.model(x)
        if self.mode == "compile":
            return self._compiled_model()(x)
        return self._replay(x)

    def _compiled_model(self) -> Any:
        with self._lock:
            if "model" not in self._compiled:
                self._compiled["model"] = torch.compile(self.model)
            return self._compiled["model"]

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self._replay_locked(x)

    def _replay_locked(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled())
        entry = self._graphs.get(key)
        if entry is None:
            if key in self._eager_shapes or len(self._graphs) >= MAX_GRAPHS:
                return first_tensor(self.model(x))
            try:
                entry = capture(self.model, x)
            except Exception as exc:  # capture fails in many ways: sync, dynamic shapes, ...
                logger.warning("CUDA graph capture failed for shape %s (%s); eager", key[0], exc)
                self._eager_shapes.add(key)
                return first_tensor(self.model(x))
            self._graphs[key] = entry
        static_in, static_out, graph = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out


def capture(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Capture ``model(x)`` into a CUDA graph: (static input, static output, graph)."""
    static_in = x.clone()
    stream = torch.cuda.Stream(device=x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: cuDNN/cuBLAS workspaces, allocator pools
            model(static_in)
    torch.cuda.current_stream(x.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = first_tensor(model(static_in))
    return static_in, static_out, graph


def require_cuda(device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise MethodSkipped("no CUDA")
    if device.type != "cuda":
        raise MethodSkipped(f"measuring on {device}; use --device cuda")


def compile_on_cpu_reason() -> str | None:
    """Why ``torch.compile`` cannot run on this CPU, or None when it can."""
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++), and there is none"
    return None
