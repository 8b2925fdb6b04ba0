"""The project's Dockerfile, built with buildah and run with podman, for real.

The base image (``FROM python:3.11-slim``) is made once from Debian packages and kept in
the local container storage; the pinned wheels are downloaded once into a cached
wheelhouse; buildah's layer cache keeps the ~1 GB dependency layer. A first run takes
about 3 minutes (debootstrap ~1 min, the dependency layer ~1 min), later ones 20-40 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from deploy_utils import held_out_inputs, local_labels, quick_digits_store
from serving_utils import ROOT, SAMPLE, free_port

from torchship.cli import main
from torchship.deploy import write_package
from torchship.deploy.base_image import ensure_base_image
from torchship.deploy.image import (
    build_image,
    container_logs,
    default_wheelhouse,
    healthcheck,
    inspect_image,
    make_wheelhouse,
    prune_images,
    remove_container,
    run_container,
    stop_container,
    wait_ready,
    why_no_image,
)
from torchship.preprocessing import preprocess_image
from torchship.store import ModelStore
from torchship.zoo import digits

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(why_no_image() is not None, reason=str(why_no_image())),
]

TAG = "localhost/torchship-test:latest"
X = held_out_inputs(8)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Path]:
    work = tmp_path_factory.mktemp("image")
    store = quick_digits_store(work / "models")
    context = write_package(store, "digits", work / "context").path
    assert (context / "Dockerfile").read_bytes() == (ROOT / "deploy/docker/Dockerfile").read_bytes()
    ensure_base_image()
    wheelhouse = make_wheelhouse(context / "requirements.txt", default_wheelhouse())
    result = build_image(context, TAG, wheelhouse=wheelhouse)
    prune_images()
    print(f"built {TAG}: {result.size_bytes / 1e6:.0f} MB in {result.seconds:.1f} s")
    return store, context


@pytest.fixture(scope="module")
def container(built: tuple[ModelStore, Path]) -> Iterator[tuple[str, str]]:
    name = f"torchship-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    try:
        run_container(TAG, name=name, port=port)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout=120, name=name)  # fails with the container's logs
        yield name, base
    finally:
        remove_container(name)


def test_container_answers_like_the_model_it_was_built_from(container, built) -> None:
    _, base = container
    store, _ = built
    r = requests.post(f"{base}/predict", json={"inputs": X.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == local_labels(store, X)
    assert r.json()["version"] == "1" and r.headers["X-Model-Version"] == "1"
    # an image upload, decoded inside the container as it is here
    x = preprocess_image(SAMPLE.read_bytes(), digits.input_spec())[None]
    r = requests.post(f"{base}/predict", files={"file": SAMPLE.read_bytes()}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"] == local_labels(store, x)[0]


def test_bad_input_gets_a_4xx_and_the_container_keeps_serving(container) -> None:
    _, base = container
    r = requests.post(f"{base}/predict", files={"file": b"not an image"}, timeout=30)
    assert r.status_code == 400 and r.json()["code"] == "invalid_image"
    r = requests.post(f"{base}/predict", json={"inputs": [[1.0, 2.0]]}, timeout=30)
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert requests.get(f"{base}/health/ready", timeout=30).status_code == 200


def test_runs_as_non_root_on_a_read_only_root(container) -> None:
    name, _ = container
    podman = shutil.which("podman") or "podman"
    uid = subprocess.run([podman, "exec", name, "id", "-u"], capture_output=True, text=True)
    assert uid.stdout.strip() == "10001"
    write = subprocess.run([podman, "exec", name, "touch", "/models/x"], capture_output=True)
    assert write.returncode != 0
    info = json.loads(
        subprocess.run([podman, "inspect", name], capture_output=True, text=True).stdout
    )[0]
    assert info["HostConfig"]["ReadonlyRootfs"] is True


# Imports what a server process imports and prints every module compiled from source.
_COMPILED_AT_START = """
import importlib.machinery as machinery
compiled = []
to_code = machinery.SourceFileLoader.source_to_code
def spy(self, data, path, *args, **kwargs):
    compiled.append(path)
    return to_code(self, data, path, *args, **kwargs)
machinery.SourceFileLoader.source_to_code = spy
import onnxruntime, uvicorn.main, gunicorn.app.base
import torchship.cli.serve_cmds, torchship.serving.fastapi_app, torchship.serving.flask_app
print("\\n".join(compiled))
"""


def test_a_start_loads_bytecode_instead_of_compiling_source(container) -> None:
    """The server's user cannot write site-packages, so bytecode missing from the image
    would be compiled again at every start (seconds, for torch)."""
    name, _ = container
    podman = shutil.which("podman") or "podman"
    out = subprocess.run(
        [podman, "exec", name, "python3", "-c", _COMPILED_AT_START],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []


def test_healthcheck_is_the_readiness_endpoint(container) -> None:
    name, _ = container
    check = inspect_image(TAG)["Healthcheck"]  # kept because the image is docker format
    assert isinstance(check, dict)
    assert "/health/ready" in " ".join(check["Test"])
    assert healthcheck(name)


def test_a_config_change_reuses_the_dependency_and_code_layers(built, tmp_path: Path) -> None:
    _, context = built
    changed = tmp_path / "context"
    shutil.copytree(context, changed)
    with (changed / "configs" / "serve.yaml").open("a") as fh:
        fh.write("max_queue_size: 128\n")
    tag = f"{TAG}-config-{uuid.uuid4().hex[:6]}"
    build_image(changed, tag, wheelhouse=default_wheelhouse())
    try:
        before = inspect_image(TAG)["RootFS"]["Layers"]
        after = inspect_image(tag)["RootFS"]["Layers"]
        # base, user + venv, requirements, dependencies (~1 GB), torchship: all reused;
        # only the config layer and the models layer above it are new
        assert len(before) == len(after)
        assert before[:-2] == after[:-2]
        assert before[-2] != after[-2]
    finally:
        subprocess.run(
            [shutil.which("podman") or "podman", "rmi", "--force", tag], capture_output=True
        )


def test_cli_image_commands(built, capsys: pytest.CaptureFixture[str]) -> None:
    _, context = built
    assert main(["image", "base"]) == 0
    assert "already present" in capsys.readouterr().out
    tag = f"{TAG}-cli-{uuid.uuid4().hex[:6]}"
    try:
        assert main(["image", "build", str(context), "--tag", tag, "--offline"]) == 0
        assert f"built {tag}" in capsys.readouterr().out
        assert inspect_image(tag)["Id"] == inspect_image(TAG)["Id"]  # all layers cached
    finally:
        subprocess.run([shutil.which("podman") or "podman", "rmi", tag], capture_output=True)
    assert main(["image", "build", str(context), "--tag", tag, "--variant", "rocm"]) == 2


def test_sigterm_while_starting_up_exits_at_once(built) -> None:
    """PID 1 drops signals it has no handler for; the entrypoint catches SIGTERM from its
    first line, so a container stopped while torch is still importing exits 0 rather
    than being killed (137) when the grace period runs out."""
    podman = shutil.which("podman") or "podman"
    name = f"torchship-test-early-{uuid.uuid4().hex[:8]}"
    port = free_port()
    try:
        run_container(TAG, name=name, port=port)
        deadline = time.monotonic() + 60
        while True:  # until PID 1 has a SIGTERM handler (bit 15 of SigCgt)
            assert time.monotonic() < deadline, "PID 1 never caught SIGTERM"
            status = subprocess.run(
                [podman, "exec", name, "cat", "/proc/1/status"], capture_output=True, text=True
            ).stdout
            caught = next((line for line in status.splitlines() if line.startswith("SigCgt:")), "")
            if caught and int(caught.split()[1], 16) & (1 << 14):
                break
        # the handler is the entrypoint's, not the server's: nothing listens yet
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health/live", timeout=5)
        assert stop_container(name, timeout=30) == 0
    finally:
        remove_container(name)


def test_sigterm_drains_and_exits_cleanly(container) -> None:
    """Last in the module: it stops the shared container."""
    name, base = container
    assert requests.get(f"{base}/health/ready", timeout=30).status_code == 200
    assert stop_container(name, timeout=30) == 0  # SIGTERM; SIGKILL (137) only after 30 s
    assert "Traceback" not in container_logs(name)
