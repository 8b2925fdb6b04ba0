"""``manifest.json``: everything needed to trust, rebuild and serve one model version."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

ArtifactFormat = Literal["safetensors", "pickle", "torchscript", "onnx"]


class InputSpec(BaseModel):
    """What one input item looks like, and how to turn an image into it.

    ``shape`` excludes the batch dimension. The image fields drive
    :mod:`torchship.preprocessing`; a model with ``kind="tensor"`` ignores them.
    """

    model_config = ConfigDict(extra="forbid")

    shape: list[int]
    dtype: str = "float32"
    kind: Literal["image", "tensor"] = "tensor"
    color: Literal["L", "RGB"] = "RGB"
    size: tuple[int, int] | None = None  # (height, width)
    fit: Literal["stretch", "center_crop", "ink"] = "stretch"
    invert: Literal["auto", "never", "always"] = "never"
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])


class Architecture(BaseModel):
    """How to rebuild the ``nn.Module`` before loading a state_dict into it."""

    model_config = ConfigDict(extra="forbid")

    target: str  # "package.module:ClassName"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class FileEntry(BaseModel):
    sha256: str
    size: int


class Verification(BaseModel):
    """How an exported artifact was checked against the eager model."""

    reference: str = "eager"
    batch_sizes: list[int]
    max_abs_diff: float
    tolerance: float
    passed: bool
    latency_ms: float  # median, batch 1, on the exporting machine
    reference_latency_ms: float


class Artifact(BaseModel):
    format: ArtifactFormat
    file: str
    method: str | None = None  # e.g. "trace", "script", "dynamo", "legacy"
    options: dict[str, Any] = Field(default_factory=dict)
    verification: Verification | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _torch_version() -> str:
    import torch  # a manifest is made where a model is saved: torch is loaded there

    return torch.__version__


def _torchship_version() -> str:
    from torchship import __version__

    return __version__


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    created_at: str = Field(default_factory=_now)
    torch_version: str = Field(default_factory=_torch_version)
    python_version: str = Field(default_factory=platform.python_version)
    torchship_version: str = Field(default_factory=_torchship_version)
    description: str = ""
    architecture: Architecture | None = None
    input: InputSpec | None = None
    output_names: list[str] = Field(default_factory=lambda: ["output"])
    labels: list[str] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    parent: str | None = None
    tags: list[str] = Field(default_factory=list)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    artifacts: dict[str, Artifact] = Field(default_factory=dict)
    examples: str | None = None  # a safetensors file of real inputs, for verification/warm-up

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def weights(self) -> Artifact:
        """The primary artifact: the state_dict or the whole pickled model."""
        for key in ("weights", "model"):
            if key in self.artifacts:
                return self.artifacts[key]
        raise KeyError("manifest has no weights artifact")
