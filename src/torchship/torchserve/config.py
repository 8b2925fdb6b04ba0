"""``config.properties`` for a real TorchServe, every setting that matters explicit.

TorchServe reads its settings from this file (``--ts-config``). torchship writes one
per instance folder with:

* every listener on 127.0.0.1 (inference, management, metrics, both gRPC ports) on
  ports that were free when it was written;
* token authorization stated (TorchServe 0.12 turns it on by default and writes the
  keys to ``key_file.json`` in its working folder) and the model API (register and
  unregister through the management API, off by default in 0.12) stated;
* the model store, the models to load and their workers, queue and timeouts;
* ``allowed_urls`` limited to the model store unless URLs are allowed, no per-model
  ``pip install``, no system metrics process, a bounded JVM heap.

Logs, metrics and TorchServe's temp files go inside the instance folder (the
process control sets ``LOG_LOCATION``, ``METRICS_LOCATION`` and ``TEMP``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from torchship.store._atomic import write_bytes_atomic

CONFIG_FILE = "config.properties"
HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class TorchServeConfig:
    """One TorchServe instance: where it lives, what it serves, how it listens."""

    home: Path
    model_store: Path
    models: dict[str, str]  # name -> archive file in the model store
    inference_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    grpc_inference_port: int = field(default_factory=free_port)
    grpc_management_port: int = field(default_factory=free_port)
    initial_worker_port: int = field(default_factory=free_port)
    token_auth: bool = True
    token_expiration_min: int = 60
    model_api: bool = False
    allow_urls: bool = False
    workers_per_model: int = 1
    job_queue_size: int = 100
    response_timeout_s: int = 120
    java_heap: str = "1g"

    @property
    def inference_url(self) -> str:
        return f"http://{HOST}:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://{HOST}:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}"

    @property
    def path(self) -> Path:
        return self.home / CONFIG_FILE

    def properties(self) -> dict[str, str]:
        store = self.model_store.resolve()
        return {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "grpc_inference_address": HOST,
            "grpc_management_address": HOST,
            "grpc_inference_port": str(self.grpc_inference_port),
            "grpc_management_port": str(self.grpc_management_port),
            "initial_worker_port": str(self.initial_worker_port),
            "model_store": str(store),
            "load_models": ",".join(f"{n}={f}" for n, f in self.models.items()) or "standalone",
            "disable_token_authorization": str(not self.token_auth).lower(),
            "token_expiration_min": str(self.token_expiration_min),
            "enable_model_api": str(self.model_api).lower(),
            "allowed_urls": "file://.*|http(s)?://.*" if self.allow_urls else f"file://{store}/.*",
            "install_py_dep_per_model": "false",
            "default_workers_per_model": str(self.workers_per_model),
            "job_queue_size": str(self.job_queue_size),
            "default_response_timeout": str(self.response_timeout_s),
            "disable_system_metrics": "true",
            "enable_envvars_config": "false",
            "vmargs": f"-Xmx{self.java_heap} -XX:+ExitOnOutOfMemoryError",
        }

    def render(self) -> str:
        lines = ["# Written by torchship torchserve; TorchServe reads it with --ts-config."]
        lines += [f"{k}={v}" for k, v in self.properties().items()]
        return "\n".join(lines) + "\n"

    def write(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.path, self.render().encode())
        return self.path
