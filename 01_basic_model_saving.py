"""Lesson 01 — Saving and loading PyTorch models.

What you will see:
  1. the two ways to save a model (state_dict vs the whole pickled model) and their sizes;
  2. why loading a pickle is dangerous, and how torch.load(weights_only=True) protects you;
  3. torchship's ModelStore: versions, a manifest with checksums, atomic writes, aliases;
  4. training checkpoints that resume exactly where a crashed run stopped;
  5. the classic pitfall: forgetting model.eval() before inference.

Run: python 01_basic_model_saving.py   (offline, ~15 s on a laptop CPU)
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from torchship.errors import IntegrityError, UntrustedPickleError
from torchship.store import CheckpointManager, ModelStore
from torchship.store.serialization import safe_torch_load
from torchship.tutorial import human_size, say, section, table, workdir
from torchship.zoo import digits

torch.set_num_threads(2)
work = workdir("lesson_01")

section("1. Train a small CNN on the 8x8 digits (bundled with scikit-learn, no download)")
data = digits.load_digits_split()
result = digits.train("cnn", data=data)
model = result.model
say(f"DigitsCNN: test accuracy {result.test_accuracy:.2%} after {result.seconds:.1f} s")

section("2. state_dict vs whole model")
torch.save(model.state_dict(), work / "digits_state_dict.pth")  # tensors only
torch.save(model, work / "digits_whole_model.pth")  # pickles the class reference too
table(
    "Two ways to save",
    ["file", "size", "needs the class code to load?", "safe to load from strangers?"],
    [
        [
            "digits_state_dict.pth",
            human_size((work / "digits_state_dict.pth").stat().st_size),
            "yes (you rebuild it)",
            "yes, with weights_only=True",
        ],
        [
            "digits_whole_model.pth",
            human_size((work / "digits_whole_model.pth").stat().st_size),
            "yes (pickle imports it)",
            "NO: unpickling runs code",
        ],
    ],
)
restored = digits.DigitsCNN()
restored.load_state_dict(torch.load(work / "digits_state_dict.pth", weights_only=True))
restored.eval()
x = data.x_test[:5]
say(f"state_dict reloaded, same outputs: {torch.equal(restored(x), model(x))}")

section("3. A malicious 'model' file")


class Payload:
    def __reduce__(self):  # what an attacker puts in a .pth file
        return (print, ("!!! this line was printed by code hidden inside the file !!!",))


torch.save({"weight": torch.zeros(3), "surprise": Payload()}, work / "innocent_looking.pth")
try:
    safe_torch_load(work / "innocent_looking.pth")  # torch.load(..., weights_only=True)
except UntrustedPickleError as exc:
    say(f"[green]refused[/]: {exc.message}")
say(
    "With weights_only=False the hidden code would have run on load. torchship never does "
    "that unless you pass trust_pickle=True for a file you made yourself."
)

section("4. The ModelStore: versions + manifest + checksums + atomic writes")
store = ModelStore(work / "models")
m1 = store.save(
    model,
    "digits",
    input_spec=digits.input_spec(),
    labels=digits.LABELS,
    metrics={"test_accuracy": result.test_accuracy},
    examples=data.x_test[:32],
    aliases=["production"],
)
m2 = store.save(model, "digits", format="whole", description="whole-model pickle, for comparison")
say(f"saved {m1.ref} (state_dict, safetensors) and {m2.ref} (whole model, pickle)")
table(
    f"{store.root}/digits",
    ["version", "format", "files", "aliases"],
    [
        [
            m.version,
            m.weights.format,
            ", ".join(f"{f} ({human_size(e.size)})" for f, e in m.files.items()),
            ", ".join(a for a, v in store.aliases("digits").items() if v == m.version),
        ]
        for m in store.manifests("digits")
    ],
)
say(f"manifest.json records: {', '.join(m1.model_dump().keys())}")
loaded = store.load("digits:production")
say(
    f"loaded digits:production -> version {store.resolve('digits', 'production')}, eval mode: {not loaded.training}"
)
try:
    store.load("digits:2")
except UntrustedPickleError as exc:
    say(f"whole-model version refused without trust: {exc.hint}")

weights = store.path("digits", "1") / "weights.safetensors"
blob = bytearray(weights.read_bytes())
blob[len(blob) // 2] ^= 0xFF  # one flipped byte, as a bad disk or an attacker would do
weights.write_bytes(bytes(blob))
try:
    store.load("digits:1")
except IntegrityError as exc:
    say(f"[green]tampering detected[/]: {exc.message}")

section("5. Checkpoints: crash, resume, same result")


def run(
    epochs: int, manager: CheckpointManager | None, crash_at: int | None = None
) -> torch.nn.Module:
    torch.manual_seed(0)
    net = digits.DigitsMLP(hidden=128)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = 0
    if manager is not None and (resumed := manager.resume(net, opt)) is not None:
        start = resumed.step
        say(f"  resumed from epoch {start} (val_loss {resumed.metrics['val_loss']:.4f})")
    else:
        torch.manual_seed(1)
    for epoch in range(start, epochs):
        if epoch == crash_at:
            say(f"  ...process 'crashes' before epoch {epoch + 1}")
            return net
        net.train()
        for idx in torch.randperm(len(data.x_train)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val = F.cross_entropy(net(data.x_test), data.y_test).item()
        if manager is not None:
            manager.save(epoch + 1, net, opt, metrics={"val_loss": val})
    return net


straight = run(4, None)
ckpt = CheckpointManager(
    work / "checkpoints", keep_last=2, keep_best=1, metric="val_loss", mode="min"
)
run(4, ckpt, crash_at=2)
resumed = run(4, ckpt)
same = all(
    torch.equal(a, b)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True)
)
say(f"resumed run == uninterrupted run, bit for bit: {same}")
say(f"kept checkpoints: {[c.step for c in ckpt.checkpoints()]} (last 2 + best 1 by val_loss)")

section("6. Pitfall: forgetting model.eval()")
model.train()  # dropout active, batchnorm uses batch statistics
a, b = model(x), model(x)
model.eval()
c, d = model(x), model(x)
say(f"train mode: two calls agree? {torch.allclose(a, b)}   eval mode: {torch.equal(c, d)}")
say("ModelStore.load() always returns the model in eval mode.")
say(f"\nFiles of this lesson are in {Path(work).resolve()}")
