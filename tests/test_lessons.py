"""Every lesson runs as the module shows: 01-03 to completion, 04/05 serve until Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from serving_utils import ROOT, free_port, run_lesson, wait_ready

from torchship.demo import train_demo
from torchship.store import ModelStore

EXPECT = {
    "01_basic_model_saving.py": [
        "refused",
        "tampering detected",
        "bit for bit: True",
        "eval mode: True",
    ],
    "02_torchscript_basics.py": [
        "verify_outputs(trace): passed=False",
        "verify_outputs(script): passed=True",
        "torchship imported: False",
    ],
    "03_onnx_export.py": ["max |onnxruntime - eager|", "nothing is stored", "runtime auto picked"],
    "07_model_versioning.py": [
        "A/B results",
        "complete: scheduled",  # the healthy canary walks to 100%
        "promote: canary completed: scheduled",  # ... and is production in the store
        "rollback: SLO breach",
        "production is now v1",
        "promote v2 -> serving 2",
        "server stopped (exit 0)",
    ],
}


@pytest.mark.parametrize("lesson", sorted(EXPECT))
def test_lesson_runs_to_completion(lesson: str) -> None:
    out, _ = run_lesson(lesson)
    for expected in EXPECT[lesson]:
        assert expected in out, f"{lesson} did not print {expected!r}"


@pytest.fixture(scope="module")
def lesson_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lessons") / "models"
    train_demo(ModelStore(root), "digits", export=True)
    return root


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize(
    ("lesson", "field"),
    [("04_flask_api_deployment.py", "image"), ("05_fastapi_deployment.py", "file")],
)
def test_serving_lessons_answer_the_modules_curl_command(
    lesson: str, field: str, lesson_store: Path
) -> None:
    port = free_port()
    env = {**os.environ, "TORCHSHIP_PORT": str(port), "TORCHSHIP_STORE": str(lesson_store)}
    proc = subprocess.Popen(
        [sys.executable, lesson],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Ctrl-C must reach it even when this suite runs as a background job, whose
        # children inherit an ignored SIGINT (Python then installs no handler of its own).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=90)
        # exactly the module's command, on the test's port
        curl = subprocess.run(
            [
                "curl",
                "-s",
                "-X",
                "POST",
                f"http://localhost:{port}/predict",
                "-F",
                f"{field}=@sample.jpg",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert '"label":"2"' in curl.stdout, curl.stdout
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()
    assert b"stopped." in out
    if lesson.startswith("05"):
        assert b"batches on the event loop" in out and b"items in" in out
