"""Export a stored model to TorchScript or ONNX, verified against eager before it is stored.

>>> from torchship.export import export_onnx, export_torchscript
>>> export_torchscript(store, "digits", method="trace")  # doctest: +SKIP
>>> export_onnx(store, "digits", exporter="dynamo")  # doctest: +SKIP

The verdict (max abs diff, tolerance, latency vs eager) is written into the manifest;
``torchship.runtime.load_predictor(runtime="auto")`` only considers artifacts that passed.
"""

from torchship.export.onnx import OnnxExporter, export_onnx, to_onnx
from torchship.export.torchscript import TorchScriptMethod, export_torchscript, to_torchscript
from torchship.export.verify import verify_outputs

__all__ = [
    "OnnxExporter",
    "TorchScriptMethod",
    "export_onnx",
    "export_torchscript",
    "to_onnx",
    "to_torchscript",
    "verify_outputs",
]
