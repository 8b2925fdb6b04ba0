"""ONNX Runtime variants: the fp32 graph with ORT's optimizations, and ORT int8.

* ``onnxruntime``: the parent exported to ONNX (its verified ``onnx`` artifact when it
  has one), run with every graph optimization ORT has (constant folding, Conv+BN and
  GEMM fusions, layout changes).
* ``ort-dynamic-int8``: ``onnxruntime.quantization.quantize_dynamic``: int8 weights,
  activations quantized per batch (MatMulInteger / ConvInteger).
* ``ort-static-int8``: ``quantize_static`` in QDQ format with per-channel weights,
  calibrated (MinMax) on real inputs.

Storage: :class:`OnnxModule` is an ``nn.Module`` whose only tensor is the ONNX file's
bytes (``uint8``) and whose forward runs that graph in ONNX Runtime. The version is a
plain safetensors file, so it loads through the store like any other version (no
pickle, no extra artifact to keep in sync) and ``load_predictor`` serves it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchship.errors import ExportError, MissingDependencyError, ModelLoadError
from torchship.optimize.errors import OptimizeError
from torchship.runtime.ort import create_session, import_onnxruntime
from torchship.runtime.threads import resolve_threads
from torchship.store import Manifest, ModelStore

logger = logging.getLogger(__name__)


def _reset_session(module: OnnxModule, _incompatible: Any) -> None:
    module._session = None  # the bytes changed: open a new session on the next call


class OnnxModule(nn.Module):
    """Runs an ONNX graph, held as a ``uint8`` buffer, in ONNX Runtime.

    ``size`` is the file's length in bytes (so the buffer can be allocated before the
    stored bytes are loaded into it). The session is opened on the first call with
    torch's current intra-op thread count, on CUDA when the buffer was moved there and
    this onnxruntime has the CUDA provider.
    """

    onnx_model: torch.Tensor

    def __init__(self, size: int, *, _data: bytes | None = None) -> None:
        super().__init__()
        self.init_kwargs = {"size": int(size)}
        if _data is not None:
            if len(_data) != size:
                raise ValueError("size does not match the ONNX bytes")
            buffer = torch.frombuffer(bytearray(_data), dtype=torch.uint8)
        else:
            buffer = torch.zeros(int(size), dtype=torch.uint8)
        self.register_buffer("onnx_model", buffer)
        self._session: Any = None
        self.register_load_state_dict_post_hook(_reset_session)

    def onnx_bytes(self) -> bytes:
        return bytes(self.onnx_model.detach().cpu().numpy().tobytes())

    def session(self) -> Any:
        if self._session is None:
            self._session = open_session(self.onnx_bytes(), self.onnx_model.device)
        return self._session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = self.session()
        name = session.get_inputs()[0].name
        array = x.detach().cpu().numpy().astype(np.float32, copy=False)
        out = torch.from_numpy(np.asarray(session.run(None, {name: array})[0]))
        return out if x.device.type == "cpu" else out.to(x.device)

    def _apply(self, fn: Any, recurse: bool = True) -> OnnxModule:
        before = self.onnx_model.device
        super()._apply(fn, recurse)  # .half()/.float() leave a uint8 buffer alone
        if self.onnx_model.device != before:
            self._session = None
        return self


def open_session(model: bytes, device: torch.device) -> Any:
    """An ONNX Runtime session for ``model`` as :func:`torchship.runtime.create_session`
    makes them (torch's thread count, full graph optimization), but with spin-waiting off.

    ORT's worker threads spin for a while after each call by default. An optimized
    variant usually shares its process with torch models (in ``torchship optimize``
    every variant does), and spinning threads would take the cores away from them.
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(None)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"ONNX Runtime cannot load the stored graph: {exc}") from exc


# --- producing the graphs -------------------------------------------------------------


def parent_onnx(
    store: ModelStore, manifest: Manifest, parent: nn.Module, inputs: torch.Tensor
) -> tuple[bytes, str]:
    """The parent as ONNX bytes: its verified ``onnx`` artifact, else a fresh export.

    A fresh export is verified against the eager parent (dynamo exporter first, the
    legacy tracer if that fails) before it is used.
    """
    artifact = manifest.artifacts.get("onnx")
    if artifact is not None and artifact.verification is not None and artifact.verification.passed:
        path = store.artifact_path(manifest.ref, "onnx")
        return path.read_bytes(), f"the parent's verified ONNX export ({artifact.method})"
    from torchship.export import to_onnx, verify_outputs
    from torchship.export._store import example_for_export
    from torchship.export.onnx import onnx_runner

    problems = []
    for exporter in ("dynamo", "legacy"):
        with tempfile.TemporaryDirectory(prefix="torchship-optimize-") as tmp:
            path = Path(tmp) / "model.onnx"
            try:
                to_onnx(parent, example_for_export(inputs), path, exporter=exporter)  # type: ignore[arg-type]
            except ExportError as exc:
                problems.append(f"{exporter}: {exc.message}")
                continue
            session = create_session(path, torch.device("cpu"))
            verdict = verify_outputs(parent, onnx_runner(session), inputs, batch_sizes=(1, 8))
            if verdict.passed:
                return path.read_bytes(), f"exported now ({exporter} exporter), verified"
            problems.append(
                f"{exporter}: differs from eager by {verdict.max_abs_diff:.3g} "
                f"(tolerance {verdict.tolerance:.3g})"
            )
    raise OptimizeError(
        f"Could not export {manifest.ref} to an ONNX graph that matches it: " + "; ".join(problems),
        hint="Export it yourself (torchship export --format onnx) to see the details.",
    )


def _quantization_module() -> Any:
    import_onnxruntime()
    try:
        import onnxruntime.quantization as quantization
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx", "ONNX Runtime quantization") from exc
    return quantization


def _preprocess(quantization: Any, source: Path, target: Path) -> Path:
    """ORT's recommended pre-processing (shape inference, graph clean-up), when it works."""
    try:
        quantization.shape_inference.quant_pre_process(str(source), str(target))
        return target
    except Exception as exc:  # symbolic shape inference fails on some graphs; it is optional
        logger.info("quant_pre_process skipped: %s", exc)
        return source


def _input_name(path: Path) -> str:
    import onnx

    return str(onnx.load(str(path), load_external_data=False).graph.input[0].name)


def quantize_ort(
    fp32: bytes, mode: str, calibration: Sequence[torch.Tensor] = ()
) -> tuple[bytes, list[str]]:
    """Quantize an fp32 ONNX graph with ONNX Runtime; ``mode`` is dynamic or static."""
    q = _quantization_module()
    with tempfile.TemporaryDirectory(prefix="torchship-ort-quant-") as tmp:
        source = Path(tmp) / "fp32.onnx"
        source.write_bytes(fp32)
        prepared = _preprocess(q, source, Path(tmp) / "prepared.onnx")
        target = Path(tmp) / "int8.onnx"
        try:
            if mode == "dynamic":
                q.quantize_dynamic(str(prepared), str(target), weight_type=q.QuantType.QInt8)
                notes = ["int8 weights (MatMulInteger/ConvInteger), activations per batch"]
            elif mode == "static":
                if not calibration:
                    raise OptimizeError("ORT static quantization needs calibration batches.")
                reader = _reader(q, _input_name(prepared), calibration)
                q.quantize_static(
                    str(prepared),
                    str(target),
                    reader,
                    quant_format=q.QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=q.QuantType.QUInt8,
                    weight_type=q.QuantType.QInt8,
                    calibrate_method=q.CalibrationMethod.MinMax,
                )
                items = sum(len(b) for b in calibration)
                notes = [f"QDQ int8, per-channel weights, MinMax-calibrated on {items} inputs"]
            else:
                raise ValueError(f"unknown ORT quantization mode {mode!r}")
        except OptimizeError:
            raise
        except Exception as exc:  # onnxruntime.quantization raises many types
            raise OptimizeError(
                f"ONNX Runtime {mode} quantization failed: {type(exc).__name__}: {exc}"
            ) from exc
        return target.read_bytes(), notes


def _reader(quantization: Any, input_name: str, batches: Sequence[torch.Tensor]) -> Any:
    """A ``CalibrationDataReader`` over real input batches."""
    feeds = [{input_name: b.detach().cpu().numpy()} for b in batches]

    class Reader(quantization.CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    return Reader()
