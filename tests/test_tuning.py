"""Start-up measurements are remembered per model and machine, and never trusted blindly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchship.export import export_onnx
from torchship.runtime import load_predictor
from torchship.runtime.tuning import TuningCache
from torchship.serving import InferenceService, ServeSettings, TensorPayload
from torchship.serving.http import dumps
from torchship.store import ModelStore
from torchship.zoo import digits


@pytest.fixture
def tuned_store(
    tmp_path: Path, quick_mlp: torch.nn.Module, digits_data: digits.DigitsData
) -> ModelStore:
    store = ModelStore(tmp_path / "models")
    store.save(
        quick_mlp,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=digits_data.x_test[:16],
    )
    export_onnx(store, "digits")
    return store


def _start(store: ModelStore, **kw: object) -> InferenceService:
    settings = ServeSettings(store=store.root, models=["digits"], **kw)  # type: ignore[arg-type]
    return InferenceService(settings, store).start()


def test_second_start_reuses_runtime_race_and_batch_sizing(
    tuned_store: ModelStore, digits_data: digits.DigitsData
) -> None:
    first = _start(tuned_store)
    try:
        m1 = first.get("digits")
        assert m1.predictor.selection is not None and not m1.predictor.selection.cached
        assert m1.scaling is not None and not m1.scaling.cached
        x = digits_data.x_test[:3].numpy()
        expected = first.predict(TensorPayload(x)).predictions
    finally:
        first.stop()
    assert list((tuned_store.root / ".tuning" / "digits").glob("*.json"))
    assert tuned_store.names() == ["digits"]  # the cache is not a model

    second = _start(tuned_store)
    try:
        m2 = second.get("digits")
        assert m2.predictor.selection is not None and m2.predictor.selection.cached
        assert m2.predictor.runtime == m1.predictor.runtime
        assert m2.scaling is not None and m2.scaling.cached
        assert m2.batcher.max_batch_size == m1.batcher.max_batch_size
        assert "remembered" in str(m2.predictor.selection)
        assert m2.predictor.selection.single_ms == m1.predictor.selection.single_ms
        assert m2.info()["batch_scaling_remembered"] is True
        assert second.predict(TensorPayload(x)).predictions == expected
    finally:
        second.stop()

    third = _start(tuned_store, retune=True)  # asked to measure again: it does
    try:
        m3 = third.get("digits")
        assert m3.predictor.selection is not None and not m3.predictor.selection.cached
        assert m3.scaling is not None and not m3.scaling.cached
    finally:
        third.stop()


def test_a_damaged_or_foreign_entry_means_measuring_again(tuned_store: ModelStore) -> None:
    cache = TuningCache(tuned_store.root)
    load_predictor(tuned_store, "digits", tuning=cache).close()
    path = next((tuned_store.root / ".tuning" / "digits").glob("*.json"))

    data = json.loads(path.read_text())
    for entry in data["runtime"].values():
        entry["chosen"] = "tensorrt"  # a runtime that is not a candidate here
    path.write_text(json.dumps(data))
    p = load_predictor(tuned_store, "digits", tuning=cache)
    assert p.selection is not None and not p.selection.cached
    p.close()

    path.write_text("{not json")
    p = load_predictor(tuned_store, "digits", tuning=cache)
    assert p.selection is not None and not p.selection.cached
    p.close()
    assert json.loads(path.read_text())["runtime"]  # rewritten whole


def test_other_thread_counts_are_measured_separately(tuned_store: ModelStore) -> None:
    cache = TuningCache(tuned_store.root)
    load_predictor(tuned_store, "digits", threads=1, tuning=cache).close()
    p = load_predictor(tuned_store, "digits", threads=2, tuning=cache)
    assert p.selection is not None and not p.selection.cached
    p.close()
    p = load_predictor(tuned_store, "digits", threads=1, tuning=cache)
    assert p.selection is not None and p.selection.cached
    p.close()


def test_an_unwritable_cache_still_serves(tuned_store: ModelStore) -> None:
    (tuned_store.root / ".tuning").write_text("in the way")  # mkdir fails, even as root
    service = _start(tuned_store)
    try:
        assert service.readiness()[0]
        assert service.get("digits").predictor.selection is not None
    finally:
        service.stop()


def test_batch_sizes_over_the_latency_budget_are_never_chosen_and_not_timed_again(
    tuned_store: ModelStore,
) -> None:
    # A budget no batch of 2 can meet: sizing stops there, remembers why, serves batch 1.
    for start in range(2):
        service = _start(tuned_store, max_batch_ms=1e-6)
        try:
            loaded = service.get("digits")
            assert loaded.scaling is not None and loaded.scaling.cached is bool(start)
            assert [m.batch_size for m in loaded.scaling.measurements] == [1]
            assert loaded.batcher.max_batch_size == 1
            info = json.loads(dumps(loaded.info()))  # what /models sends, on either front end
            assert "over the 1e-06 ms budget" in info["batch_scaling_not_timed"]["2"]
        finally:
            service.stop()
    service = _start(tuned_store)  # another budget is another measurement
    try:
        loaded = service.get("digits")
        assert loaded.scaling is not None and not loaded.scaling.cached
        assert loaded.batcher.max_batch_size > 1
    finally:
        service.stop()
