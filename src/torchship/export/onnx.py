"""ONNX export: a portable graph for ONNX Runtime (and TensorRT, OpenVINO, browsers, ...).

Two exporters, as PyTorch ships them:

* ``"dynamo"`` (default, opset 18): captures the model with ``torch.export``; it follows
  Python control flow while capturing and fails loudly on what it cannot capture.
* ``"legacy"`` (opset 17): the TorchScript tracer. Fast and mature, but like any trace
  it silently freezes data-dependent branches, so verification matters even more.

The batch axis is exported as dynamic (``dynamic_batch=True``), so one file serves any
batch size. The file is self-contained (no external ``.data`` file; models over 2 GB
are out of scope).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchship.errors import ExportError, MissingDependencyError
from torchship.export._store import (
    example_for_export,
    load_reference,
    require_pass,
    store_artifact,
    verification_inputs,
)
from torchship.export.verify import verify_outputs
from torchship.runtime.ort import create_session
from torchship.store import ModelStore
from torchship.store.manifest import Artifact, Manifest

OnnxExporter = Literal["dynamo", "legacy"]
DEFAULT_OPSET: dict[str, int] = {"dynamo": 18, "legacy": 17}
ARTIFACT_KEY = "onnx"
ARTIFACT_FILE = "model.onnx"

logger = logging.getLogger(__name__)

_MISMATCH_HINT = (
    "The legacy exporter traces: data-dependent if/for are frozen to the example's path. "
    "The dynamo exporter refuses such code instead (rewrite it with torch.cond), or use "
    "TorchScript with method='script'. If the difference is float noise, raise tolerance."
)

# Loggers the exporters chat on (progress, "torchvision is not installed", ...).
_NOISY_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._dynamo",
    "torch.fx",
    "onnxscript",
    "onnx_ir",
)


def to_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    exporter: OnnxExporter = "dynamo",
    opset: int | None = None,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Export ``model`` (in eval mode) to ``path`` and check it with ``onnx.checker``.

    ``example`` is a real input batch; use at least 2 items with ``dynamic_batch`` so
    the exporter does not treat the batch size as a constant. Returns ``path``.
    """
    if exporter not in DEFAULT_OPSET:
        raise ExportError(f"Unknown ONNX exporter {exporter!r}; use 'dynamo' or 'legacy'.")
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("onnx", "onnx", "ONNX export") from exc
    path = Path(path)
    opset = opset or DEFAULT_OPSET[exporter]
    newest = onnx.defs.onnx_opset_version()
    if not 7 <= opset <= newest:
        raise ExportError(
            f"Opset {opset} is not one this onnx package writes (7 to {newest}).",
            hint="The dynamo exporter writes opset 18 or later; --exporter legacy older ones.",
        )
    inputs = list(input_names or ["input"])
    outputs = list(output_names or ["output"])
    was_training = model.training
    model.eval()
    try:
        with _quiet_exporter() as chatter:
            try:
                if exporter == "dynamo":
                    torch.onnx.export(
                        model,
                        (example,),
                        str(path),
                        dynamo=True,
                        opset_version=opset,
                        input_names=inputs,
                        output_names=outputs,
                        dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None,
                        external_data=False,
                        verbose=False,
                    )
                else:
                    axes = {name: {0: "batch"} for name in [*inputs, *outputs]}
                    torch.onnx.export(
                        model,
                        (example,),
                        str(path),
                        dynamo=False,
                        opset_version=opset,
                        input_names=inputs,
                        output_names=outputs,
                        dynamic_axes=axes if dynamic_batch else None,
                        do_constant_folding=True,
                    )
            except Exception as exc:  # the exporters raise many types
                logger.debug("exporter output before the failure:\n%s", chatter())
                raise ExportError(
                    f"ONNX export ({exporter}, opset {opset}) of {type(model).__name__} "
                    f"failed: {_summarize(exc)}",
                    hint=(
                        "The dynamo exporter cannot capture data-dependent control flow "
                        "unless written with torch.cond; try exporter='legacy' (a trace, "
                        "then checked by verification) or rewrite that part."
                        if exporter == "dynamo"
                        else "Try exporter='dynamo', or a different opset."
                    ),
                    exporter_output=chatter()[-4000:],
                ) from exc
    finally:
        model.train(was_training)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"The exported ONNX file fails onnx.checker: {exc}") from exc
    written = written_opset(path)
    if written != opset:  # the dynamo exporter writes 18+ whatever it is asked
        raise ExportError(
            f"The {exporter} exporter wrote opset {written}, not the {opset} asked for.",
            hint="For an opset below 18 use exporter='legacy' (--exporter legacy).",
        )
    return path


def written_opset(path: str | Path) -> int:
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[Callable[[], str]]:
    """Silence exporter prints (stdout and stderr), warnings and log chatter; yield a
    getter for what was said.

    The captured text is logged at DEBUG (and attached to the error's ``details`` when
    an export fails), so nothing is lost but the console stays clean.
    """
    stdout = io.StringIO()
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}

    def chatter() -> str:
        return stdout.getvalue().strip()

    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stdout),
        ):
            warnings.simplefilter("always")
            yield chatter
        for w in caught:
            logger.debug("exporter warning: %s: %s", w.category.__name__, w.message)
        if stdout.getvalue():
            logger.debug("exporter output: %s", stdout.getvalue())
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _summarize(exc: BaseException) -> str:
    """The useful lines of an exporter error: its summary and the user code that failed.

    The dynamo exporter's messages are long (next steps, links, debug flags); the full
    text stays available as the error's ``__cause__``.
    """
    lines = [ln.rstrip() for ln in _ANSI.sub("", str(exc)).strip().splitlines()]
    if not lines:
        return type(exc).__name__
    picked: list[str] = []
    for marker, count in (("## Exception summary", 1), ("The following call raised", 2)):
        idx = next((i for i, ln in enumerate(lines) if ln.startswith(marker)), None)
        if idx is not None:
            picked += [ln.strip() for ln in lines[idx + 1 :] if ln.strip()][:count]
    return " | ".join(picked) if picked else lines[0]


def onnx_runner(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Call an ONNX Runtime session like a module: tensor in, first output tensor out."""
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    return run


def export_onnx(
    store: ModelStore,
    ref: str,
    *,
    exporter: OnnxExporter = "dynamo",
    opset: int | None = None,
    tolerance: float = 1e-4,
    batch_sizes: Sequence[int] = (1, 8, 32),
    inputs: torch.Tensor | None = None,
    trust_pickle: bool = False,
    model: nn.Module | None = None,
) -> Manifest:
    """Export ``ref`` to ONNX, verify it in ONNX Runtime (CPU), store it if it passes.

    On a mismatch ``ExportVerificationError`` is raised and nothing is stored.
    ``inputs`` defaults to the version's stored examples (else random inputs of its
    input spec). ``model``: an instance to load the weights into.
    """
    manifest, eager = load_reference(store, ref, trust_pickle=trust_pickle, model=model)
    x = verification_inputs(store, manifest, inputs)
    if exporter not in DEFAULT_OPSET:
        raise ExportError(f"Unknown ONNX exporter {exporter!r}; use 'dynamo' or 'legacy'.")
    opset = opset or DEFAULT_OPSET[exporter]
    names = manifest.output_names or ["output"]
    with tempfile.TemporaryDirectory(prefix="torchship-export-") as tmp:
        path = Path(tmp) / ARTIFACT_FILE
        to_onnx(
            eager,
            example_for_export(x),
            path,
            exporter=exporter,
            opset=opset,
            input_names=["input"],
            output_names=names,
        )
        session = create_session(path, torch.device("cpu"))
        verification = verify_outputs(
            eager, onnx_runner(session), x, batch_sizes=batch_sizes, tolerance=tolerance
        )
        del session
        require_pass(manifest, f"ONNX ({exporter})", verification, hint=_MISMATCH_HINT)
        artifact = Artifact(
            format="onnx",
            file=ARTIFACT_FILE,
            method=exporter,
            options={"opset": opset, "dynamic_batch": True, "input_names": ["input"]},
            verification=verification,
        )
        return store_artifact(store, manifest, ARTIFACT_KEY, path, artifact)
