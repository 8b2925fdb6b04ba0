"""Settings of a serving process (``torchship serve``, ``TORCHSHIP_*``, ``configs/*.yaml``)."""

from __future__ import annotations

import json
import os
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import NoDecode

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


class ServeSettings(Settings):
    """Everything ``torchship serve`` can be told; CLI flags map onto these fields."""

    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["digits"],
        description="Models to serve as NAME[:VERSION|ALIAS]; the first is the default.",
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
    max_queue_size: int = Field(256, ge=1, description="Queued requests before 503.")
    timeout_s: float = Field(30.0, gt=0, description="Per-request limit on queue + inference.")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Larger bodies get 413.")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Decoded size limit (decompression bombs get 413)."
    )
    top_k: int = Field(5, ge=1, description="Classes returned per prediction by default.")
    warmup: bool = Field(True, description="Warm up (and size batches) before ready.")
    graceful_timeout_s: float = Field(30.0, gt=0, description="SIGTERM drain limit.")

    @field_validator("max_batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("max_batch_size must be at least 1 (1 turns batching off)")
        return value

    @field_validator("models", mode="before")
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
