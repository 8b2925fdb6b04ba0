"""Lesson 03 — ONNX export and ONNX Runtime inference.

What you will see:
  1. exporting with the new dynamo-based exporter and the legacy TorchScript-based one,
     with an explicit opset, named inputs/outputs and a dynamic batch axis;
  2. onnx.checker and a look inside the graph;
  3. ONNX Runtime inference with NumPy only (no torch needed on the serving side);
  4. verification: max |diff| against eager at several batch sizes, and latency —
     written into the model's manifest, refused when past the tolerance.

Run: python 03_onnx_export.py   (offline, ~20 s)
"""

import time

import numpy as np
import onnx
import onnxruntime as ort
import torch

from torchship.errors import ExportVerificationError
from torchship.export import export_onnx, to_onnx
from torchship.runtime import load_predictor
from torchship.store import ModelStore
from torchship.tutorial import human_size, say, section, table, workdir
from torchship.zoo import digits

torch.set_num_threads(1)
work = workdir("lesson_03")

section("1. A trained digits CNN in the store")
data = digits.load_digits_split()
result = digits.train("cnn", data=data)
store = ModelStore(work / "models")
m = store.save(
    result.model,
    "digits",
    input_spec=digits.input_spec(),
    labels=digits.LABELS,
    metrics={"test_accuracy": result.test_accuracy},
    examples=data.x_test[:64],
)
say(f"{m.ref}: test accuracy {result.test_accuracy:.2%}")

section("2. Two exporters, one file format")
model = store.load("digits")
rows = []
for exporter in ("dynamo", "legacy"):
    start = time.monotonic()
    path = to_onnx(
        model,
        data.x_test[:4],
        work / f"digits_{exporter}.onnx",
        exporter=exporter,
        input_names=["input"],
        output_names=["logits"],
    )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)  # to_onnx already ran it; shown here for the lesson
    inp = proto.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    rows.append(
        [
            exporter,
            f"{time.monotonic() - start:.1f} s",
            proto.opset_import[0].version,
            f"{inp.name}{dims}",
            len(proto.graph.node),
            human_size(path.stat().st_size),
        ]
    )
table(
    "torch.onnx.export(dynamo=True) vs the legacy exporter",
    ["exporter", "export time", "opset", "input", "nodes", "size"],
    rows,
)
say("The batch axis is symbolic, so one file serves batch 1 and batch 1000.")

section("3. ONNX Runtime: NumPy in, NumPy out")
session = ort.InferenceSession(str(work / "digits_dynamo.onnx"), providers=["CPUExecutionProvider"])
batch = data.x_test[:7].numpy()
(logits,) = session.run(None, {"input": batch})
say(
    f"input {batch.shape} -> logits {logits.shape}; predicted {logits.argmax(1).tolist()} "
    f"true {data.y_test[:7].tolist()}"
)
with torch.inference_mode():
    eager = model(torch.from_numpy(batch)).numpy()
say(f"max |onnxruntime - eager| = {np.abs(logits - eager).max():.2e}")

section("4. Verified export into the store")
manifest = export_onnx(store, "digits", exporter="dynamo")
v = manifest.artifacts["onnx"].verification
assert v is not None
table(
    "written into manifest.json",
    ["batch sizes", "max |diff|", "tolerance", "eager latency", "onnxruntime latency"],
    [
        [
            v.batch_sizes,
            f"{v.max_abs_diff:.2e}",
            f"{v.tolerance:.0e}",
            f"{v.reference_latency_ms:.3f} ms",
            f"{v.latency_ms:.3f} ms",
        ]
    ],
)
try:
    export_onnx(store, "digits", exporter="legacy", tolerance=1e-12)
except ExportVerificationError as exc:
    say(f"[yellow]a too-strict tolerance is refused and nothing is stored[/]: {exc.message}")

section("5. Let torchship pick the fastest verified runtime for this machine")
predictor = load_predictor(store, "digits", runtime="auto", threads=1)
say(str(predictor.selection))
probs = torch.softmax(predictor.predict(data.x_test[:5]), 1)
say(f"predictions: {probs.argmax(1).tolist()} (true {data.y_test[:5].tolist()})")
