"""TorchScript export: ``trace`` records one run, ``script`` compiles the Python code.

Tracing works for any model whose computation does not depend on the data; an ``if``
on a tensor's value is frozen to the branch the example took (the tracer only warns).
Scripting keeps control flow but accepts only the TorchScript subset of Python.
Either way :func:`export_torchscript` verifies the result against eager before storing.

``freeze`` inlines weights and attributes as constants (faster, smaller graph).
``optimize`` runs ``torch.jit.optimize_for_inference``, which specialises the graph to
the machine it runs on (on CPU: oneDNN/MKLDNN layouts, conv+batchnorm folding). Such a
graph cannot be saved and reloaded, so the stored file is the frozen module and the
optimisation is applied when it is loaded (the artifact records ``optimize: true``).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.jit._trace import TracerWarning

from torchship.errors import ExportError
from torchship.export._store import (
    example_for_export,
    load_reference,
    require_pass,
    store_artifact,
    verification_inputs,
)
from torchship.export.verify import verify_outputs
from torchship.runtime.torchscript import load_torchscript
from torchship.store import ModelStore
from torchship.store.manifest import Artifact, Manifest

TorchScriptMethod = Literal["trace", "script"]
ARTIFACT_KEY = "torchscript"
ARTIFACT_FILE = "model.ts"

logger = logging.getLogger(__name__)

_MISMATCH_HINT = (
    "A trace records one path through the code: data-dependent if/for need "
    "method='script'. If the difference is float noise, raise tolerance."
)


def to_torchscript(
    model: nn.Module,
    example: torch.Tensor,
    method: TorchScriptMethod = "trace",
    freeze: bool = True,
    optimize: bool = True,
) -> torch.jit.ScriptModule:
    """Convert ``model`` (in eval mode) to TorchScript; see the module docstring.

    ``optimize`` implies freezing. The result is for this process; to save a module,
    pass ``optimize=False`` and optimise after loading
    (:func:`torchship.runtime.load_torchscript` with ``optimize=True``).
    """
    if method not in ("trace", "script"):
        raise ExportError(f"Unknown TorchScript method {method!r}; use 'trace' or 'script'.")
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TracerWarning)
            try:
                if method == "trace":
                    with torch.no_grad():
                        module = torch.jit.trace(model, example)
                else:
                    module = torch.jit.script(model)
            except Exception as exc:  # torch.jit raises many types (frontend, runtime, ...)
                raise ExportError(
                    f"torch.jit.{method} failed for {type(model).__name__}: {exc}",
                    hint="Models with data-dependent control flow need method='script'; "
                    "code outside the TorchScript subset needs method='trace' "
                    "(verification will tell whether the trace is faithful).",
                ) from exc
        seen: set[str] = set()
        for w in caught:
            if not issubclass(w.category, TracerWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif str(w.message) not in seen:  # the tracer's check run repeats each one
                seen.add(str(w.message))
                logger.warning("torch.jit.trace: %s (verification will tell)", w.message)
        if freeze or optimize:
            module = torch.jit.freeze(module.eval())
        if optimize:
            module = torch.jit.optimize_for_inference(module)
        return module
    finally:
        model.train(was_training)


def export_torchscript(
    store: ModelStore,
    ref: str,
    *,
    method: TorchScriptMethod = "trace",
    freeze: bool = True,
    optimize: bool = True,
    tolerance: float = 1e-4,
    batch_sizes: Sequence[int] = (1, 8, 32),
    inputs: torch.Tensor | None = None,
    trust_pickle: bool = False,
    model: nn.Module | None = None,
) -> Manifest:
    """Export ``ref`` to TorchScript, verify it against eager, and store it if it passes.

    Verification runs the file as it will be served: saved, reloaded, optimised. On a
    mismatch ``ExportVerificationError`` is raised and nothing is stored. ``inputs``
    defaults to the version's stored examples (else random inputs of its input spec).
    ``model``: an instance to load the weights into, for architectures not importable.
    """
    manifest, eager = load_reference(store, ref, trust_pickle=trust_pickle, model=model)
    x = verification_inputs(store, manifest, inputs)
    module = to_torchscript(eager, example_for_export(x), method, freeze=freeze, optimize=False)
    with tempfile.TemporaryDirectory(prefix="torchship-export-") as tmp:
        path = Path(tmp) / ARTIFACT_FILE
        torch.jit.save(module, str(path))
        loaded = load_torchscript(path, torch.device("cpu"), optimize=optimize)
        verification = verify_outputs(
            eager, loaded, x, batch_sizes=batch_sizes, tolerance=tolerance
        )
        require_pass(manifest, f"TorchScript ({method})", verification, hint=_MISMATCH_HINT)
        artifact = Artifact(
            format="torchscript",
            file=ARTIFACT_FILE,
            method=method,
            options={"freeze": freeze or optimize, "optimize": optimize},
            verification=verification,
        )
        return store_artifact(store, manifest, ARTIFACT_KEY, path, artifact)
