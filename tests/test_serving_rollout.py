"""Versions in a running server: policies, canary rollback, shadow, management API."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from fastapi.testclient import TestClient
from serving_utils import SAMPLE, run_server

from torchship.serving import InferenceService, ServeSettings, fastapi_app, flask_app
from torchship.store import ModelStore, stages
from torchship.zoo import digits
from torchship.zoo.faulty import FaultyDigits

ONE = {"inputs": [[[0.0] * 8] * 8]}


def _save(store: ModelStore, model: torch.nn.Module, data: digits.DigitsData) -> str:
    return store.save(
        model,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=data.x_test[:8],
    ).version


@pytest.fixture
def rollout_store(
    tmp_path: Path, quick_mlp: torch.nn.Module, digits_data: digits.DigitsData
) -> Path:
    store = ModelStore(tmp_path / "models")
    _save(store, quick_mlp, digits_data)  # 1
    _save(store, digits.train("mlp", epochs=1, data=digits_data, seed=3).model, digits_data)  # 2
    broken = FaultyDigits(fail_rate=1.0)
    broken.load_state_dict(quick_mlp.state_dict())
    _save(store, broken, digits_data)  # 3: fails every batch
    return store.root


def _settings(root: Path, **kw: Any) -> ServeSettings:
    base: dict[str, Any] = {
        "store": root,
        "models": ["digits:1"],
        "runtime": "eager",
        "max_batch_size": 4,
        "max_delay_ms": 0,
        "warmup": False,
    }
    return ServeSettings(**(base | kw))


class Client:
    """The same calls against either front end's test client."""

    def __init__(self, framework: str, service: InferenceService) -> None:
        if framework == "fastapi":
            self._c: Any = TestClient(fastapi_app.create_app(service=service))
        else:
            self._c = flask_app.create_app(service=service, load_in_background=False).test_client()
        self.framework = framework

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], Any]:
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if isinstance(body, bytes):  # a raw body, sent as JSON whatever it holds
            kwargs["headers"] = {"Content-Type": "application/json", **kwargs["headers"]}
            kwargs["content" if self.framework == "fastapi" else "data"] = body
        elif body is not None:
            kwargs["json"] = body
        r = getattr(self._c, method)(path, **kwargs)
        data = r.json() if self.framework == "fastapi" else r.get_json()
        return r.status_code, data, r.headers  # case-insensitive in both clients


@pytest.fixture(params=["fastapi", "flask"])
def served(
    request: pytest.FixtureRequest, rollout_store: Path
) -> Iterator[tuple[InferenceService, Client]]:
    service = InferenceService(_settings(rollout_store)).start()
    yield service, Client(request.param, service)
    service.stop()


def test_every_answer_names_its_version(served: tuple[InferenceService, Client]) -> None:
    _, client = served
    status, body, headers = client.call("post", "/predict", ONE)
    assert status == 200 and body["version"] == "1"
    assert headers["X-Model-Version"] == "1" and headers["X-Model-Name"] == "digits"


def test_sticky_split(served: tuple[InferenceService, Client]) -> None:
    _, client = served
    assert client.call("post", "/manage/models/digits/versions/2/load")[0] == 200
    status, body, _ = client.call(
        "put",
        "/manage/models/digits/policy",
        {"kind": "split", "weights": {"1": 0.5, "2": 0.5}, "reason": "A/B"},
    )
    assert status == 200, body
    first = {}
    for i in range(200):
        first[i] = client.call("post", "/predict", ONE, {"X-User-ID": f"user-{i}"})[1]["version"]
    assert 60 < Counter(first.values())["2"] < 140
    for i in range(0, 200, 7):  # the same user always gets the same version
        assert (
            client.call("post", "/predict", ONE, {"X-User-ID": f"user-{i}"})[1]["version"]
            == first[i]
        )
    state = client.call("get", "/manage/models/digits/policy")[1]
    assert state["policy"]["kind"] == "split"
    assert state["versions"]["1"]["requests"] + state["versions"]["2"]["requests"] >= 200


def test_canary_of_a_broken_version_rolls_back_by_itself(
    served: tuple[InferenceService, Client], rollout_store: Path
) -> None:
    service, client = served
    status, body, _ = client.call(
        "put",
        "/manage/models/digits/policy",
        {
            "kind": "canary",
            "baseline": "1",
            "candidate": "3",
            "steps": [50, 100],
            "slo": {"min_samples": 5, "window_s": 600},
            "reason": "try v3",
        },
    )
    assert status == 409 and "not loaded" in body["error"]  # a version must load before traffic
    assert client.call("post", "/manage/models/digits/versions/3/load")[0] == 200
    status, body, _ = client.call(
        "put",
        "/manage/models/digits/policy",
        {
            "kind": "canary",
            "baseline": "1",
            "candidate": "3",
            "steps": [50, 100],
            "slo": {"min_samples": 5, "window_s": 600},
            "reason": "try v3",
        },
    )
    assert status == 200, body
    codes = Counter(
        client.call("post", "/predict", ONE, {"X-User-ID": f"u{i}"})[0] for i in range(60)
    )
    assert codes[500] > 0 and codes[200] > 0  # the candidate's failures reached some users
    service.traffic.tick()  # the background ticker may already have done it
    state = client.call("get", "/manage/models/digits/policy")[1]
    assert state["policy"] == {"kind": "fixed", "version": "1"}
    assert all(
        client.call("post", "/predict", ONE, {"X-User-ID": f"u{i}"})[0] == 200 for i in range(30)
    )
    history = client.call("get", "/manage/models/digits/history")[1]["history"]
    assert history[-1]["kind"] == "rollback" and "error rate" in history[-1]["reason"]
    # the rolled-back policy survives a restart
    service.stop()
    again = InferenceService(_settings(rollout_store)).start()
    try:
        assert again.traffic.router("digits").policy.kind == "fixed"  # type: ignore[union-attr]
        assert again.traffic.router("digits").policy.versions() == ("1",)  # type: ignore[union-attr]
    finally:
        again.stop()


def test_a_completed_canary_is_production_in_the_store(
    served: tuple[InferenceService, Client],
) -> None:
    """Reaching 100 % promotes the candidate, once, with the canary's reason: the store's
    production pointer (what predict, batch jobs and a fresh server read) follows."""
    service, client = served
    assert client.call("post", "/manage/models/digits/promote", {"version": "1"})[0] == 200
    assert client.call("post", "/manage/models/digits/versions/2/load")[0] == 200
    policy = {"kind": "canary", "baseline": "1", "candidate": "2", "steps": [50, 100]}
    began = datetime.now(timezone.utc)
    assert client.call("put", "/manage/models/digits/policy", policy)[0] == 200
    assert service.store.resolve("digits") == "1"  # a canary in progress changes no stage
    status, body, _ = client.call("post", "/manage/models/digits/advance", {"reason": "healthy"})
    assert status == 200, body
    assert body["traffic"]["policy"] == {"kind": "fixed", "version": "2"}
    assert service.store.resolve("digits") == "2"
    versions = client.call("get", "/manage/models/digits/versions")[1]["versions"]
    assert {v["version"]: v["stage"] for v in versions}["1"] == "archived"
    history = client.call("get", "/manage/models/digits/history")[1]["history"]
    promotions = [h for h in history if h.get("action") == "promote"]
    assert [p["version"] for p in promotions] == ["1", "2"]
    assert promotions[-1]["reason"] == "canary completed: healthy"
    # another worker deciding the same completion writes nothing more
    assert stages.promote_unless_production(service.store, "digits", "2") is None
    history = client.call("get", "/manage/models/digits/history")[1]["history"]
    assert len([h for h in history if h.get("action") == "promote"]) == 2
    # and a plain rollback undoes it, which a late completion by a worker that has not
    # synced yet does not overturn
    assert client.call("post", "/manage/models/digits/rollback", {"to": "1"})[0] == 200
    assert service.store.resolve("digits") == "1"
    late = stages.promote_unless_production(
        service.store, "digits", "2", unless_changed_since=began
    )
    assert late is None and service.store.resolve("digits") == "1"


def test_policies_persist_and_reload_their_versions(rollout_store: Path) -> None:
    service = InferenceService(_settings(rollout_store)).start()
    try:
        service.load("digits:2")
        service.traffic.router("digits").set_policy({"kind": "split", "weights": {"1": 1, "2": 3}})  # type: ignore[union-attr]
    finally:
        service.stop()
    again = InferenceService(_settings(rollout_store)).start()  # configured with digits:1 only
    try:
        assert set(again.versions("digits")) == {"1", "2"}
        assert again.traffic.router("digits").policy.kind == "split"  # type: ignore[union-attr]
    finally:
        again.stop()


def test_shadow_never_answers_but_is_compared(served: tuple[InferenceService, Client]) -> None:
    service, client = served
    client.call("post", "/manage/models/digits/versions/2/load")
    status, _, _ = client.call(
        "put",
        "/manage/models/digits/policy",
        {"kind": "shadow", "primary": "1", "candidate": "2", "fraction": 1.0},
    )
    assert status == 200
    x = digits.load_digits_split().x_test[:20]
    for i in range(20):
        status, body, _ = client.call("post", "/predict", {"inputs": x[i].tolist()})
        assert status == 200 and body["version"] == "1"
    router = service.traffic.router("digits")
    assert router is not None
    for _ in range(2000):  # shadow results arrive on the batcher thread
        if router.state()["shadow"]["compared"] >= 20:
            break
        threading.Event().wait(0.005)
    shadow = router.state()["shadow"]
    assert shadow["compared"] == 20
    assert 0.0 <= shadow["disagreement_rate"] <= 1.0


def test_promote_rollback_unload_through_the_api(served: tuple[InferenceService, Client]) -> None:
    service, client = served
    status, body, _ = client.call(
        "post", "/manage/models/digits/promote", {"version": "2", "reason": "better"}
    )
    assert status == 200, body
    assert client.call("post", "/predict", ONE)[1]["version"] == "2"
    assert service.store.resolve("digits") == "2"
    status, body, _ = client.call("post", "/manage/models/digits/versions/2/unload")
    assert status == 409 and body["code"] == "conflict"
    status, body, _ = client.call(
        "post", "/manage/models/digits/rollback", {"to": "1", "reason": "regression"}
    )
    assert status == 200, body
    assert client.call("post", "/predict", ONE)[1]["version"] == "1"
    assert client.call("post", "/manage/models/digits/versions/2/unload")[0] == 200
    versions = client.call("get", "/manage/models/digits/versions")[1]["versions"]
    assert {v["version"]: (v["stage"], v["loaded"]) for v in versions} == {
        "1": ("production", True),
        "2": ("archived", False),
        "3": ("staging", False),
    }
    status, body, _ = client.call(
        "put", "/manage/models/digits/policy", {"kind": "split", "weights": {"1": -1}}
    )
    assert status == 400 and body["code"] == "invalid_policy"
    status, body, _ = client.call("put", "/manage/models/digits/policy", b"{not json")
    assert status == 400 and "JSON" in body["error"] and "body.0" not in body["error"]
    assert client.call("get", "/manage/models/cats/policy")[0] == 404
    assert client.call("post", "/manage/models/digits/versions/9/load")[0] == 404


def test_a_version_that_fails_to_load_never_takes_traffic(
    served: tuple[InferenceService, Client], rollout_store: Path
) -> None:
    _, client = served
    weights = rollout_store / "digits" / "2" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    status, body, _ = client.call("post", "/manage/models/digits/versions/2/load")
    assert status == 409 and body["code"] == "integrity_error"
    assert "digits:2" in client.call("get", "/manage/models")[1]["load_errors"]
    status, _, _ = client.call(
        "put", "/manage/models/digits/policy", {"kind": "fixed", "version": "2"}
    )
    assert status == 409
    assert client.call("post", "/predict", ONE)[1]["version"] == "1"


def test_swaps_under_real_concurrent_load_drop_nothing(rollout_store: Path) -> None:
    with run_server(
        rollout_store, "--model", "digits:1", "--runtime", "eager", "--max-batch-size", "8"
    ) as (base, _):
        stop = threading.Event()
        results: list[tuple[int, str, str]] = []

        def hammer(worker: int) -> None:
            i = 0
            while not stop.is_set():
                with SAMPLE.open("rb") as fh:
                    r = requests.post(
                        f"{base}/predict",
                        files={"file": fh},
                        headers={"X-User-ID": f"{worker}-{i}"},
                        timeout=30,
                    )
                body = r.json()
                results.append(
                    (r.status_code, r.headers.get("X-Model-Version", ""), body.get("version", ""))
                )
                i += 1

        def traffic_flows(n: int = 15) -> None:
            """Let at least ``n`` more requests complete under the current state."""
            target = len(results) + n
            for _ in range(4000):
                if len(results) >= target:
                    return
                threading.Event().wait(0.005)
            raise AssertionError("traffic stalled")

        def manage(method: str, path: str, body: Any = None) -> dict[str, Any]:
            traffic_flows()
            r = requests.request(
                method, f"{base}/manage/models/digits{path}", json=body, timeout=60
            )
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(6) as pool:
            for w in range(6):
                pool.submit(hammer, w)
            manage("post", "/versions/2/load")
            manage("put", "/policy", {"kind": "split", "weights": {"1": 1, "2": 1}})
            manage("post", "/versions/1/load")  # reload in place, under traffic
            manage(
                "put",
                "/policy",
                {"kind": "canary", "baseline": "1", "candidate": "2", "steps": [25, 100]},
            )
            manage("post", "/advance", {"reason": "looks good"})
            manage("post", "/versions/1/unload")
            traffic_flows()
            stop.set()
        assert len(results) > 90
        assert {code for code, _, _ in results} == {200}, Counter(code for code, _, _ in results)
        assert all(header == body for _, header, body in results), "a response mixed two versions"
        assert {v for _, v, _ in results} == {"1", "2"}


def test_a_version_that_fails_warm_up_is_refused(rollout_store: Path) -> None:
    from torchship.errors import ModelLoadError

    service = InferenceService(_settings(rollout_store, warmup=True)).start()
    try:
        with pytest.raises(ModelLoadError, match="failed to load or warm up"):
            service.load("digits:3")  # FaultyDigits(fail_rate=1.0) fails its first batch
        assert service.versions("digits") == ["1"]
        assert service.readiness()[0]
    finally:
        service.stop()


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_management_api_on_its_own_port(rollout_store: Path, framework: str) -> None:
    from serving_utils import free_port

    mport = free_port()
    with run_server(
        rollout_store,
        "--model",
        "digits:1",
        "--runtime",
        "eager",
        "--management-port",
        str(mport),
        framework=framework,
    ) as (base, _):
        manage = f"http://127.0.0.1:{mport}"
        assert requests.get(f"{manage}/manage/models", timeout=10).status_code == 200
        assert requests.get(f"{base}/manage/models", timeout=10).status_code == 404
        assert requests.post(f"{manage}/predict", json=ONE, timeout=10).status_code == 404
        assert requests.post(f"{base}/predict", json=ONE, timeout=10).status_code == 200
        assert requests.get(f"{manage}/health/ready", timeout=10).status_code == 200


def test_worker_processes_adopt_each_others_policies(rollout_store: Path) -> None:
    """Two services on one store stand for two worker processes of one server."""
    a = InferenceService(_settings(rollout_store)).start()
    b = InferenceService(_settings(rollout_store)).start()
    try:
        a.load("digits:2")
        a.traffic.router("digits").set_policy({"kind": "split", "weights": {"1": 1, "2": 1}})  # type: ignore[union-attr]
        b.traffic.sync()  # the ticker does this every tick_interval_s
        router = b.traffic.router("digits")
        assert router is not None and router.policy.kind == "split"
        assert set(b.versions("digits")) == {"1", "2"}  # b loaded what the policy needs
    finally:
        a.stop()
        b.stop()


def test_a_rollback_to_a_broken_version_changes_nothing(
    served: tuple[InferenceService, Client], rollout_store: Path
) -> None:
    service, client = served
    assert client.call("post", "/manage/models/digits/promote", {"version": "2"})[0] == 200
    weights = rollout_store / "digits" / "1" / "weights.safetensors"
    service.unload("digits", "1")
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    before = (
        service.store.aliases("digits"),
        len(service.store.root.joinpath("digits", "history.jsonl").read_text().splitlines()),
    )
    status, body, _ = client.call(
        "post", "/manage/models/digits/rollback", {"to": "1", "reason": "try"}
    )
    assert status == 409 and body["code"] == "integrity_error"
    after = (
        service.store.aliases("digits"),
        len(service.store.root.joinpath("digits", "history.jsonl").read_text().splitlines()),
    )
    assert after == before
    assert client.call("post", "/predict", ONE)[1]["version"] == "2"
    status, body, _ = client.call("put", "/manage/models/digits/policy", {"policy": "fixed"})
    assert status == 400
