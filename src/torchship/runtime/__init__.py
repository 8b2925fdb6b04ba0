"""Run a stored model: one ``Predictor`` interface over eager, TorchScript and ONNX Runtime.

>>> from torchship.runtime import load_predictor
>>> predictor = load_predictor("models", "digits", runtime="auto")  # doctest: +SKIP
>>> predictor.predict(batch)  # doctest: +SKIP
"""

from torchship.runtime.base import Predictor, RuntimeName, Selection
from torchship.runtime.eager import EagerPredictor
from torchship.runtime.loader import RuntimeChoice, load_predictor, verified_artifacts
from torchship.runtime.ort import OnnxPredictor, create_session
from torchship.runtime.threads import set_threads
from torchship.runtime.torchscript import TorchScriptPredictor, load_torchscript

__all__ = [
    "EagerPredictor",
    "OnnxPredictor",
    "Predictor",
    "RuntimeChoice",
    "RuntimeName",
    "Selection",
    "TorchScriptPredictor",
    "create_session",
    "load_predictor",
    "load_torchscript",
    "set_threads",
    "verified_artifacts",
]
