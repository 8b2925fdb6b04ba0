"""Lesson 08 — TorchServe: model archives, custom handlers, multi-model serving.

What you will see:
  1. a digits model packaged as TorchServe model archives (.mar): one with the image
     handler and TorchScript, one with the tensor handler and eager weights;
  2. archive loading that refuses a zip-slip archive before writing a byte;
  3. both archives served natively by torchship (no Java), started the way TorchServe
     users start theirs, answering TorchServe's inference and management APIs;
  4. the same archives served by real TorchServe (when Java is installed), with the
     same answers.

Run: python 08_torchserve_deployment.py   (offline, ~20 s; stops everything it starts)
"""

import json
import signal
import subprocess
import sys
import time
import zipfile

import requests
from rich.markup import escape

from torchship.archive import ArchiveError, ModelConfig, build_archive, inspect_archive
from torchship.export import export_torchscript
from torchship.preprocessing import tensor_to_image
from torchship.store import ModelStore
from torchship.torchserve.config import TorchServeConfig, free_port
from torchship.torchserve.process import TorchServe, why_no_torchserve
from torchship.tutorial import human_size, say, section, table, workdir
from torchship.zoo import digits

work = workdir("lesson_08")
store = ModelStore(work / "models")
model_store = work / "model_store"
data = digits.load_digits_split()

section("1. Package a stored model as TorchServe archives")
result = digits.train("mlp", data=data)
store.save(
    result.model,
    "digits",
    input_spec=digits.input_spec(),
    labels=digits.LABELS,
    examples=data.x_test[:32],
)
export_torchscript(store, "digits")  # verified against eager before it is stored
images = build_archive(
    store,
    "digits",
    handler="image",
    export_path=model_store,
    model_name="digits_images",
    config=ModelConfig(batch_size=8, max_batch_delay_ms=5),
)
tensors = build_archive(
    store,
    "digits",
    handler="tensor",
    export_path=model_store,
    model_name="digits_tensors",
    runtime="eager",
)
for built in (images, tensors):
    info = inspect_archive(built.path)
    table(
        f"{built.path.name}: {built.runtime}, {human_size(built.size)}",
        ["entry", "bytes"],
        [[e.name, e.size] for e in info.entries],
    )
say("MAR-INF/MANIFEST.json of digits_images.mar, as TorchServe reads it:")
say(images.manifest.to_json())

section("2. Archives are checked before anything is unpacked")
evil = model_store.parent / "evil.mar"
with zipfile.ZipFile(evil, "w") as zf:
    zf.writestr("../../outside.py", "print('I escaped the model folder')")
    zf.writestr(
        "MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "x", "handler": "h.py"}})
    )
try:
    inspect_archive(evil)
except ArchiveError as exc:
    say(f"evil.mar refused ({exc.status_code}): {exc.message}")

x = data.x_test[:5]
labels = [str(int(y)) for y in data.y_test[:5]]
pngs = []
for i, item in enumerate(x):
    path = work / f"digit_{i}.png"
    tensor_to_image(item, digits.input_spec()).resize((64, 64)).save(path)
    pngs.append(path.read_bytes())


def top1(answer: dict[str, float]) -> str:
    return max(answer, key=answer.get)


section("3. Served natively by torchship: TorchServe's APIs, no Java")
port, mport = free_port(), free_port()
server = subprocess.Popen(
    [
        sys.executable,
        "-m",
        "torchship",
        "serve",
        "--model-store",
        str(model_store),
        "--models",
        "digits_images=digits_images.mar",
        "digits_tensors.mar",
        "--port",
        str(port),
        "--management-port",
        str(mport),
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
base, manage = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}"
native: dict[str, list[str]] = {}
try:
    for _ in range(600):
        try:
            if requests.get(f"{base}/ping", timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    say(
        f"torchship serve --model-store ... --models ...  ->  /ping {requests.get(f'{base}/ping', timeout=5).json()}"
    )
    native["digits_images"] = [
        top1(requests.post(f"{base}/predictions/digits_images", data=png, timeout=30).json())
        for png in pngs
    ]
    native["digits_tensors"] = [
        top1(
            requests.post(
                f"{base}/predictions/digits_tensors", json={"inputs": item.tolist()}, timeout=30
            ).json()
        )
        for item in x
    ]
    bad = requests.post(f"{base}/predictions/digits_images", data=b"not an image", timeout=30)
    say(f"a bad image gets {bad.status_code}: {bad.json()['error']}")
    say(f"GET {manage}/models -> {requests.get(f'{manage}/models', timeout=5).json()}")
    r = requests.put(
        f"{manage}/models/digits_images",
        params={"min_worker": 2, "synchronous": "true"},
        timeout=60,
    )
    say(f"PUT /models/digits_images?min_worker=2 -> {r.json()['status']}")
    described = requests.get(f"{manage}/models/digits_images", timeout=5).json()[0]
    say(
        f"GET /models/digits_images -> version {described['modelVersion']}, batch "
        f"{described['batchSize']}, {len(described['workers'])} workers "
        f"({', '.join(w['status'] for w in described['workers'])})"
    )
    r = requests.delete(f"{manage}/models/digits_tensors", timeout=30)
    say(f"DELETE /models/digits_tensors -> {r.json()['status']}")
    r = requests.post(
        f"{manage}/models", params={"url": "digits_tensors.mar", "initial_workers": 1}, timeout=60
    )
    say(f"POST /models?url=digits_tensors.mar -> {r.json()['status']}")
finally:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
    say(f"native server stopped (exit {server.returncode})")

section("4. The same archives in real TorchServe")
answers = {"native": native}
missing = why_no_torchserve()
if missing is not None:
    say(escape(f"real TorchServe is skipped: {missing}"))
else:
    config = TorchServeConfig(
        home=work / "torchserve",
        model_store=model_store,
        models={"digits_images": "digits_images.mar", "digits_tensors": "digits_tensors.mar"},
    )
    started = time.monotonic()
    with TorchServe(config).start() as ts:
        say(
            f"TorchServe ready after {time.monotonic() - started:.1f} s: every model has a "
            "READY worker in the management API (its /ping says Healthy before that)"
        )
        say(f"token authorization is on; the keys are in {config.home / 'key_file.json'}")
        answers["TorchServe"] = {
            "digits_images": [
                top1(ts.predict("digits_images", png, "image/png").json()) for png in pngs
            ],
            "digits_tensors": [
                top1(
                    ts.predict(
                        "digits_tensors",
                        json.dumps({"inputs": i.tolist()}).encode(),
                        "application/json",
                    ).json()
                )
                for i in x
            ],
        }
        say(f"TorchServe GET /models -> {ts.management('GET', '/models').json()}")
    say(f"TorchServe stopped; running: {ts.running()}")
rows = [["true label", "", *labels]]
for server_name, by_model in answers.items():
    for model, predicted in by_model.items():
        rows.append([server_name, model, *predicted])
table("Top-1 answers for five test digits", ["server", "model", *[f"#{i}" for i in range(5)]], rows)
same = all(a == answers["native"] for a in answers.values())
say(f"same answers from every server: {same}")
