"""The peer servers of benchmarks/serving.py answer what the benchmark sends, correctly.

A peer row is only worth printing if the peer computes the same thing: these start the
LitServe app on loopback with real (quickly trained) digits weights and compare its
answers with the model called in this process.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image
from serving_utils import ROOT, free_port

from torchship.zoo import digits

pytest.importorskip("litserve", reason="litserve is the bench extra (pip install '.[bench]')")
sys.path.insert(0, str(ROOT / "benchmarks"))
from naive_fastapi import digits_preprocess


@pytest.fixture(scope="module")
def cnn(digits_data: digits.DigitsData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = digits.train("cnn", epochs=1, data=digits_data).model.eval()
    path = tmp_path_factory.mktemp("peers") / "digits.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def litserve(cnn: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("litserve") / "server.log"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "litserve_app.py"), "--arch", "cnn"]
    cmd += ["--weights", str(cnn), "--port", str(port), "--workers", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            try:
                if requests.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # LitServe's inference workers too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_litserve_answers_json_and_forms_like_the_model(
    litserve: str, cnn: Path, digits_data: digits.DigitsData
) -> None:
    model = digits.DigitsCNN()
    model.load_state_dict(torch.load(cnn, weights_only=True))
    model.eval()
    x = digits_data.x_test[:6]
    with torch.inference_mode():
        expected = model(x).argmax(1).tolist()
    got = [
        requests.post(f"{litserve}/predict", json={"inputs": item.tolist()}, timeout=30).json()
        for item in x
    ]
    assert [int(g["predictions"][0]["label"]) for g in got] == expected
    # an image as a form upload, decoded as the naive server decodes it
    buf = io.BytesIO()
    Image.open(ROOT / "data" / "sample.jpg").save(buf, format="PNG")
    with torch.inference_mode():
        want = model(digits_preprocess(Image.open(io.BytesIO(buf.getvalue())))).argmax(1)
    r = requests.post(f"{litserve}/predict", files={"file": buf.getvalue()}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"] == str(int(want))
    # a raw image body: LitServe reads it as JSON and fails, hence no PNG row for it
    r = requests.post(
        f"{litserve}/predict",
        data=buf.getvalue(),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert r.status_code != 200
