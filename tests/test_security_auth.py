"""API keys: hashing, where keys come from, 401/403 on both front ends, open paths."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from policy_utils import (
    ADMIN_KEY,
    BOTH_KEY,
    FRAMEWORKS,
    INFER_KEY,
    KEYS,
    ONE,
    Client,
    settings,
)
from policy_utils import two_version_store as make_store
from serving_utils import free_port, run_server

from torchship.errors import ConfigError, ForbiddenError, UnauthorizedError
from torchship.serving import InferenceService, ServeSettings
from torchship.serving.policies import KeyStore, new_key
from torchship.serving.policies.auth import digest, load_file, parse_spec, presented_key
from torchship.serving.runner import settings_to_env
from torchship.settings import load_settings
from torchship.zoo import digits


@pytest.fixture(scope="module")
def store_root(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> Path:
    return make_store(tmp_path_factory.mktemp("auth") / "models", quick_mlp, digits_data)


@pytest.fixture(scope="module")
def service(store_root: Path) -> Iterator[InferenceService]:
    s = InferenceService(settings(store_root, api_keys=KEYS)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module", params=FRAMEWORKS)
def client(request: pytest.FixtureRequest, service: InferenceService) -> Client:
    return Client(request.param, service)


# --- keys ------------------------------------------------------------------------------


def test_keys_are_hashed_when_read_and_never_kept_in_plain() -> None:
    s = ServeSettings(api_keys=[f"ci:inference:{INFER_KEY}"])
    assert s.api_keys == [f"ci:inference:sha256:{digest(INFER_KEY).hex()}"]
    env = settings_to_env(s)  # what worker processes inherit
    assert INFER_KEY not in json.dumps(env) and digest(INFER_KEY).hex() in env["TORCHSHIP_API_KEYS"]
    # a hashed spec stays as it is, and still authenticates the plain key
    again = ServeSettings(api_keys=s.api_keys)
    store = KeyStore.from_specs(again.api_keys)
    assert store is not None
    assert store.authenticate({"x-api-key": INFER_KEY}).name == "ci"


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHSHIP_API_KEYS", ",".join(KEYS))
    s = load_settings(cls=ServeSettings)
    store = KeyStore.from_specs(s.api_keys)
    assert store is not None
    assert [k["name"] for k in store.describe()] == ["ci", "ops", "lead"]
    assert store.authenticate({"authorization": f"Bearer {BOTH_KEY}"}).scopes == {
        "inference",
        "admin",
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ci:inference:short", "shorter than"),
        ("ci:reader:" + "x" * 30, "scopes"),
        ("ci::" + "x" * 30, "scopes"),
        ("no-secret", "look like"),
        ("bad name:inference:" + "x" * 30, "not valid"),
        ("ci:inference:sha256:abc", "64 hex"),
    ],
)
def test_bad_key_specs_are_config_errors_that_never_echo_the_secret(
    spec: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_spec(spec)
    assert "x" * 30 not in str(info.value)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        KeyStore.from_specs([f"ci:inference:{INFER_KEY}", f"ci:admin:{ADMIN_KEY}"])


def test_no_keys_means_auth_off() -> None:
    assert KeyStore.from_specs([]) is None
    assert len(new_key()) > 40 and new_key() != new_key()


def test_presented_key_headers() -> None:
    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "abc"}) == "abc"
    assert presented_key({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": "k"}) == "k"
    assert presented_key({"authorization": "Bearer "}) is None
    assert presented_key({}) is None


def test_authenticate_and_authorize() -> None:
    store = KeyStore.from_specs(KEYS)
    assert store is not None
    with pytest.raises(UnauthorizedError, match="needs an API key"):
        store.authenticate({})
    with pytest.raises(UnauthorizedError, match="not valid"):
        store.authenticate({"x-api-key": INFER_KEY + "x"})
    key = store.authenticate({"x-api-key": INFER_KEY})
    store.authorize(key, "inference")
    with pytest.raises(ForbiddenError, match="'admin' scope"):
        store.authorize(key, "admin")


def test_keys_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - name: ci\n    scopes: [inference]\n    sha256: {digest(INFER_KEY).hex()}\n"
    )
    store = KeyStore.from_specs([], path)
    assert store is not None
    assert store.authenticate({"x-api-key": INFER_KEY}).name == "ci"
    # rotate: the old key goes, a new one comes (JSON works too)
    rotated = new_key()
    path.write_text(
        json.dumps(
            {"keys": [{"name": "ci2", "scopes": "inference", "sha256": digest(rotated).hex()}]}
        )
    )
    os.utime(path, (1, 1))  # a different mtime, whatever the clock's resolution
    store._checked = 0.0  # skip the once-a-second throttle
    assert store.authenticate({"x-api-key": rotated}).name == "ci2"
    with pytest.raises(UnauthorizedError):
        store.authenticate({"x-api-key": INFER_KEY})
    # a broken edit keeps the last good keys
    path.write_text("keys: [{name: 1}]")
    os.utime(path, (2, 2))
    store._checked = 0.0
    assert store.authenticate({"x-api-key": rotated}).name == "ci2"
    with pytest.raises(ConfigError):
        load_file(path)


# --- over HTTP, both front ends ----------------------------------------------------------


def test_missing_and_wrong_keys_get_401_with_clear_json(client: Client) -> None:
    r = client.predict()
    assert r.status == 401 and r.json["code"] == "unauthorized"
    assert "Bearer" in r.json["hint"] and r.headers["WWW-Authenticate"].startswith("Bearer")
    r = client.predict({"Authorization": "Bearer not-a-key"})
    assert r.status == 401 and "not valid" in r.json["error"]
    assert client.predict({"X-API-Key": INFER_KEY}).status == 200
    assert client.predict({"Authorization": f"Bearer {INFER_KEY}"}).status == 200


def test_scopes(client: Client) -> None:
    r = client.call("get", "/manage/models", headers={"X-API-Key": INFER_KEY})
    assert r.status == 403 and r.json["code"] == "forbidden" and "'admin'" in r.json["error"]
    assert client.call("get", "/manage/models", headers={"X-API-Key": ADMIN_KEY}).status == 200
    # scopes are independent: an admin-only key cannot predict
    assert client.predict({"X-API-Key": ADMIN_KEY}).status == 403
    assert client.predict({"X-API-Key": BOTH_KEY}).status == 200
    assert client.call("get", "/manage/models", headers={"X-API-Key": BOTH_KEY}).status == 200
    # TorchServe's management API is management too
    r = client.call("get", "/manage/torchserve/models", headers={"X-API-Key": INFER_KEY})
    assert r.status == 403
    r = client.call("get", "/manage/torchserve/models", headers={"X-API-Key": ADMIN_KEY})
    assert r.status == 200


def test_health_and_metrics_are_open_and_everything_else_is_not(client: Client) -> None:
    for path in ("/health/live", "/health/ready", "/health/startup", "/metrics", "/ping"):
        assert client.call("get", path).status == 200, path
    for path in ("/models", "/v2/models/digits", "/manage/models"):
        assert client.call("get", path).status == 401, path


def test_bad_requests_with_a_good_key_are_4xx_and_the_server_keeps_serving(
    client: Client,
) -> None:
    key = {"X-API-Key": INFER_KEY}
    r = client.call("post", "/predict", content=b"not an image", headers=key)
    assert r.status == 400 and r.json["code"] == "invalid_image"
    r = client.call(
        "post", "/predict", content=b"{", headers={**key, "Content-Type": "application/json"}
    )
    assert r.status == 400 and r.json["code"] == "invalid_input"
    assert client.predict(key).status == 200


def test_open_paths_are_configurable_but_never_the_management_api(store_root: Path) -> None:
    s = settings(store_root, api_keys=KEYS, open_paths=["/health/", "/manage/"])
    service = InferenceService(s).start()
    try:
        for framework in FRAMEWORKS:
            c = Client(framework, service)
            assert c.call("get", "/metrics").status == 401  # no longer open
            assert c.call("get", "/health/ready").status == 200
            assert c.call("get", "/manage/models").status == 401  # listing it changes nothing
    finally:
        service.stop()


def test_pages_open_without_a_key_but_their_data_needs_one(client: Client) -> None:
    """The status page and API docs load for a browser with no key (shells and assets
    hold no data); what they then fetch is behind the key like any other call."""
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    for path in ("/", "/docs", "/redoc"):
        r = client.call("get", path, headers=html)
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html"), path
    for asset in (
        "status.js",
        "apikey.js",
        "docs.js",
        "swagger-ui-bundle.js",
        "redoc.standalone.js",
    ):
        assert client.call("get", f"/static/{asset}").status == 200, asset
    assert client.call("get", "/static/nope.js").status == 404
    for path in ("/", "/status", "/openapi.json"):  # data: JSON index, live status, API
        r = client.call("get", path, headers={"Accept": "application/json"})
        assert r.status == 401 and r.json["code"] == "unauthorized", path
        assert client.call("get", path, headers={"X-API-Key": INFER_KEY}).status == 200, path
    assert client.call("get", "/", headers={"Accept": "*/*"}).status == 401  # curl's index
    assert client.call("get", "/manage/models", headers=html).status == 401
    # two Accept headers: the gate and the route read them alike (the page, no data)
    r = client.call("get", "/", headers=[("Accept", "*/*"), ("Accept", "text/html")])
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    r = client.call("get", "/", headers={"Accept": "text/html;q=0, application/json"})
    assert r.status == 401


def test_auth_off_without_keys(store_root: Path) -> None:
    service = InferenceService(settings(store_root)).start()
    try:
        for framework in FRAMEWORKS:
            c = Client(framework, service)
            assert c.predict().status == 200
            assert c.call("get", "/manage/models").status == 200
    finally:
        service.stop()


@pytest.mark.slow
def test_management_port_needs_the_admin_scope_too(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over real sockets: /manage and TorchServe's /models on the management port."""
    management_port = free_port()
    monkeypatch.setenv("TORCHSHIP_API_KEYS", ",".join(KEYS))
    with run_server(
        store_root,
        "--model",
        "digits:1",
        "--runtime",
        "eager",
        "--management-port",
        str(management_port),
    ) as (base, _):
        manage = f"http://127.0.0.1:{management_port}"
        infer, admin = {"X-API-Key": INFER_KEY}, {"X-API-Key": ADMIN_KEY}
        for path in ("/manage/models", "/models"):  # ours, and TorchServe's
            assert requests.get(f"{manage}{path}", timeout=10).status_code == 401
            assert requests.get(f"{manage}{path}", headers=infer, timeout=10).status_code == 403
            assert requests.get(f"{manage}{path}", headers=admin, timeout=10).status_code == 200
        assert requests.get(f"{manage}/health/ready", timeout=10).status_code == 200
        assert requests.post(f"{base}/predict", json=ONE, headers=infer, timeout=10).ok
        assert requests.post(f"{base}/predict", json=ONE, timeout=10).status_code == 401


def test_keys_new_prints_the_secret_once_and_files_only_its_digest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchship.cli import main

    path = tmp_path / "keys.yaml"
    assert main(["keys", "new", "--name", "web", "--file", str(path)]) == 0
    web = capsys.readouterr().out.strip()
    assert (
        main(["keys", "new", "--name", "ops", "--scopes", "inference+admin", "--file", str(path)])
        == 0
    )
    ops = capsys.readouterr().out.strip()
    text = path.read_text()
    assert web not in text and ops not in text and digest(web).hex() in text
    store = KeyStore.from_specs([], path)
    assert store is not None
    assert store.authenticate({"x-api-key": web}).scopes == {"inference"}
    assert store.authenticate({"authorization": f"Bearer {ops}"}).scopes == {"inference", "admin"}
    assert main(["keys", "new", "--name", "web", "--file", str(path)]) == 2  # taken
    assert "already has a key named 'web'" in capsys.readouterr().err
