"""``MAR-INF/MANIFEST.json``: TorchServe's description of a model archive.

The shape is TorchServe's (camelCase keys, as ``torch-model-archiver`` 0.12 writes
them); unknown keys are kept, so a manifest read and written back loses nothing.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from torchship.archive.errors import ArchiveError
from torchship.store import validate_name

MANIFEST_PATH = "MAR-INF/MANIFEST.json"
DEFAULT_VERSION = "1.0"  # what TorchServe assumes when an archive names no version


class MarModel(BaseModel):
    """The ``model`` section: name, version, files and the handler entry point."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    model_name: str = Field(alias="modelName")  # fields in torch-model-archiver's order
    serialized_file: str | None = Field(None, alias="serializedFile")
    handler: str
    model_file: str | None = Field(None, alias="modelFile")
    model_version: str | None = Field(None, alias="modelVersion")
    extensions: str | None = None
    requirements_file: str | None = Field(None, alias="requirementsFile")
    config_file: str | None = Field(None, alias="configFile")

    @field_validator("model_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("model_version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "model version")

    @property
    def version(self) -> str:
        return self.model_version or DEFAULT_VERSION

    def files(self) -> dict[str, str]:
        """The archive files the manifest names, by role."""
        named = {
            "serializedFile": self.serialized_file,
            "modelFile": self.model_file,
            "requirementsFile": self.requirements_file,
            "configFile": self.config_file,
        }
        return {role: name for role, name in named.items() if name}


class MarManifest(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")

    created_on: str = Field(
        default_factory=lambda: datetime.now().strftime("%d/%m/%Y %H:%M:%S"), alias="createdOn"
    )
    runtime: str = "python"
    model: MarModel
    archiver_version: str | None = Field(None, alias="archiverVersion")

    @classmethod
    def parse(cls, raw: bytes, source: str) -> MarManifest:
        try:
            data: Any = json.loads(raw)
            return cls.model_validate(data)
        except (ValueError, RecursionError) as exc:  # JSON and validation errors alike
            details = (
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                if isinstance(exc, ValidationError)
                else str(exc)[:200]
            )
            raise ArchiveError(
                f"{source}: {MANIFEST_PATH} is not a valid TorchServe manifest ({details}).",
                hint="Build the archive with torch-model-archiver or torchship archive.",
            ) from None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_none=True), indent=2)
