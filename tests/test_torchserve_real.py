"""Real TorchServe (Java) serving archives built by torch-model-archiver and torchship.

One TorchServe for the module, started and stopped through ``torchship torchserve``,
with two models; skipped only where Java is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from archive_utils import BASE_HANDLER_SOURCE, DIGIT_PNG, HANDLERS, digits_store, model_archiver

from torchship.archive import build_archive
from torchship.torchserve.process import TorchServe, java_available
from torchship.zoo import digits

pytestmark = pytest.mark.slow


def torchship(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchship", *args], capture_output=True, text=True, timeout=timeout
    )


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if text in cmdline and state != "Z":
                found.append(cmdline)
    return found


@pytest.fixture(scope="module")
def torchserve(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Iterator[TorchServe]:
    if java_available() is None:
        print("SKIP reason: Java is not installed; TorchServe's front end is a Java program.")
        pytest.skip("Java is not installed (TorchServe needs Java 17)")
    root = tmp_path_factory.mktemp("torchserve")
    store = digits_store(root, quick_mlp, digits_data)
    model_store = root / "model_store"
    handler = root / "json_digits.py"
    handler.write_text(BASE_HANDLER_SOURCE)
    model_archiver(store, model_store, "images", "1.0", HANDLERS / "digits_image.py")
    model_archiver(store, model_store, "base", "1.0", handler)
    build_archive(store, "digits", handler="tensor", export_path=model_store, runtime="eager")
    home = root / "home"
    started = torchship(
        "torchserve",
        "start",
        "--home",
        str(home),
        "--model-store",
        str(model_store),
        "--models",
        "images=images.mar",
        "base.mar",
        "--enable-model-api",
    )
    assert started.returncode == 0, started.stdout + started.stderr
    assert "TorchServe ready" in started.stdout
    ts = TorchServe.from_home(home)
    try:
        yield ts
    finally:
        stopped = torchship("torchserve", "stop", "--home", str(home), timeout=60)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "TorchServe stopped." in stopped.stdout
        assert not ts.running()
        assert processes_mentioning(str(home)) == []  # no JVM, no worker left behind


def test_config_binds_loopback_with_auth_and_model_api_stated(torchserve: TorchServe) -> None:
    text = torchserve.config.path.read_text()
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "true"
    assert props["load_models"] == "images=images.mar,base=base.mar"
    assert set(torchserve.keys()) >= {"management", "inference"}


def test_two_models_answer_correctly(
    torchserve: TorchServe, digits_data: digits.DigitsData
) -> None:
    r = torchserve.predict("images", DIGIT_PNG.read_bytes(), "image/png")
    assert r.status_code == 200, r.text
    answer = r.json()
    assert len(answer) == 5 and max(answer, key=answer.get) == "7"
    correct = 0
    for x, y in zip(digits_data.x_test[:20], digits_data.y_test[:20], strict=True):
        r = torchserve.predict(
            "base", json.dumps({"inputs": x.tolist()}).encode(), "application/json"
        )
        assert r.status_code == 200, r.text
        correct += next(iter(r.json())) == str(int(y))
    assert correct >= 14  # a two-epoch MLP: well above chance (10%)
    bad = torchserve.predict("images", b"not an image", "image/png")
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_image"
    assert torchserve.predict("images", DIGIT_PNG.read_bytes(), "image/png").status_code == 200


def test_management_api_lists_describes_registers(torchserve: TorchServe) -> None:
    listed = torchserve.management("GET", "/models").json()
    assert listed == {
        "models": [
            {"modelName": "base", "modelUrl": "base.mar"},
            {"modelName": "images", "modelUrl": "images.mar"},
        ]
    }
    [described] = torchserve.management("GET", "/models/images").json()
    assert described["workers"][0]["status"] == "READY"
    r = torchserve.management(
        "POST", "/models", params={"url": "digits.mar", "initial_workers": 1, "synchronous": "true"}
    )
    assert r.status_code == 200, r.text  # torchship's eager archive: model.py + state_dict
    r = torchserve.predict(
        "digits", b'{"inputs": ' + json.dumps([[[0.0] * 8] * 8]).encode() + b"}", "application/json"
    )
    assert r.status_code == 200 and len(r.json()) == 5
    assert torchserve.management("DELETE", "/models/digits").status_code == 200
    status = torchship("torchserve", "status", "--home", str(torchserve.config.home), "--json")
    info = json.loads(status.stdout)
    assert info["running"] and info["ping"] == "Healthy"
    assert sorted(m["modelName"] for m in info["models"]) == ["base", "images"]


def test_unauthenticated_calls_are_refused(torchserve: TorchServe) -> None:
    import requests

    r = requests.get(torchserve.config.management_url + "/models", timeout=10)
    assert r.status_code in (400, 401)  # TorchServe 0.12 answers 400 InvalidKeyException
    assert "Token" in r.text
