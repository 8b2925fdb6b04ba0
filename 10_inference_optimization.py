"""Lesson 10 — Inference optimization, measured: quantization, pruning, distillation,
mixed precision and the CUDA paths.

What you will see (offline, ~40 s on 2 CPU cores):
  1. a digits CNN trained and stored: the fp32 eager "parent";
  2. `torchship.optimize` making one new store version per method (parent recorded):
     dynamic and static int8, ONNX Runtime fp32 and int8, unstructured and structured
     pruning with fine-tuning, a distilled student, bf16/fp16 autocast, and the CUDA
     paths (cuDNN autotuning, torch.compile, CUDA graphs), which say "skipped: no CUDA"
     on a machine without a GPU;
  3. every variant loaded back and measured the same way, interleaved: accuracy on the
     held-out test digits, agreement with the parent, file size, latency, throughput;
  4. a plot of accuracy against latency, one point per variant (a PNG);
  5. the fastest variant within a 1-point accuracy budget, tagged and served by alias.

Run: python 10_inference_optimization.py   (the CLI does the same:
     torchship optimize --model digits --methods all --accuracy-budget 1)
"""

import torch

from torchship.optimize import OptimizeOptions, optimize, plot_tradeoff
from torchship.runtime import load_predictor
from torchship.store import ModelStore
from torchship.tutorial import human_size, say, section, table, workdir
from torchship.zoo import digits

work = workdir("lesson_10")
store = ModelStore(work / "models")
data = digits.load_digits_split()

section("1. The parent: a digits CNN, fp32, eager")
result = digits.train("cnn", data=data, epochs=12)
parent = store.save(
    result.model,
    "digits",
    input_spec=digits.input_spec(),
    labels=digits.LABELS,
    metrics={"test_accuracy": result.test_accuracy},
    examples=data.x_test[:32],
    description="digits CNN, the parent of every optimized version",
)
say(f"saved {parent.ref}: test accuracy {result.test_accuracy:.2%} ({result.seconds:.1f} s)")

section("2. One new version per method, each loaded back and measured")
options = OptimizeOptions(
    # One intra-op thread for every variant: how small models are served (one worker
    # per core), and steady timings on a busy machine. Try threads=2 to compare.
    threads=1,
    measure_seconds=3.0,  # small settings keep the lesson short; the CLI defaults are larger
    min_rounds=10,
    finetune_epochs=3,
    # distil the CNN into a small MLP (an import path + kwargs; 'width:0.25' is the default)
    student="torchship.zoo.digits:DigitsMLP",
    student_kwargs={"hidden": 256, "layers": 1},
    distill_epochs=40,
)
report = optimize(
    store,
    parent.ref,
    "all",
    options=options,
    accuracy_budget=1.0,
    out_dir=work / "report",
    progress=lambda message: say(f"  {message}"),
)

measured = [row for row in report.rows if row.measured]
title = f"{report.parent} and its optimized versions ({report.device}, {report.threads} thread)"
table(
    f"{title}: accuracy and size",
    ["method", "version", "top-1", "drop (pts)", "agreement", "weights file"],
    [
        [
            row.method,
            row.version,
            f"{row.top1:.2%}",
            f"{row.drop_points:+.2f}",
            f"{row.agreement:.1%}",
            human_size(row.size_bytes or 0),
        ]
        for row in measured
    ],
)
table(
    f"{title}: speed",
    ["method", "p50 ms (b1)", "p99 ms (b1)", "items/s (b32)", "x b32", "x b1"],
    [
        [
            row.method,
            f"{row.p50_ms:.3f}",
            f"{row.p99_ms:.3f}",
            f"{row.items_per_s:,.0f}",
            f"{row.speedup:.2f}x",
            f"{row.latency_speedup:.2f}x",
        ]
        for row in measured
    ],
)
for row in report.rows:
    if not row.measured:
        say(f"{row.method}: {row.status}: {row.reason}")
for line in report.description():
    say(f"- {line}")
say("Notes per variant:")
for row in measured[1:]:
    say(f"  {row.method}: {'; '.join(row.notes)}")
say(f"report written to {report.files['markdown']} and {report.files['json']}")

section("3. Accuracy against latency")
png = plot_tradeoff(report, work / "accuracy_vs_latency.png")
say(f"plot saved: {png} (one point per variant; the parent is the square)")

section("4. The fastest variant within 1 point, served by its alias")
if report.picked is None:
    say(f"nothing fits the budget on this machine right now: {report.pick_reason}")
else:
    with load_predictor(store, "digits:optimized") as predictor:
        manifest = predictor.manifest
        probs = torch.softmax(predictor.predict(data.x_test[:8]), dim=1)
        say(
            f"digits:optimized -> {manifest.ref} (parent {manifest.parent}, tags {manifest.tags}), "
            f"runtime {predictor.runtime}"
        )
        say(f"predicted {probs.argmax(1).tolist()}, true {data.y_test[:8].tolist()}")
    say(f"why: {report.pick_reason}")
