"""Helpers for the .mar tests: a store with a digits model, archives built three ways,
and hand-made hostile zips."""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import torch

from torchship.archive import MANIFEST_PATH
from torchship.export import export_torchscript
from torchship.store import ModelStore
from torchship.zoo import digits

ROOT = Path(__file__).resolve().parents[1]
HANDLERS = ROOT / "src" / "torchship" / "torchserve" / "handlers"
DIGIT_PNG = ROOT / "data" / "digit_7_0.png"

# A handler written against TorchServe's own BaseHandler (needs the ts package), as a
# TorchServe user would write one: JSON {"inputs": ...} in, {label: probability} out.
BASE_HANDLER_SOURCE = """
import json

import torch
from ts.torch_handler.base_handler import BaseHandler


class JsonDigits(BaseHandler):
    def preprocess(self, data):
        rows = []
        for row in data:
            body = row.get("data") or row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            rows.append(torch.tensor(body["inputs"], dtype=torch.float32).reshape(1, 8, 8))
        return torch.stack(rows)

    def postprocess(self, data):
        probs = torch.softmax(data, dim=-1)
        return [{self.mapping[str(int(p.argmax()))]: round(float(p.max()), 6)} for p in probs]
"""


def digits_store(root: Path, model: torch.nn.Module, data: digits.DigitsData) -> ModelStore:
    store = ModelStore(root / "models")
    store.save(
        model,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=data.x_test[:8],
    )
    export_torchscript(store, "digits", method="trace")
    return store


def model_archiver(
    store: ModelStore,
    out: Path,
    name: str,
    version: str,
    handler: Path,
    archive_format: str = "default",
) -> Path:
    """An archive built by TorchServe's own torch-model-archiver (TorchScript + handler),
    in one of its formats: default (.mar), tgz (.tar.gz) or no-archive (a folder)."""
    manifest = store.manifest("digits")
    ts_file = store.path("digits", manifest.version) / manifest.artifacts["torchscript"].file
    work = out / f".{name}-files"
    work.mkdir(parents=True, exist_ok=True)
    labels = work / "index_to_name.json"
    labels.write_text(json.dumps({str(i): label for i, label in enumerate(digits.LABELS)}))
    spec = work / "torchship.json"
    spec.write_text(json.dumps({"input": digits.input_spec().model_dump(mode="json")}))
    serialized = work / "model.pt"
    serialized.write_bytes(ts_file.read_bytes())
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run(
        [
            str(archiver),
            "--model-name",
            name,
            "--version",
            version,
            "--serialized-file",
            str(serialized),
            "--handler",
            str(handler),
            "--extra-files",
            f"{labels},{spec}",
            "--export-path",
            str(out),
            "--archive-format",
            archive_format,
            "--force",
        ],
        check=True,
        capture_output=True,
    )
    suffix = {"default": ".mar", "tgz": ".tar.gz", "no-archive": ""}[archive_format]
    return out / f"{name}{suffix}"


def write_tgz(path: Path, entries: list[tuple[tarfile.TarInfo | str, bytes]]) -> Path:
    """A .tar.gz of ``(name or TarInfo, content)`` entries, as written (no checks)."""
    with tarfile.open(path, "w:gz") as tf:
        for entry, content in entries:
            info = entry if isinstance(entry, tarfile.TarInfo) else tarfile.TarInfo(entry)
            if info.isreg():
                info.size = len(content)
            tf.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return path


def tar_entry(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, bytes]:
    """A non-file tar entry: tarfile.SYMTYPE, LNKTYPE, FIFOTYPE, ..."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


def raw_tar_header(name: str, kind: bytes, size: int) -> bytes:
    """One 512-byte tar header of any type declaring ``size`` bytes of data, which need
    not follow: what a hostile archive can claim (tarfile will not write most of these)."""
    info = tarfile.TarInfo(name)
    info.size = size
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT)[: tarfile.BLOCKSIZE])
    block[156:157] = kind
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def write_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def manifest_bytes(name: str = "evil", handler: str = "handler.py", **model: str) -> bytes:
    return json.dumps(
        {"runtime": "python", "model": {"modelName": name, "handler": handler, **model}}
    ).encode()


def symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def png_of_digit(x: torch.Tensor) -> bytes:
    from torchship.preprocessing import tensor_to_image

    buf = io.BytesIO()
    tensor_to_image(x, digits.input_spec()).save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["MANIFEST_PATH"]
