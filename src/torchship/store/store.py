"""``ModelStore``: versioned models in a plain folder, written atomically, verified on load.

Layout::

    <root>/<name>/<version>/manifest.json      # written last, inside the temp folder
    <root>/<name>/<version>/weights.safetensors
    <root>/<name>/aliases.json                  # {"production": "3"}

A version folder only ever appears by an atomic ``rename`` of a complete, fsynced temp
folder, so a crash at any moment leaves either no version or a whole one.
"""

from __future__ import annotations

import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from torchship.errors import (
    ArtifactNotFoundError,
    IntegrityError,
    InvalidInputError,
    ModelNotFoundError,
    VersionExistsError,
    VersionNotFoundError,
)
from torchship.store._atomic import (
    file_lock,
    fsync_dir,
    fsync_tree,
    read_json,
    sha256_file,
    write_json_atomic,
)
from torchship.store._names import parse_ref, validate_name
from torchship.store.manifest import Architecture, Artifact, FileEntry, InputSpec, Manifest

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch, safetensors and the serializers are imported where weights are read or written:
# reading manifests and resolving versions (what `torchship serve`'s supervisor does
# before it starts the workers) needs none of them.

MANIFEST = "manifest.json"
ALIASES = "aliases.json"
DEFAULT_ALIAS = "production"  # the version served when a request names none
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600.0


class TorchVersionWarning(UserWarning):
    """The model was saved with a different torch version than the one loading it."""


class ModelStore:
    def __init__(self, root: str | Path = "models") -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # --- reading --------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def versions(self, name: str) -> list[str]:
        """Complete versions of ``name``, oldest first."""
        return [m.version for m in self.manifests(name)]

    def manifests(self, name: str) -> list[Manifest]:
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            return []
        found = []
        for p in model_dir.iterdir():
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file():
                found.append(self._read_manifest(p))
        return sorted(found, key=_version_sort_key)

    def aliases(self, name: str) -> dict[str, str]:
        data = read_json(self._model_dir(name) / ALIASES, default={})
        return {str(k): str(v) for k, v in data.items()}

    def resolve(self, name: str, version: str | None = None) -> str:
        """Turn ``None`` (the default: ``production`` if set, else the newest), ``"latest"``,
        an alias or a version into an existing version."""
        validate_name(name)
        if version is not None and version != "latest":
            validate_name(version, "version or alias")
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(
                f"No model named {name!r} in {self.root}.",
                hint=f"Models here: {', '.join(self.names()) or 'none'}.",
            )
        if version is None:
            default = self.aliases(name).get(DEFAULT_ALIAS)
            return default if default in versions else versions[-1]
        if version == "latest":
            return versions[-1]
        if version in versions:
            return version
        aliases = self.aliases(name)
        if version in aliases and aliases[version] in versions:
            return aliases[version]
        raise VersionNotFoundError(
            f"Model {name!r} has no version or alias {version!r}.",
            hint=f"Versions: {', '.join(versions)}; aliases: {', '.join(aliases) or 'none'}.",
        )

    def manifest(self, ref: str, version: str | None = None) -> Manifest:
        name, version = self._split(ref, version)
        return self._read_manifest(self.path(name, self.resolve(name, version)))

    def path(self, name: str, version: str) -> Path:
        return self._model_dir(name) / validate_name(version, "version")

    def latest(self, name: str) -> Manifest:
        return self.manifest(name, "latest")

    # --- saving ---------------------------------------------------------------------

    def save(
        self,
        model: nn.Module,
        name: str,
        *,
        version: str | None = None,
        format: Literal["state_dict", "whole"] = "state_dict",
        input_spec: InputSpec | None = None,
        labels: Iterable[str] | None = None,
        metrics: dict[str, float] | None = None,
        architecture: Architecture | None = None,
        examples: torch.Tensor | None = None,
        parent: str | None = None,
        tags: Iterable[str] = (),
        aliases: Iterable[str] = (),
        description: str = "",
        output_names: list[str] | None = None,
    ) -> Manifest:
        """Save ``model`` as a new version; returns its manifest.

        ``examples`` (a batch of real inputs) is stored beside the weights so exports
        can be verified and servers warmed up on real data.
        """
        from safetensors.torch import save_file

        from torchship.store import serialization as ser

        validate_name(name)
        if version is not None:
            validate_name(version, "version")
        aliases = [validate_name(a, "alias") for a in aliases]
        model_dir = self._model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp(model_dir)

        tmp = model_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            artifacts: dict[str, Artifact] = {}
            was_training = model.training
            model.eval()
            try:
                if format == "state_dict":
                    ser.save_state_dict(model, tmp / "weights.safetensors")
                    artifacts["weights"] = Artifact(
                        format="safetensors", file="weights.safetensors"
                    )
                    architecture = architecture or ser.architecture_of(model)
                    ser.check_rebuildable(model, architecture)
                elif format == "whole":
                    ser.save_whole_model(model, tmp / "model.pt")
                    artifacts["weights"] = Artifact(format="pickle", file="model.pt")
                    architecture = architecture or ser.architecture_of(model)
                else:
                    raise InvalidInputError(
                        f"Unknown save format {format!r}; use 'state_dict' or 'whole'."
                    )
            finally:
                model.train(was_training)
            examples_file = None
            if examples is not None:
                examples_file = "examples.safetensors"
                save_file({"input": examples.detach().cpu().contiguous()}, str(tmp / examples_file))
            manifest = Manifest(
                name=name,
                version=version or "0",
                description=description,
                architecture=architecture,
                input=input_spec,
                labels=list(labels) if labels is not None else None,
                metrics=dict(metrics or {}),
                parent=parent,
                tags=list(tags),
                artifacts=artifacts,
                examples=examples_file,
                output_names=output_names or ["output"],
            )
            manifest.files = _hash_files(tmp)
            return self._publish(tmp, manifest, explicit=version is not None, aliases=aliases)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _publish(
        self, tmp: Path, manifest: Manifest, *, explicit: bool, aliases: list[str]
    ) -> Manifest:
        model_dir = tmp.parent
        for _attempt in range(100):
            if not explicit:
                manifest.version = self._next_version(manifest.name)
            write_json_atomic(tmp / MANIFEST, manifest.model_dump(mode="json"))
            fsync_tree(tmp)
            target = model_dir / manifest.version
            try:
                # rename(2) onto an existing non-empty folder fails; onto a missing one it is atomic.
                if target.exists():
                    raise FileExistsError(target)
                tmp.rename(target)
            except OSError:
                if explicit:
                    raise VersionExistsError(
                        f"{manifest.name}:{manifest.version} already exists.",
                        hint="Pick another version, or omit it to get the next number.",
                    ) from None
                continue  # a concurrent saver took this number; take the next
            fsync_dir(model_dir)
            for alias in aliases:
                self.set_alias(manifest.name, alias, manifest.version)
            return manifest
        raise VersionExistsError(f"Could not allocate a version for {manifest.name}.")

    def add_artifact(
        self,
        ref: str,
        key: str,
        write: Callable[[Path], None],
        artifact: Artifact,
        version: str | None = None,
    ) -> Manifest:
        """Write a new file into an existing version and record it in the manifest.

        ``write`` receives a temp path inside the version folder; the file is renamed into
        place and then the manifest is rewritten, both atomically.
        """
        name, version = self._split(ref, version)
        version = self.resolve(name, version)
        vdir = self.path(name, version)
        filename = validate_name(artifact.file, "artifact file name")
        tmp = vdir / f".{filename}.{uuid.uuid4().hex}.tmp"
        try:
            write(tmp)
            with file_lock(self._model_dir(name) / ".lock"):
                tmp.rename(vdir / filename)  # atomically replaces an older file
                fsync_dir(vdir)
                manifest = self._read_manifest(vdir)
                manifest.artifacts[key] = artifact
                manifest.files[filename] = FileEntry(
                    sha256=sha256_file(vdir / filename), size=(vdir / filename).stat().st_size
                )
                write_json_atomic(vdir / MANIFEST, manifest.model_dump(mode="json"))
            return manifest
        finally:
            tmp.unlink(missing_ok=True)

    def update_manifest(
        self, ref: str, change: Callable[[Manifest], None], version: str | None = None
    ) -> Manifest:
        """Apply ``change`` to a manifest under the model's lock (metrics, tags, ...)."""
        name, version = self._split(ref, version)
        vdir = self.path(name, self.resolve(name, version))
        with file_lock(self._model_dir(name) / ".lock"):
            manifest = self._read_manifest(vdir)
            change(manifest)
            write_json_atomic(vdir / MANIFEST, manifest.model_dump(mode="json"))
        return manifest

    def set_alias(self, name: str, alias: str, version: str) -> None:
        validate_name(alias, "alias")
        if alias in self.versions(name):
            raise InvalidInputError(f"Alias {alias!r} would shadow the version of the same name.")
        version = self.resolve(name, version)
        with file_lock(self._model_dir(name) / ".lock"):
            aliases = self.aliases(name)
            aliases[alias] = version
            write_json_atomic(self._model_dir(name) / ALIASES, aliases)

    def remove_alias(self, name: str, alias: str) -> None:
        with file_lock(self._model_dir(name) / ".lock"):
            aliases = self.aliases(name)
            if aliases.pop(alias, None) is None:
                raise VersionNotFoundError(f"Model {name!r} has no alias {alias!r}.")
            write_json_atomic(self._model_dir(name) / ALIASES, aliases)

    def delete(self, ref: str, version: str | None = None, *, force: bool = False) -> None:
        """Delete one version (atomically hidden first, then removed)."""
        name, version = self._split(ref, version)
        if version is None:
            raise InvalidInputError("Say which version to delete, e.g. digits:3.")
        version = self.resolve(name, version)
        with file_lock(self._model_dir(name) / ".lock"):
            aliases = self.aliases(name)
            pointing = [a for a, v in aliases.items() if v == version]
            if pointing and not force:
                raise InvalidInputError(
                    f"{name}:{version} is still aliased as {', '.join(pointing)}.",
                    hint="Move or remove those aliases first, or delete anyway with --force "
                    "(force=True in Python).",
                )
            vdir = self.path(name, version)
            trash = vdir.with_name(f"{_TMP_PREFIX}deleted-{version}-{uuid.uuid4().hex}")
            vdir.rename(trash)
            fsync_dir(vdir.parent)
            if pointing:
                write_json_atomic(
                    self._model_dir(name) / ALIASES,
                    {a: v for a, v in aliases.items() if v != version},
                )
        shutil.rmtree(trash, ignore_errors=True)

    # --- loading --------------------------------------------------------------------

    def verify(self, ref: str, version: str | None = None) -> Manifest:
        """Check every recorded file's size and sha256; raise ``IntegrityError`` on mismatch."""
        name, version = self._split(ref, version)
        vdir = self.path(name, self.resolve(name, version))
        manifest = self._read_manifest(vdir)
        for filename, entry in manifest.files.items():
            path = vdir / validate_name(filename, "file name")
            if not path.is_file():
                raise IntegrityError(f"{manifest.ref}: {filename} is missing.")
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise IntegrityError(
                    f"{manifest.ref}: {filename} does not match its recorded checksum "
                    f"(expected sha256 {entry.sha256[:16]}..., got {actual[:16]}...). "
                    "The file was modified or corrupted after saving; it was not loaded.",
                    hint="Restore the file, or save the model again.",
                )
        return manifest

    def artifact_path(self, ref: str, key: str, version: str | None = None) -> Path:
        manifest = self.manifest(ref, version)
        if key not in manifest.artifacts:
            raise ArtifactNotFoundError(
                f"{manifest.ref} has no {key!r} artifact.",
                hint=f"It has: {', '.join(manifest.artifacts)}. Export it first "
                "(torchship export).",
            )
        return self.path(manifest.name, manifest.version) / manifest.artifacts[key].file

    def load(
        self,
        ref: str,
        version: str | None = None,
        *,
        device: str | torch.device = "auto",
        trust_pickle: bool = False,
        model: nn.Module | None = None,
        verify: bool = True,
    ) -> nn.Module:
        """Load the eager model in eval mode on ``device``, after verifying checksums.

        For a state_dict the module is rebuilt from the recorded architecture unless
        ``model`` (an instance to fill) is given. A whole-model pickle needs
        ``trust_pickle=True``.
        """
        from torch import nn

        from torchship.devices import resolve_device
        from torchship.store import serialization as ser

        name, version = self._split(ref, version)
        manifest = self.verify(name, version) if verify else self.manifest(name, version)
        _warn_on_version_mismatch(manifest)
        dev = resolve_device(device)
        vdir = self.path(manifest.name, manifest.version)
        weights = manifest.weights
        if weights.format == "pickle":
            loaded = ser.load_pickle(
                vdir / weights.file, trust_pickle=trust_pickle, map_location=dev
            )
            if not isinstance(loaded, nn.Module):
                raise IntegrityError(f"{manifest.ref}: {weights.file} does not hold an nn.Module.")
            module = loaded
        else:
            if model is None:
                if manifest.architecture is None:
                    raise IntegrityError(f"{manifest.ref} records no architecture.")
                model = ser.build_architecture(manifest.architecture)
            ser.load_state_dict_into(model, vdir / weights.file, device="cpu")
            module = model
        return module.to(dev).eval()

    def load_examples(self, ref: str, version: str | None = None) -> torch.Tensor | None:
        manifest = self.manifest(ref, version)
        if manifest.examples is None:
            return None
        from safetensors.torch import load_file

        path = self.path(manifest.name, manifest.version) / manifest.examples
        return load_file(str(path))["input"]

    # --- internals ------------------------------------------------------------------

    def _split(self, ref: str, version: str | None) -> tuple[str, str | None]:
        name, ref_version = parse_ref(ref)
        return name, version if version is not None else ref_version

    def _model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def _read_manifest(self, vdir: Path) -> Manifest:
        """Parse a version's manifest and refuse one that points outside its folder,
        at files it does not checksum, or at another model or version."""
        manifest = Manifest.model_validate(read_json(vdir / MANIFEST))
        if (manifest.name, manifest.version) != (vdir.parent.name, vdir.name):
            raise IntegrityError(
                f"{vdir} holds a manifest for {manifest.ref}; a copied or renamed folder?"
            )
        named = [a.file for a in manifest.artifacts.values()]
        named += [manifest.examples] if manifest.examples else []
        for filename in named:
            validate_name(filename, "file name")
            if filename not in manifest.files:
                raise IntegrityError(
                    f"{manifest.ref}: {filename} is not covered by the manifest's checksums."
                )
        return manifest

    def _next_version(self, name: str) -> str:
        numbers = [int(v) for v in self._all_version_dirs(name) if v.isdigit()]
        return str(max(numbers, default=0) + 1)

    def _all_version_dirs(self, name: str) -> list[str]:
        model_dir = self._model_dir(name)
        return [p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def _remove_stale_temp(self, model_dir: Path) -> None:
        """Clear temp folders left by savers that died more than an hour ago."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        for p in model_dir.glob(f"{_TMP_PREFIX}*"):
            try:
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass


def _hash_files(folder: Path) -> dict[str, FileEntry]:
    return {
        p.name: FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def _version_sort_key(m: Manifest) -> tuple[str, int, str]:
    return (m.created_at, int(m.version) if m.version.isdigit() else -1, m.version)


def _warn_on_version_mismatch(manifest: Manifest) -> None:
    import torch

    saved = manifest.torch_version.split("+")[0]
    running = torch.__version__.split("+")[0]
    if saved != running:
        warnings.warn(
            f"{manifest.ref} was saved with torch {saved} but torch {running} is loading it; "
            "outputs may differ. Re-verify (torchship export re-checks against eager) or "
            "pin the version it was saved with.",
            TorchVersionWarning,
            stacklevel=3,
        )


def model_files_size(manifest: Manifest) -> dict[str, int]:
    """File sizes by name, for reports."""
    return {k: v.size for k, v in manifest.files.items()}


__all__ = ["ModelStore", "TorchVersionWarning", "model_files_size"]
