"""ONNX Runtime: the portable artifact, often the fastest on CPU for small models.

``onnxruntime`` is imported only when a session is created, so the rest of torchship
works without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from torchship.errors import MissingDependencyError, ModelLoadError
from torchship.runtime.base import Predictor, RuntimeName
from torchship.runtime.threads import resolve_threads

if TYPE_CHECKING:
    from torchship.store import ModelStore
    from torchship.store.manifest import Manifest

logger = logging.getLogger(__name__)


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx", "ONNX Runtime inference") from exc
    return onnxruntime


def create_session(
    path: str | Path, device: torch.device | None = None, *, threads: int | None = None
) -> Any:
    """An ``InferenceSession`` with explicit threads and full graph optimisation.

    ``intra_op_num_threads`` is ``threads`` (default: torch's current setting, so both
    runtimes get the same cores); ``inter_op_num_threads`` is 1 because the sequential
    executor never uses more. CUDA is used when ``device`` is cuda and the installed
    onnxruntime has it; otherwise the session runs on the CPU (logged as a warning).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    providers: list[Any] = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            cuda = ("CUDAExecutionProvider", {"device_id": device.index or 0})
            providers = [cuda, "CPUExecutionProvider"]
        else:
            logger.warning(
                "device %s asked for, but this onnxruntime has no CUDAExecutionProvider; "
                "running ONNX on the CPU (pip install onnxruntime-gpu for CUDA)",
                device,
            )
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"ONNX Runtime cannot load {Path(path).name}: {exc}") from exc


class OnnxPredictor(Predictor):
    runtime: RuntimeName = "onnxruntime"

    def __init__(
        self,
        session: Any,
        manifest: Manifest,
        device: torch.device | None = None,
        *,
        examples: torch.Tensor | None = None,
        threads: int | None = None,
    ) -> None:
        # ``device`` is what was asked for; report where the session really runs.
        on_cuda = "CUDAExecutionProvider" in session.get_providers()
        if not on_cuda:
            device = torch.device("cpu")
        elif device is None or device.type != "cuda":
            device = torch.device("cuda")
        super().__init__(manifest, device, examples=examples, threads=threads)
        self.session: Any = session
        first = session.get_inputs()[0]
        self._input_name: str = first.name
        self._input_dtype = np.float16 if first.type == "tensor(float16)" else np.float32

    @classmethod
    def from_store(
        cls,
        store: ModelStore,
        manifest: Manifest,
        device: torch.device,
        *,
        examples: torch.Tensor | None = None,
        threads: int | None = None,
    ) -> OnnxPredictor:
        """Open the version's ``onnx`` artifact (checksums already verified)."""
        path = store.artifact_path(manifest.ref, "onnx")
        session = create_session(path, device, threads=threads)
        return cls(session, manifest, device, examples=examples, threads=resolve_threads(threads))

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if self.session is None:
            raise RuntimeError(f"{self!r} was closed.")
        array = batch.detach().cpu().numpy().astype(self._input_dtype, copy=False)
        outputs = self.session.run(None, {self._input_name: array})
        return torch.from_numpy(np.asarray(outputs[0]))

    def close(self) -> None:
        self.session = None
