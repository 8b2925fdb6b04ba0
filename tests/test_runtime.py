"""Predictors: every runtime agrees with eager; auto measures; integrity before loading."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from torchship.errors import (
    ArtifactNotFoundError,
    ConfigError,
    IntegrityError,
    InvalidInputError,
)
from torchship.export import export_onnx, export_torchscript
from torchship.runtime import (
    EagerPredictor,
    OnnxPredictor,
    Predictor,
    TorchScriptPredictor,
    load_predictor,
    set_threads,
)
from torchship.runtime import loader as loader_module
from torchship.store import ModelStore
from torchship.zoo import digits

REF = "digits:1"


@pytest.fixture(scope="module")
def data() -> digits.DigitsData:
    return digits.load_digits_split()


@pytest.fixture(scope="module")
def model(data: digits.DigitsData) -> torch.nn.Module:
    """A digits CNN trained for one epoch on 400 images: real weights in ~1 s."""
    small = digits.DigitsData(
        data.x_train[:400], data.y_train[:400], data.x_test, data.y_test, data.raw_test
    )
    return digits.train("cnn", epochs=1, data=small).model


def save(store: ModelStore, model: torch.nn.Module, data: digits.DigitsData) -> str:
    return store.save(
        model,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=data.x_test[:32],
    ).ref


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, model: torch.nn.Module, data: digits.DigitsData
) -> ModelStore:
    """One version with all three runtimes: weights, TorchScript (trace), ONNX (dynamo)."""
    store = ModelStore(tmp_path_factory.mktemp("exported") / "models")
    ref = save(store, model, data)
    export_torchscript(store, ref, method="trace")
    export_onnx(store, ref, exporter="dynamo")
    return store


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("runtime", "cls", "name"),
    [
        ("eager", EagerPredictor, "eager"),
        ("torchscript", TorchScriptPredictor, "torchscript"),
        ("onnx", OnnxPredictor, "onnxruntime"),
    ],
)
def test_each_runtime_matches_eager(
    exported: ModelStore,
    model: torch.nn.Module,
    data: digits.DigitsData,
    runtime: str,
    cls: type[Predictor],
    name: str,
) -> None:
    predictor = load_predictor(exported, REF, runtime=runtime, device="cpu")  # type: ignore[arg-type]
    assert isinstance(predictor, cls)
    assert (predictor.name, predictor.version, predictor.runtime) == ("digits", "1", name)
    assert predictor.device == torch.device("cpu")
    assert predictor.labels == digits.LABELS
    assert predictor.input_spec == digits.input_spec()
    assert predictor.selection is None
    x = data.x_test[:40]
    out = predictor.predict(x)
    assert out.device.type == "cpu" and out.shape == (40, 10)
    with torch.inference_mode():
        torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
    predictor.warmup(batch_sizes=(1, 3))
    predictor.close()
    with pytest.raises(RuntimeError, match="closed"):
        predictor.predict(x)


def test_store_path_is_accepted(exported: ModelStore) -> None:
    with load_predictor(str(exported.root), "digits", runtime="eager") as predictor:
        assert predictor.version == "1"


def test_auto_picks_a_verified_runtime_and_reports_timings(
    exported: ModelStore, data: digits.DigitsData, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="torchship.runtime"):
        predictor = load_predictor(exported, "digits", runtime="auto", device="cpu")
    selection = predictor.selection
    assert selection is not None
    assert set(selection.timings_ms) == {"eager", "torchscript", "onnxruntime"}
    assert all(ms > 0 for ms in selection.timings_ms.values())
    assert selection.chosen == predictor.runtime
    assert selection.batch_size == 8
    # Timed alone and in a full batch: the pick is best on both together.
    assert set(selection.single_ms) == set(selection.timings_ms)
    assert all(ms > 0 for ms in selection.single_ms.values())
    scores = {name: selection.score(name) for name in selection.timings_ms}
    assert scores[selection.chosen] == min(scores.values())
    assert f"runtime auto picked {selection.chosen} (batch 1/8)" in caplog.text
    assert predictor.predict(data.x_test[:3]).shape == (3, 10)


def test_auto_skips_artifacts_that_failed_verification(
    tmp_path: Path, exported: ModelStore
) -> None:
    import shutil

    store = ModelStore(tmp_path / "models")
    shutil.copytree(exported.root, store.root)

    def fail_onnx(manifest):  # type: ignore[no-untyped-def]
        verification = manifest.artifacts["onnx"].verification
        verification.passed = False

    store.update_manifest(REF, fail_onnx)
    predictor = load_predictor(store, REF, runtime="auto")
    assert predictor.selection is not None
    assert set(predictor.selection.timings_ms) == {"eager", "torchscript"}


def test_auto_with_only_weights_uses_eager(
    store: ModelStore, model: torch.nn.Module, data: digits.DigitsData
) -> None:
    save(store, model, data)
    predictor = load_predictor(store, "digits")
    assert predictor.runtime == "eager"
    assert predictor.selection is not None and predictor.selection.chosen == "eager"


@pytest.mark.parametrize(
    ("runtime", "fix"), [("onnx", "export_onnx"), ("torchscript", "export_torchscript")]
)
def test_missing_artifact_says_how_to_export(
    store: ModelStore, model: torch.nn.Module, data: digits.DigitsData, runtime: str, fix: str
) -> None:
    save(store, model, data)
    with pytest.raises(ArtifactNotFoundError) as info:
        load_predictor(store, "digits", runtime=runtime)  # type: ignore[arg-type]
    assert fix in str(info.value)


def test_tampered_onnx_fails_before_loading(
    tmp_path: Path,
    exported: ModelStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    store = ModelStore(tmp_path / "models")
    shutil.copytree(exported.root, store.root)
    path = store.artifact_path(REF, "onnx")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tampered file was opened")

    monkeypatch.setattr(loader_module.OnnxPredictor, "from_store", must_not_load)
    for runtime in ("onnx", "auto"):
        with pytest.raises(IntegrityError, match="model.onnx"):
            load_predictor(store, REF, runtime=runtime)  # type: ignore[arg-type]


def test_threads_are_honoured(exported: ModelStore) -> None:
    predictor = load_predictor(exported, REF, runtime="onnx", threads=1)
    assert torch.get_num_threads() == 1
    options = predictor.session.get_session_options()  # type: ignore[attr-defined]
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert predictor.threads == 1

    load_predictor(exported, REF, runtime="eager", threads=2)
    assert torch.get_num_threads() == 2


def test_default_threads_follow_torch(exported: ModelStore) -> None:
    set_threads(1)
    predictor = load_predictor(exported, REF, runtime="onnx")
    assert predictor.session.get_session_options().intra_op_num_threads == 1  # type: ignore[attr-defined]
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_counts_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError):
        set_threads(bad)  # type: ignore[arg-type]


def test_unknown_runtime_is_refused(exported: ModelStore) -> None:
    with pytest.raises(ConfigError, match="Unknown runtime"):
        load_predictor(exported, REF, runtime="tensorrt")  # type: ignore[arg-type]


def test_predict_checks_its_input(exported: ModelStore) -> None:
    predictor = load_predictor(exported, REF, runtime="eager", warmup=False)
    with pytest.raises(InvalidInputError, match=r"\(N, 1, 8, 8\)"):
        predictor.predict(torch.zeros(1, 8, 8))
    with pytest.raises(InvalidInputError, match="float"):
        predictor.predict(torch.zeros(2, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(InvalidInputError):
        predictor.predict([[0.0]])  # type: ignore[arg-type]


def test_warmup_without_examples_uses_zeros(store: ModelStore, model: torch.nn.Module) -> None:
    store.save(model, "plain", input_spec=digits.input_spec())
    predictor = load_predictor(store, "plain", runtime="eager")
    predictor.warmup(batch_sizes=(1, 4))
    assert predictor.sample_batch(4) is not None
    assert float(predictor.sample_batch(4).abs().sum()) == 0.0  # type: ignore[union-attr]


def test_pickled_model_in_auto_needs_trust_for_eager(
    store: ModelStore, model: torch.nn.Module, data: digits.DigitsData
) -> None:
    store.save(model, "pickled", format="whole", examples=data.x_test[:8])
    export_torchscript(store, "pickled", trust_pickle=True)
    predictor = load_predictor(store, "pickled")  # no trust: eager is not a candidate
    assert predictor.runtime == "torchscript"
    trusted = load_predictor(store, "pickled", trust_pickle=True)
    assert trusted.selection is not None
    assert set(trusted.selection.timings_ms) == {"torchscript", "eager"}
