"""``load_predictor``: from a store reference to a ready-to-serve ``Predictor``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

from torchship.devices import resolve_device
from torchship.errors import ArtifactNotFoundError, ConfigError
from torchship.runtime.base import Predictor, Selection
from torchship.runtime.eager import EagerPredictor
from torchship.runtime.ort import OnnxPredictor
from torchship.runtime.select import BATCH_SIZE, pick_fastest
from torchship.runtime.threads import set_threads
from torchship.runtime.torchscript import TorchScriptPredictor
from torchship.runtime.tuning import TuningCache, tuning_key
from torchship.store import ModelStore
from torchship.store.manifest import Manifest

RuntimeChoice = Literal["auto", "eager", "torchscript", "onnx", "onnxruntime"]

logger = logging.getLogger(__name__)

# store artifact key -> how to export it when missing
_EXPORT_HINTS = {
    "torchscript": "torchship.export.export_torchscript(store, {ref!r})",
    "onnx": "torchship.export.export_onnx(store, {ref!r})",
}


def load_predictor(
    store: ModelStore | str | Path,
    ref: str,
    *,
    runtime: RuntimeChoice = "auto",
    device: str | torch.device = "auto",
    threads: int | None = None,
    trust_pickle: bool = False,
    warmup: bool = True,
    tuning: TuningCache | None = None,
) -> Predictor:
    """Load ``ref`` (``"name"``, ``"name:3"``, ``"name:production"``) for inference.

    Every file of the version is checked against its recorded sha256 first; nothing is
    deserialised from a file that fails (``IntegrityError``).

    ``runtime``: ``"eager"``, ``"torchscript"`` or ``"onnx"`` (alias ``"onnxruntime"``)
    load that artifact (``ArtifactNotFoundError`` if it was never exported);
    ``"auto"`` times eager and every artifact whose export verification passed, on
    this machine, and keeps the fastest (see ``predictor.selection``).

    ``threads``: when given, torch's thread pools are set to it (process-wide) and
    ONNX Runtime sessions use the same; ``None`` leaves torch as it is and gives ONNX
    Runtime torch's current count. See :mod:`torchship.runtime.threads`.
    """
    if not isinstance(store, ModelStore):
        store = ModelStore(store)
    if runtime not in ("auto", "eager", "torchscript", "onnx", "onnxruntime"):
        raise ConfigError(
            f"Unknown runtime {runtime!r}.",
            hint="Use 'auto', 'eager', 'torchscript' or 'onnx'.",
        )
    dev = resolve_device(device)
    if threads is not None:
        set_threads(threads)
    manifest = store.verify(ref)  # pin the version: an alias may move while we load
    examples = store.load_examples(manifest.ref)

    if runtime == "auto":
        predictor = _load_auto(store, manifest, dev, threads, trust_pickle, examples, tuning)
        sel = predictor.selection
        if warmup and sel is not None and (sel.cached or not sel.timings_ms):
            predictor.warmup()  # not timed here (remembered, or a lone candidate)
        return predictor
    key = "onnx" if runtime in ("onnx", "onnxruntime") else runtime
    predictor = _load_one(store, manifest, key, dev, threads, trust_pickle, examples)
    if warmup:
        predictor.warmup()
    return predictor


def verified_artifacts(manifest: Manifest) -> list[str]:
    """Keys of exported artifacts whose verification against eager passed."""
    return [
        key
        for key in ("torchscript", "onnx")
        if key in manifest.artifacts
        and (v := manifest.artifacts[key].verification) is not None
        and v.passed
    ]


def _load_one(
    store: ModelStore,
    manifest: Manifest,
    key: str,
    device: torch.device,
    threads: int | None,
    trust_pickle: bool,
    examples: torch.Tensor | None,
) -> Predictor:
    if key == "eager":
        return EagerPredictor.from_store(
            store, manifest, device, trust_pickle=trust_pickle, examples=examples, threads=threads
        )
    if key not in manifest.artifacts:
        raise ArtifactNotFoundError(
            f"{manifest.ref} has no {key!r} artifact (it has: {', '.join(manifest.artifacts)}).",
            hint=f"Export it first: {_EXPORT_HINTS[key].format(ref=manifest.ref)}, "
            "or use runtime='eager' / 'auto'.",
        )
    if key == "torchscript":
        return TorchScriptPredictor.from_store(
            store, manifest, device, examples=examples, threads=threads
        )
    return OnnxPredictor.from_store(store, manifest, device, examples=examples, threads=threads)


def _load_auto(
    store: ModelStore,
    manifest: Manifest,
    device: torch.device,
    threads: int | None,
    trust_pickle: bool,
    examples: torch.Tensor | None,
    tuning: TuningCache | None = None,
) -> Predictor:
    keys = verified_artifacts(manifest)
    if manifest.weights.format != "pickle" or trust_pickle or not keys:
        keys.append("eager")
    else:
        logger.info(
            "runtime auto: %s is a pickle and trust_pickle is off; eager not tried", manifest.ref
        )
    cache_key = tuning_key(
        manifest, device=str(device), threads=threads, candidates=keys, sizes=[1, BATCH_SIZE]
    )
    remembered = tuning.get(manifest, "runtime", cache_key) if tuning else None
    if remembered and len(keys) > 1:
        key = {"onnxruntime": "onnx"}.get(str(remembered.get("chosen")), remembered.get("chosen"))
        if key in keys:
            one = _load_one(store, manifest, str(key), device, threads, trust_pickle, examples)
            one.selection = Selection(
                one.runtime,
                {str(k): float(v) for k, v in dict(remembered.get("timings_ms", {})).items()},
                int(remembered.get("batch_size", BATCH_SIZE)),
                cached=True,
                single_ms={
                    str(k): float(v) for k, v in dict(remembered.get("single_ms", {})).items()
                },
            )
            logger.info("%s", one.selection)
            return one
    candidates = [
        _load_one(store, manifest, key, device, threads, trust_pickle, examples) for key in keys
    ]
    batch = candidates[0].sample_batch(BATCH_SIZE)
    try:
        chosen, selection = pick_fastest(candidates, batch)
    except BaseException:
        for c in candidates:
            c.close()
        raise
    for c in candidates:
        if c is not chosen:
            c.close()
    chosen.selection = selection
    if tuning is not None and selection.timings_ms:
        tuning.put(
            manifest,
            "runtime",
            cache_key,
            {
                "chosen": selection.chosen,
                "timings_ms": selection.timings_ms,
                "batch_size": selection.batch_size,
                "single_ms": selection.single_ms,
            },
        )
    return chosen
