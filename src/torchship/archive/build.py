"""Build a TorchServe model archive (``.mar``) from a model store version.

The archive is what ``torch-model-archiver`` would write for the same files, so
TorchServe serves it unchanged, and torchship serves it natively:

* ``model.pt`` -- the TorchScript artifact when the version has a verified one
  (``runtime="torchscript"``, the default choice of ``"auto"``), else the eager
  ``state_dict`` with a generated ``model.py`` whose one class rebuilds the recorded
  architecture (TorchServe's eager contract: ``modelFile`` + ``serializedFile``);
* the handler file (``image``/``tensor`` ship with torchship, or your own ``.py``);
* ``index_to_name.json`` (the labels), ``torchship.json`` (the input spec the shipped
  handlers preprocess by) and ``model-config.yaml`` (batch size, batch delay, workers,
  response timeout, which TorchServe reads from ``configFile``);
* ``MAR-INF/MANIFEST.json``.

It is written to a temp file and renamed into place: never half a file.
"""

from __future__ import annotations

import importlib.resources
import io
import json
import os
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from torchship import __version__
from torchship.archive.errors import ArchiveError
from torchship.archive.manifest import MANIFEST_PATH, MarManifest, MarModel
from torchship.runtime import verified_artifacts
from torchship.store import ModelStore, validate_name
from torchship.store._atomic import fsync_dir

SHIPPED_HANDLERS = {"image": "digits_image.py", "tensor": "tensor.py"}
"""Handlers that ship with torchship, written against TorchServe's handler contract."""

TORCHSERVE_BUILTINS = (
    "base_handler",
    "image_classifier",
    "image_segmenter",
    "object_detector",
    "text_classifier",
)
"""TorchServe's own handlers, named rather than copied (they live in its ``ts`` package)."""

SPEC_FILE = "torchship.json"
LABELS_FILE = "index_to_name.json"
CONFIG_FILE = "model-config.yaml"
SERIALIZED_FILE = "model.pt"
MODEL_FILE = "model.py"

ArchiveRuntime = Literal["auto", "torchscript", "eager"]


@dataclass
class ModelConfig:
    """TorchServe's per-model serving settings (``model-config.yaml``)."""

    batch_size: int = 8
    max_batch_delay_ms: int = 5
    min_workers: int = 1
    max_workers: int = 1
    response_timeout_s: int = 120
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what, value in (
            ("batch_size", self.batch_size),
            ("min_workers", self.min_workers),
            ("response_timeout_s", self.response_timeout_s),
        ):
            if value < 1:
                raise ArchiveError(f"{what} must be at least 1, got {value}.")
        if self.max_batch_delay_ms < 0:
            raise ArchiveError("max_batch_delay_ms must not be negative.")
        if self.max_workers < self.min_workers:
            raise ArchiveError("max_workers cannot be less than min_workers.")

    def to_yaml(self) -> str:
        data = {
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            **self.extra,
        }
        return yaml.safe_dump(data, sort_keys=False)


@dataclass(frozen=True)
class BuiltArchive:
    path: Path
    manifest: MarManifest
    runtime: Literal["torchscript", "eager"]
    files: tuple[str, ...]

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def build_archive(
    store: ModelStore | str | Path,
    ref: str,
    *,
    handler: str = "image",
    export_path: str | Path = ".",
    runtime: ArchiveRuntime = "auto",
    model_name: str | None = None,
    version: str | None = None,
    config: ModelConfig | None = None,
    extra_files: Sequence[str | Path] = (),
    requirements_file: str | Path | None = None,
    overwrite: bool = False,
) -> BuiltArchive:
    """Write ``<export_path>/<model_name>.mar`` for the store version ``ref``.

    ``handler``: ``"image"`` (decode an image, preprocess it as the version's input spec
    says, top-5 labels), ``"tensor"`` (JSON or ``.npy`` tensors), a TorchServe built-in
    such as ``"image_classifier"``, or the path of your own handler ``.py``.
    """
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    manifest = store.verify(ref)  # checksums first: never package a tampered file
    name = validate_name(model_name or manifest.name)
    mar_version = validate_name(version or manifest.version, "model version")
    config = config or ModelConfig()
    export_dir = Path(export_path)
    export_dir.mkdir(parents=True, exist_ok=True)
    target = export_dir / f"{name}.mar"
    if target.exists() and not overwrite:
        raise ArchiveError(
            f"{target} already exists.", hint="Pass overwrite=True (--force) to replace it."
        )

    files: dict[str, bytes] = {}
    chosen = _pick_runtime(manifest.artifacts, verified_artifacts(manifest), runtime, ref)
    vdir = store.path(manifest.name, manifest.version)
    model_file = None
    if chosen == "torchscript":
        files[SERIALIZED_FILE] = (vdir / manifest.artifacts["torchscript"].file).read_bytes()
    else:
        files[SERIALIZED_FILE], files[MODEL_FILE] = _eager_files(store, manifest.ref, manifest)
        model_file = MODEL_FILE
    handler_name, handler_bytes = _handler_file(handler, manifest.input)
    if handler_bytes is not None:
        files[handler_name] = handler_bytes
    if manifest.labels:
        files[LABELS_FILE] = json.dumps(dict(enumerate(manifest.labels)), indent=2).encode()
    files[SPEC_FILE] = json.dumps(
        {
            "source": manifest.ref,
            "torchship_version": __version__,
            "runtime": chosen,
            "input": manifest.input.model_dump(mode="json") if manifest.input else None,
            "labels": manifest.labels,
            "metrics": manifest.metrics,
        },
        indent=2,
    ).encode()
    files[CONFIG_FILE] = config.to_yaml().encode()
    for extra in extra_files:
        _add_file(files, Path(extra))
    requirements = None
    if requirements_file is not None:
        requirements = _add_file(files, Path(requirements_file))

    mar_manifest = MarManifest(
        runtime="python",
        model=MarModel(
            model_name=name,
            serialized_file=SERIALIZED_FILE,
            handler=handler_name,
            model_file=model_file,
            model_version=mar_version,
            requirements_file=requirements,
            config_file=CONFIG_FILE,
        ),
        archiver_version=f"torchship-{__version__}",
    )
    files[MANIFEST_PATH] = mar_manifest.to_json().encode()
    _write_zip(target, files)
    return BuiltArchive(target, mar_manifest, chosen, tuple(files))


def _pick_runtime(
    artifacts: dict[str, Any], verified: list[str], runtime: ArchiveRuntime, ref: str
) -> Literal["torchscript", "eager"]:
    if runtime == "torchscript" or (runtime == "auto" and "torchscript" in verified):
        if "torchscript" not in artifacts:
            raise ArchiveError(
                f"{ref} has no TorchScript artifact.",
                hint=f"Export it first (torchship export {ref} --format torchscript), "
                "or archive the eager weights with runtime 'eager'.",
            )
        return "torchscript"
    if runtime not in ("auto", "eager"):
        raise ArchiveError(f"Unknown archive runtime {runtime!r}; use auto, torchscript or eager.")
    return "eager"


def _eager_files(store: ModelStore, ref: str, manifest: Any) -> tuple[bytes, bytes]:
    """The state_dict as ``torch.save`` writes it, and a ``model.py`` with one class."""
    arch = manifest.architecture
    if manifest.weights.format == "pickle" or arch is None:
        raise ArchiveError(
            f"{ref} is stored as a whole-model pickle or without an architecture, so "
            "TorchServe's eager loader could not rebuild it.",
            hint=f"Export TorchScript first (torchship export {ref} --format torchscript).",
        )
    module, _, cls = arch.target.partition(":")
    if not module or not cls or module == "__main__":
        raise ArchiveError(
            f"{ref}'s architecture {arch.target!r} is not importable from another process.",
            hint="Define the model class in an importable module, or archive TorchScript.",
        )
    model = store.load(ref, device="cpu", verify=False)  # verified by the caller
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    source = (
        '"""Generated by torchship archive: the one model class TorchServe instantiates."""\n\n'
        f"from {module} import {cls} as _Architecture\n\n\n"
        "class Model(_Architecture):\n"
        "    def __init__(self) -> None:\n"
        f"        super().__init__(**{arch.kwargs!r})\n"
    )
    return buffer.getvalue(), source.encode()


def _handler_file(handler: str, spec: Any) -> tuple[str, bytes | None]:
    if handler in SHIPPED_HANDLERS:
        if handler == "image" and (spec is None or spec.kind != "image"):
            raise ArchiveError(
                "The image handler needs a model whose input spec is an image.",
                hint="Use --handler tensor for tensor models.",
            )
        filename = SHIPPED_HANDLERS[handler]
        source = importlib.resources.files("torchship.torchserve.handlers") / filename
        return filename, source.read_bytes()
    if handler in TORCHSERVE_BUILTINS:
        return handler, None
    path = Path(handler)
    if path.suffix != ".py" or not path.is_file():
        raise ArchiveError(
            f"Handler {handler!r} is neither a shipped handler, a TorchServe built-in nor "
            "an existing .py file.",
            hint=f"Use one of {', '.join(SHIPPED_HANDLERS)}, "
            f"{', '.join(TORCHSERVE_BUILTINS)}, or a path to your handler file.",
        )
    return validate_name(path.name, "handler file name"), path.read_bytes()


def _add_file(files: dict[str, bytes], path: Path) -> str:
    if not path.is_file():
        raise ArchiveError(f"Extra file {path} does not exist.")
    name = validate_name(path.name, "file name")
    if name in files:
        raise ArchiveError(f"{name} would be in the archive twice.")
    files[name] = path.read_bytes()
    return name


def _write_zip(target: Path, files: dict[str, bytes]) -> None:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
                zf.writestr(info, data)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)
