"""Settings of a serving process (``torchship serve``, ``TORCHSHIP_*``, ``configs/*.yaml``)."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from torchship.errors import MissingDependencyError
from torchship.monitoring.logs import DEFAULT_REDACT_FIELDS
from torchship.settings import Runtime, Settings


class ModelOptions(BaseModel):
    """Per-model overrides of the serving defaults (keyed by model name)."""

    model_config = ConfigDict(extra="forbid")

    runtime: Runtime | None = None
    max_batch_size: int | Literal["auto"] | None = Field(None, description="int >= 1 or 'auto'")
    max_delay_ms: float | None = Field(None, ge=0)

    @field_validator("max_batch_size")
    @classmethod
    def _positive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("max_batch_size must be at least 1")
        return value


DEFAULT_OPEN_PATHS = ("/health/", "/v2/health/", "/ping", "/metrics")


class RateLimitSpec(BaseModel):
    """One scope's token bucket; ``"RATE[:BURST]"`` strings are accepted too."""

    model_config = ConfigDict(extra="forbid")

    rate: float = Field(gt=0, allow_inf_nan=False, description="Requests per second (refill).")
    burst: int = Field(ge=1, description="Requests at once (the bucket's size).")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str | int | float):
            rate_s, _, burst_s = str(value).partition(":")
            value = {"rate": rate_s, **({"burst": burst_s} if burst_s else {})}
        if isinstance(value, dict) and "burst" not in value and "rate" in value:
            with contextlib.suppress(TypeError, ValueError):  # the field check says why
                value = {**value, "burst": max(1, math.ceil(float(value["rate"])))}
        return value


class ServeSettings(Settings):
    """Everything ``torchship serve`` can be told; CLI flags map onto these fields."""

    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["digits"],
        description="Models to serve as NAME[:VERSION|ALIAS] from the store, or TorchServe "
        "archives as [NAME=]FILE.mar; the first is the default.",
    )
    model_store: Path | None = Field(
        None,
        description="Folder of TorchServe .mar archives: relative FILE.mar in models and "
        "TorchServe's POST /models?url=FILE.mar resolve here.",
    )
    allow_url_registration: bool = Field(
        False,
        description="Let TorchServe's POST /models?url=http(s)://... download an archive "
        "into the model store; off: only files already in the model store register.",
    )
    max_archive_bytes: int = Field(
        8 << 30, ge=1, description="Unpacked size limit of one .mar (bigger ones get 413)."
    )
    model_options: dict[str, ModelOptions] = Field(
        default_factory=dict,
        description="Per-model overrides: {name: {runtime, max_batch_size, max_delay_ms}}.",
    )
    handlers: dict[str, str] = Field(
        default_factory=dict,
        description="Custom handler per model name: 'package.module:Class' or 'file.py:Class'.",
    )
    framework: Literal["fastapi", "flask"] = Field("fastapi", description="HTTP front end.")
    host: str = Field("127.0.0.1", description="Bind address; loopback unless told otherwise.")
    port: int = Field(8000, ge=0, le=65535)
    management_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve /manage/* only on this port (and nothing else there but health "
        "and metrics); None: /manage/* on the main port.",
    )
    workers: int | Literal["auto"] = Field(
        1, description="Worker processes, each with its own model; 'auto' = one per core."
    )
    max_batch_size: int | Literal["auto"] = Field(
        "auto", description="Largest batch; 'auto' measures throughput at warm-up and caps it."
    )
    max_delay_ms: float = Field(
        0.0,
        ge=0,
        description="How long a batch waits to fill up. 0: take what queued while the "
        "previous batch ran (batches still form under load; a lone request never waits).",
    )
    max_batch_ms: float = Field(
        250.0,
        gt=0,
        description="With max_batch_size 'auto': the largest batch whose compute alone takes "
        "longer than this is neither chosen nor timed (it would add that much to the "
        "latency of every request queued behind it; for a big model on a small CPU, timing "
        "such batches was most of the start-up).",
    )
    inline_batch_ms: float = Field(
        1.0,
        ge=0,
        description="FastAPI: a CPU model whose largest batch was measured faster than this "
        "runs its batches on the event loop, skipping the hop to a worker thread and back "
        "(which costs more than such a model). 0: always a worker thread.",
    )
    gc_freeze: bool = Field(
        True,
        description="After the models load, move every object alive to the garbage "
        "collector's permanent generation (gc.freeze): a full collection of a serving "
        "process (~200k objects: torch, onnx, the web stack) stalls every request for "
        "~100 ms, and those objects live as long as the process anyway.",
    )
    max_queue_size: int = Field(256, ge=1, description="Queued requests before 503.")
    timeout_s: float = Field(30.0, gt=0, description="Per-request limit on queue + inference.")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Larger bodies get 413.")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Decoded size limit (decompression bombs get 413)."
    )
    top_k: int = Field(5, ge=1, description="Classes returned per prediction by default.")
    warmup: bool = Field(True, description="Warm up (and size batches) before ready.")
    tuning_cache: bool = Field(
        True,
        description="Remember the runtime race and batch sizing per model, machine and "
        "thread count in <store>/.tuning, and skip them at the next start.",
    )
    retune: bool = Field(
        False, description="Measure runtime and batch size again even when remembered."
    )
    graceful_timeout_s: float = Field(30.0, gt=0, description="SIGTERM drain limit.")
    # --- production protections (torchship.serving.policies) ---------------------------
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM, answer not-ready (and 'Connection: close') but keep "
        "serving this long, so load balancers stop sending first; then drain. Keep it "
        "plus graceful_timeout_s under the orchestrator's grace period.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API keys NAME:SCOPES:SECRET or NAME:SCOPES:sha256:HEX, SCOPES joined "
        "by '+' (inference, admin); comma-separated in TORCHSHIP_API_KEYS. Secrets are "
        "hashed as they are read. Any key (here or in api_keys_file) turns auth on.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="YAML/JSON file {keys: [{name, scopes, sha256}]}; re-read when it "
        "changes, so keys rotate without a restart. Turns auth on.",
    )
    open_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_OPEN_PATHS),
        description="Paths that need no key and are not rate limited ('/x/' is a prefix). "
        "The management API is never open while auth is on.",
    )
    rate_limits: dict[Literal["inference", "admin"], RateLimitSpec] = Field(
        default_factory=dict,
        description="Token bucket per scope: {scope: {rate, burst}} or {scope: 'RATE:BURST'}"
        ", per API key (per client IP when anonymous); 429 with Retry-After beyond it.",
    )
    rate_limit_backend: Literal["memory", "redis"] = Field(
        "memory",
        description="'memory': buckets per worker process; 'redis': shared by every "
        "worker and replica (redis_url; pip install 'torchship[redis]').",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Proxy IPs/CIDRs whose X-Forwarded-For names the client; otherwise "
        "the client is the socket peer.",
    )
    cache: bool = Field(False, description="Cache answers per model version and input.")
    cache_backend: Literal["memory", "redis"] = Field(
        "memory", description="'memory': per worker process; 'redis': shared (redis_url)."
    )
    cache_ttl_s: float = Field(300.0, gt=0, description="Seconds a cached answer is kept.")
    cache_max_entries: int = Field(10_000, ge=1, description="Memory cache: most entries.")
    cache_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Memory cache: most bytes of answers (LRU)."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis for the 'redis' backends."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins whose pages may call the API from a browser ('*': any); "
        "empty: no CORS headers.",
    )
    security_headers: bool = Field(
        True, description="nosniff, frame-deny, no-referrer, CSP on every response."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text or as one JSON object per line."
    )
    access_log: bool = Field(True, description="One log line per request (torchship.access).")
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry spans and metrics (needs a configured "
        "OpenTelemetry SDK). Off by default: /metrics covers serving, and checking the global "
        "providers costs ~5% of a small request.",
    )
    log_sample_rate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Fraction of successful requests that get an access line; error "
        "responses always do.",
    )
    log_bodies: bool = Field(
        False, description="Add request headers and request/response bodies to access lines."
    )
    log_max_body_chars: int = Field(
        1000, ge=0, description="Logged bodies are cut after this many characters."
    )
    log_redact_fields: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_REDACT_FIELDS),
        description="JSON keys (any depth), header and query names whose values are "
        "logged as [REDACTED]; comma-separated in TORCHSHIP_LOG_REDACT_FIELDS.",
    )

    @field_validator("api_keys", "open_paths", "trusted_proxies", "cors_origins", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        if isinstance(value, str):  # env var: a JSON list or "a,b"
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _hash_api_keys(cls, value: list[str]) -> list[str]:
        from torchship.serving.policies.auth import normalise_specs

        return normalise_specs(value)  # plain secrets never outlive this line

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for text in value:
            ipaddress.ip_network(text.strip(), strict=False)  # ValueError names it
        return value

    @model_validator(mode="after")
    def _redis_installed(self) -> ServeSettings:
        if "redis" in (self.rate_limit_backend, self.cache_backend) and (
            importlib.util.find_spec("redis") is None
        ):
            raise MissingDependencyError("redis", "redis", "The 'redis' backend")
        return self

    @field_validator("api_keys_file")
    @classmethod
    def _readable_keys_file(cls, value: Path | None) -> Path | None:
        if value is not None:  # fail at start-up, not in every worker's first request
            from torchship.serving.policies.auth import load_file

            load_file(value)
        return value

    @field_validator("max_batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("max_batch_size must be at least 1 (1 turns batching off)")
        return value

    @field_validator("models", "log_redact_fields", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):  # env var: a JSON list or "a,b:2"
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def worker_count(self) -> int:
        if self.workers == "auto":
            return max(1, os.cpu_count() or 1)
        return max(1, self.workers)

    def threads_per_worker(self) -> int:
        """Intra-op threads per worker: cores shared out so processes never oversubscribe."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.worker_count())

    def options_for(self, name: str) -> tuple[Runtime, int | Literal["auto"], float]:
        """(runtime, max_batch_size, max_delay_ms) for ``name``, overrides applied."""
        o = self.model_options.get(name, ModelOptions())
        return (
            o.runtime or self.runtime,
            o.max_batch_size if o.max_batch_size is not None else self.max_batch_size,
            o.max_delay_ms if o.max_delay_ms is not None else self.max_delay_ms,
        )


def archive_spec(spec: str) -> tuple[str | None, str] | None:
    """``(name or None, path)`` for a TorchServe archive spec (``NAME=FILE.mar``,
    ``FILE.mar``, ``FILE.tar.gz``, ``NAME=path/to/FOLDER``), None for a store reference."""
    from torchship.archive.sources import is_archive_name

    name, sep, file = spec.partition("=")
    if sep:
        return name.strip() or None, file.strip()
    return (None, spec) if is_archive_name(spec) else None
