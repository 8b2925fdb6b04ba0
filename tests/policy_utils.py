"""Helpers for the production-protection tests: a two-version store, services, clients."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from torchship.serving import InferenceService, ServeSettings, fastapi_app, flask_app
from torchship.store import ModelStore
from torchship.zoo import digits

FRAMEWORKS = ["fastapi", "flask"]
ONE = {"inputs": [[[0.0] * 8] * 8]}
INFER_KEY = "tsk_inference_only_0123456789abcdef"
ADMIN_KEY = "tsk_admin_only_0123456789abcdefghij"
BOTH_KEY = "tsk_operator_0123456789abcdefghijkl"
KEYS = [f"ci:inference:{INFER_KEY}", f"ops:admin:{ADMIN_KEY}", f"lead:inference+admin:{BOTH_KEY}"]


def two_version_store(root: Path, model: torch.nn.Module, data: digits.DigitsData) -> Path:
    """digits:1 (the quick MLP) and digits:2 (its weights halved: other probabilities)."""
    store = ModelStore(root)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    for m in (model, other):
        store.save(
            m,
            "digits",
            input_spec=digits.input_spec(),
            labels=digits.LABELS,
            examples=data.x_test[:8],
        )
    return store.root


def settings(root: Path, **kw: Any) -> ServeSettings:
    base: dict[str, Any] = {
        "store": root,
        "models": ["digits:1"],
        "runtime": "eager",
        "max_batch_size": 4,
        "max_delay_ms": 0,
        "warmup": False,
        "tuning_cache": False,
    }
    return ServeSettings(**(base | kw))


class Response:
    def __init__(self, status: int, headers: Any, body: Any) -> None:
        self.status = status
        self.headers = headers  # case-insensitive in both clients
        self.json = body


class Client:
    """The same calls against either front end's in-process test client."""

    def __init__(self, framework: str, service: InferenceService, peer: str = "10.1.2.3") -> None:
        self.framework = framework
        if framework == "fastapi":
            app = fastapi_app.create_app(service=service)
            self._c: Any = TestClient(app, client=(peer, 50000))
        else:
            app = flask_app.create_app(service=service, load_in_background=False)
            self._c = app.test_client()
            self._c.environ_base["REMOTE_ADDR"] = peer

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
    ) -> Response:
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if json is not None:
            kwargs["json"] = json
        if content is not None:
            kwargs["content" if self.framework == "fastapi" else "data"] = content
        if self.framework == "fastapi":
            r = self._c.request(method.upper(), path, **kwargs)
            try:
                body = r.json()
            except ValueError:
                body = r.text
        else:
            r = self._c.open(path, method=method.upper(), **kwargs)
            body = r.get_json(silent=True)
            if body is None:
                body = r.get_data(as_text=True)
        return Response(r.status_code, r.headers, body)

    def predict(self, headers: dict[str, str] | None = None, body: Any = ONE) -> Response:
        return self.call("post", "/predict", json=body, headers=headers)
