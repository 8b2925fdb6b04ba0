"""What every store-level export shares: load the reference, pick inputs, store on pass."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from torchship.errors import ExportError, ExportVerificationError, InvalidInputError
from torchship.runtime._inputs import fill_batch, sample_batch
from torchship.store import ModelStore
from torchship.store.manifest import Artifact, Manifest, Verification

EXAMPLE_BATCH = 8  # items used to trace / export with (the batch axis stays dynamic)


def load_reference(
    store: ModelStore, ref: str, *, trust_pickle: bool, model: nn.Module | None
) -> tuple[Manifest, nn.Module]:
    """Verify checksums, then load the eager model on the CPU in eval mode."""
    manifest = store.verify(ref)
    module = store.load(
        manifest.ref, device="cpu", trust_pickle=trust_pickle, model=model, verify=False
    )
    return manifest, module


def verification_inputs(
    store: ModelStore, manifest: Manifest, inputs: torch.Tensor | None
) -> torch.Tensor:
    """``inputs``, else the version's stored examples, else seeded random of the spec."""
    if inputs is not None:
        spec = manifest.input
        if spec is not None and tuple(inputs.shape[1:]) != tuple(spec.shape):
            raise InvalidInputError(
                f"inputs have shape {tuple(inputs.shape)}, but {manifest.ref} takes "
                f"(N, {', '.join(map(str, spec.shape))}).",
            )
        return inputs.detach().cpu()
    examples = store.load_examples(manifest.ref)
    if examples is not None and len(examples) > 0:
        return examples
    batch = sample_batch(manifest.input, None, 64, random=True)
    if batch is None:
        raise ExportError(
            f"{manifest.ref} has no stored examples and no input spec, so there is "
            "nothing to export and verify with.",
            hint="Pass inputs=<a batch of real inputs>, or save the model with "
            "examples=... / input_spec=....",
        )
    return batch


def example_for_export(inputs: torch.Tensor) -> torch.Tensor:
    """A few real items; at least 2 so exporters do not specialise the batch axis to 1."""
    return fill_batch(inputs, max(2, min(len(inputs), EXAMPLE_BATCH))).contiguous()


def require_pass(manifest: Manifest, fmt: str, verification: Verification, *, hint: str) -> None:
    if verification.passed:
        return
    raise ExportVerificationError(
        f"The {fmt} export of {manifest.ref} disagrees with the eager model: max abs "
        f"diff {verification.max_abs_diff:.3g} > tolerance {verification.tolerance:.3g} "
        f"(batch sizes {verification.batch_sizes}). Nothing was stored.",
        hint=hint,
        max_abs_diff=verification.max_abs_diff,
        tolerance=verification.tolerance,
    )


def store_artifact(
    store: ModelStore, manifest: Manifest, key: str, source: Path, artifact: Artifact
) -> Manifest:
    """Copy the verified file into the version and record it in the manifest."""

    def write(target: Path) -> None:
        shutil.copyfile(source, target)
        with target.open("rb") as fh:
            os.fsync(fh.fileno())

    return store.add_artifact(manifest.ref, key, write, artifact)
