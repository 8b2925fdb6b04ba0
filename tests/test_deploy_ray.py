"""Scale-out on Ray Serve: ``torchship serve --engine ray`` with two replicas on 2 CPUs."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests
import torch
from deploy_utils import held_out_inputs, local_labels, quick_digits_store
from serving_utils import run_server

from torchship.errors import MissingDependencyError
from torchship.store import ModelStore

X = held_out_inputs(16)
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed (pip install 'torchship[ray]')",
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return quick_digits_store(tmp_path_factory.mktemp("ray") / "models")


@pytest.fixture(scope="module")
def ray_server(
    store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    log = tmp_path_factory.mktemp("ray-log") / "serve.log"
    args = ["--engine", "ray", "--replicas", "2", "--model", "digits"]
    # a replica takes one batch (4 requests) at a time and waits up to 300 ms to fill it
    args += ["--max-batch-size", "4", "--max-delay-ms", "300"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    with run_server(store.root, *args, log=log, ready_timeout=90, env=env) as (base, proc):
        # the proxy answers once one replica is up; serve.run returns (and the CLI says
        # so) once both are
        deadline = time.monotonic() + 60
        while "on Ray Serve at" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        yield base, proc


@needs_ray
@pytest.mark.slow
def test_concurrent_requests_are_batched_across_both_replicas(ray_server, store) -> None:
    base, _ = ray_server
    expected = local_labels(store, X)

    def one(i: int) -> tuple[str, str, int]:
        r = requests.post(f"{base}/predict", json={"inputs": X[i : i + 1].tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["X-Model-Version"] == "1"
        return (
            r.json()["predictions"][0]["label"],
            r.headers["X-Replica"],
            int(r.headers["X-Batch-Size"]),
        )

    with concurrent.futures.ThreadPoolExecutor(len(X)) as pool:
        rows = list(pool.map(one, range(len(X))))
    print("replica, batch size:", sorted((r, b) for _, r, b in rows))
    assert [label for label, _, _ in rows] == expected
    assert max(b for _, _, b in rows) > 1  # Ray's @serve.batch put requests together
    assert len({r for _, r, _ in rows}) == 2  # and both replicas took a share


@needs_ray
@pytest.mark.slow
def test_multi_item_requests_and_bad_input(ray_server, store) -> None:
    base, _ = ray_server
    r = requests.post(f"{base}/predict", json={"inputs": X[:5].tolist(), "top_k": 2}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["label"] for p in body["predictions"]] == local_labels(store, X[:5])
    assert all(len(p["top_k"]) == 2 for p in body["predictions"])
    r = requests.post(f"{base}/predict", json={"inputs": "seven"}, timeout=60)
    assert r.status_code == 400 and r.json()["code"] == "invalid_input"
    r = requests.post(f"{base}/predict", json={"inputs": [[[0.0] * 3] * 3]}, timeout=60)
    assert r.status_code == 400, r.text
    r = requests.post(f"{base}/predict?model=nope", json={"inputs": X[:1].tolist()}, timeout=60)
    assert r.status_code == 404 and r.json()["code"] == "model_not_found"
    assert requests.get(f"{base}/models", timeout=60).json()["models"][0]["version"] == "1"
    r = requests.post(f"{base}/predict", json={"inputs": X[:1].tolist()}, timeout=60)
    assert r.status_code == 200  # still serving


@needs_ray
@pytest.mark.slow
def test_sigterm_drains_the_replicas_and_exits_zero(ray_server) -> None:
    """Last in the module: it stops the shared server."""
    _, proc = ray_server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_a_batch_runs_per_model_and_shape_and_failures_stay_in_their_group() -> None:
    from torchship.serving.ray_serve import _Item, _run_batch, _Served

    class Doubler:
        def inference(self, batch: torch.Tensor) -> torch.Tensor:
            if batch.shape[-1] == 3:
                raise ValueError("bad shape")
            return batch * 2

    served = _Served(predictor=None, handler=Doubler())  # type: ignore[arg-type]
    items = [
        _Item("a", torch.ones(2)),
        _Item("a", torch.ones(3)),
        _Item("b", torch.ones(2)),
        _Item("a", torch.full((2,), 5.0)),
    ]
    out = _run_batch({"a": served, "b": served}, items)
    assert torch.equal(out[0][0], torch.full((2,), 2.0)) and out[0][1] == 2
    assert isinstance(out[1][0], ValueError) and out[1][1] == 1
    assert torch.equal(out[2][0], torch.full((2,), 2.0)) and out[2][1] == 1
    assert torch.equal(out[3][0], torch.full((2,), 10.0))


def test_without_ray_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchship.serving import ray_serve
    from torchship.serving.settings import ServeSettings

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MissingDependencyError) as info:
        ray_serve.build_app(ServeSettings())
    assert "torchship[ray]" in str(info.value)
