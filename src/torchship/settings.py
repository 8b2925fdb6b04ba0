"""One typed settings object; CLI flags, ``TORCHSHIP_*`` env vars and YAML files map onto it.

Read when :func:`load_settings` is called, never at import time. Precedence, highest
first: explicit overrides (CLI flags), environment variables, the YAML file, defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from torchship.errors import ConfigError

S = TypeVar("S", bound="Settings")

Runtime = Literal["auto", "eager", "torchscript", "onnx"]


class Settings(BaseSettings):
    """Everything a torchship process can be told."""

    model_config = SettingsConfigDict(env_prefix="TORCHSHIP_", extra="forbid")

    store: Path = Field(Path("models"), description="Folder of the model store.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda[:N]'.")
    runtime: Runtime = Field(
        "auto", description="Inference runtime; 'auto' measures the verified ones and picks."
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads per process; None = cores / worker processes.",
    )
    trust_pickle: bool = Field(
        False, description="Allow loading whole-model pickles (they can run code)."
    )


def load_settings(
    config_file: str | Path | None = None,
    /,
    *,
    cls: type[S] = Settings,  # type: ignore[assignment]
    **overrides: Any,
) -> S:
    """Build settings from a YAML file, the environment and explicit overrides.

    ``None`` overrides are ignored so unset CLI flags do not mask env vars or the file.
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            file_values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"Cannot read config file {path}: {exc}") from exc
        if not isinstance(file_values, dict):
            raise ConfigError(f"{path} must hold a mapping of settings.")
    # pydantic-settings ranks init kwargs above env vars, so hand it the file's values
    # only where the environment says nothing; explicit overrides win over both.
    env = {k.upper() for k in os.environ}
    from_file = {k: v for k, v in file_values.items() if f"TORCHSHIP_{k.upper()}" not in env}
    explicit = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**(from_file | explicit))
    except ValidationError as exc:
        raise ConfigError(f"Invalid settings: {describe_errors(exc)}") from exc
    except SettingsError as exc:
        raise ConfigError(f"Invalid settings: {exc}") from exc


def describe_errors(exc: ValidationError) -> str:
    """pydantic's errors as one line each, ``field: what is wrong (got X)``, without its
    documentation links; a value that failed a field's first check is named once."""
    lines: list[str] = []
    seen: set[str] = set()
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        parent = where.rsplit(".", 1)[0]
        if error["type"] == "missing" and parent in seen:
            continue  # "burst missing" after "rate unreadable": one mistake, said once
        seen.add(parent)
        got = error.get("input")
        shown = "" if error["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{where}: {error['msg']}{shown}")
    return "; ".join(lines)
