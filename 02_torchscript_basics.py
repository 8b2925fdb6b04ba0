"""Lesson 02 — TorchScript: tracing vs scripting.

What you will see:
  1. tracing and scripting a digits CNN, and the TorchScript code scripting produces;
  2. where tracing is silently wrong: a model with data-dependent control flow;
  3. freezing and optimize_for_inference, and what they do to latency;
  4. a saved TorchScript file running in a fresh process that never imports the model's
     Python class;
  5. the verified export into the model store.

Run: python 02_torchscript_basics.py   (offline, ~20 s)
"""

import subprocess
import sys
import time
import warnings

import torch

from torchship.export import export_torchscript, to_torchscript, verify_outputs
from torchship.store import ModelStore
from torchship.tutorial import say, section, table, workdir
from torchship.zoo import ControlFlowNet, digits

torch.set_num_threads(1)
work = workdir("lesson_02")
data = digits.load_digits_split()

section("1. Trace vs script on a plain CNN")
model = digits.train("cnn", data=data).model.eval()
example = data.x_test[:8]
traced = torch.jit.trace(model, example)  # runs the model once and records the ops
scripted = torch.jit.script(model)  # compiles forward()'s Python source
with torch.inference_mode():
    ref = model(data.x_test)
    say(f"traced   max |diff| vs eager: {(traced(data.x_test) - ref).abs().max():.2e}")
    say(f"scripted max |diff| vs eager: {(scripted(data.x_test) - ref).abs().max():.2e}")
say("TorchScript that scripting produced (first lines of forward):")
say("\n".join("    " + line for line in scripted.code.strip().splitlines()[:6]))

section("2. Control flow: tracing records one path, scripting keeps the `if`")
torch.manual_seed(0)
net = ControlFlowNet().eval()
positive = torch.rand(4, 8) + 0.1  # sum > 0: the 'positive' branch
negative = -positive  # sum < 0: the other branch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    traced_net = torch.jit.trace(net, positive)
tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
say(
    f"torch.jit.trace raised {len(tracer)} TracerWarning(s), e.g.: {str(tracer[0].message)[:100]}..."
)
deprecated = [w for w in caught if "deprecated" in str(w.message)]
if deprecated:
    say(f"[dim]and, in torch {torch.__version__}: {str(deprecated[0].message)[:110]}[/]")
scripted_net = torch.jit.script(net)
with torch.inference_mode():
    rows = [
        [
            name,
            f"{(traced_net(x) - net(x)).abs().max():.3f}",
            f"{(scripted_net(x) - net(x)).abs().max():.3f}",
        ]
        for name, x in [("positive input (as traced)", positive), ("negative input", negative)]
    ]
table("max |diff| against eager", ["input", "traced", "scripted"], rows)
both = torch.cat([positive, negative])
for method, module in (("trace", traced_net), ("script", scripted_net)):
    v = verify_outputs(net, module, both, batch_sizes=(4,))
    say(f"verify_outputs({method}): passed={v.passed}, max |diff| {v.max_abs_diff:.3f}")
say("=> always verify an export on real inputs that cover every branch; torchship does.")

section("3. Freeze + optimize_for_inference")


def latency_ms(fn, x: torch.Tensor, runs: int = 200) -> float:
    with torch.inference_mode():
        for _ in range(10):
            fn(x)
        start = time.perf_counter()
        for _ in range(runs):
            fn(x)
    return (time.perf_counter() - start) / runs * 1000


variants = {
    "eager": model,
    "traced": traced,
    "scripted": scripted,
    "scripted + frozen + optimized": to_torchscript(
        model, example, method="script", freeze=True, optimize=True
    ),
}
rows = []
for name, fn in variants.items():
    rows.append(
        [
            name,
            f"{latency_ms(fn, data.x_test[:1]):.3f}",
            f"{latency_ms(fn, data.x_test[:32], 100):.3f}",
        ]
    )
table("latency (ms, 1 thread)", ["variant", "batch 1", "batch 32"], rows)
say("Freezing inlines weights as constants; optimize_for_inference fuses conv+bn and more.")
plain, tuned = float(rows[2][1]), float(rows[3][1])
if tuned > plain:
    say(
        f"Here it is slower at batch 1 ({tuned:.3f} vs {plain:.3f} ms; batch 32: "
        f"{rows[3][2]} vs {rows[2][2]} ms): on a CPU it also moves convolutions to "
        "MKL-DNN's layout, whose per-call conversions cost more than one small item "
        "computes. Measure at your batch sizes before you ship: `--runtime auto` does."
    )

section("4. A TorchScript file runs without the model's Python code")
path = (work / "digits_cnn.ts").resolve()
torch.jit.save(scripted, str(path))
torch.save(data.x_test[:5].clone(), work / "x.pt")
code = (
    "import torch, sys; m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2]);"
    "print(m(x).argmax(1).tolist(), 'torchship imported:', 'torchship' in sys.modules)"
)
out = subprocess.run(
    [sys.executable, "-c", code, str(path), str((work / "x.pt").resolve())],
    capture_output=True,
    text=True,
    check=True,
    cwd="/",
)
say(f"fresh process, only torch: {out.stdout.strip()}   (true {data.y_test[:5].tolist()})")
say("The same file loads in C++ with torch::jit::load (LibTorch), no Python needed.")

section("5. Verified export into the store")
store = ModelStore(work / "models")
store.save(
    model, "digits", input_spec=digits.input_spec(), labels=digits.LABELS, examples=data.x_test[:64]
)
manifest = export_torchscript(store, "digits", method="script")
v = manifest.artifacts["torchscript"].verification
assert v is not None
say(
    f"{manifest.ref}: model.ts verified at batch sizes {v.batch_sizes}, max |diff| "
    f"{v.max_abs_diff:.1e} <= {v.tolerance:.0e}; {v.latency_ms:.3f} ms vs eager {v.reference_latency_ms:.3f} ms"
)
