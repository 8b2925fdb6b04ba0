"""The default model: a digits classifier trained, stored and exported in one call."""

from __future__ import annotations

import logging

from torchship.store import Manifest, ModelStore
from torchship.store.stages import promote
from torchship.store.store import DEFAULT_ALIAS
from torchship.zoo import digits

log = logging.getLogger(__name__)

N_EXAMPLES = 64


def train_demo(
    store: ModelStore,
    name: str = "digits",
    *,
    arch: str = "cnn",
    epochs: int | None = None,
    export: bool = True,
    alias: str | None = "production",
    log_epochs: bool = False,
) -> Manifest:
    """Train a digits model, save it with its test accuracy and real examples, export it.

    The TorchScript and ONNX exports are verified against the eager model before they
    are stored, so ``runtime="auto"`` can choose among them when serving.
    """
    data = digits.load_digits_split()
    kwargs = {} if epochs is None else {"epochs": epochs}
    result = digits.train(arch, data=data, log=log_epochs, **kwargs)
    manifest = store.save(
        result.model,
        name,
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        metrics={"test_accuracy": result.test_accuracy, "train_seconds": result.seconds},
        examples=data.x_test[:N_EXAMPLES],
        description=f"Digits {arch.upper()} trained on scikit-learn's bundled 8x8 digits.",
    )
    if alias == DEFAULT_ALIAS:
        promote(store, name, manifest.version, reason=f"train-demo ({arch})")
    elif alias:
        store.set_alias(name, alias, manifest.version)
    log.info("saved %s (test accuracy %.4f)", manifest.ref, result.test_accuracy)
    if export:
        from torchship.export import export_onnx, export_torchscript

        export_torchscript(store, manifest.ref, method="trace")
        manifest = export_onnx(store, manifest.ref)
    return manifest


def ensure_default_model(store: ModelStore | str, name: str = "digits") -> Manifest:
    """The latest ``name`` in the store, training the demo model first if there is none."""
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    if not store.versions(name):
        log.warning("no %r model in %s yet: training it (a few seconds)", name, store.root)
        return train_demo(store, name)
    return store.latest(name)
