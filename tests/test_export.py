"""Export to TorchScript and ONNX: verified against eager, stored only when it passes."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from torchship.errors import (
    ConfigError,
    ExportError,
    ExportVerificationError,
    UntrustedPickleError,
)
from torchship.export import (
    export_onnx,
    export_torchscript,
    to_onnx,
    to_torchscript,
    verify_outputs,
)
from torchship.export import torchscript as ts_module
from torchship.export import verify as verify_module
from torchship.runtime import create_session
from torchship.store import ModelStore
from torchship.zoo import digits


@pytest.fixture(scope="module")
def small_data() -> digits.DigitsData:
    full = digits.load_digits_split()
    return digits.DigitsData(
        full.x_train[:400], full.y_train[:400], full.x_test, full.y_test, full.raw_test
    )


@pytest.fixture(scope="module")
def cnn(small_data: digits.DigitsData) -> torch.nn.Module:
    """A digits CNN trained for one epoch on 400 images: real weights in ~1 s."""
    return digits.train("cnn", epochs=1, data=small_data).model


@pytest.fixture(scope="module")
def mlp(small_data: digits.DigitsData) -> torch.nn.Module:
    return digits.train("mlp", epochs=1, data=small_data).model


def save(
    store: ModelStore, model: torch.nn.Module, data: digits.DigitsData, name: str = "digits"
) -> str:
    manifest = store.save(
        model,
        name,
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=data.x_test[:48],
    )
    return manifest.ref


def artifact_files(store: ModelStore, ref: str) -> set[str]:
    m = store.manifest(ref)
    return {p.name for p in store.path(m.name, m.version).iterdir()}


# --- verify_outputs --------------------------------------------------------------


def test_verify_outputs_identical_models_pass(cnn: torch.nn.Module) -> None:
    x = torch.randn(5, 1, 8, 8)
    v = verify_outputs(cnn, cnn, x, batch_sizes=(1, 8, 32))
    assert v.passed
    assert v.max_abs_diff == 0.0
    assert v.batch_sizes == [1, 8, 32]  # 8 and 32 filled by cycling the 5 inputs
    assert v.latency_ms > 0 and v.reference_latency_ms > 0


def test_verify_outputs_detects_a_different_candidate(cnn: torch.nn.Module) -> None:
    x = torch.randn(4, 1, 8, 8)
    v = verify_outputs(cnn, lambda b: cnn(b) + 0.01, x, tolerance=1e-4)
    assert not v.passed
    assert v.max_abs_diff == pytest.approx(0.01, rel=1e-3)


def test_verify_outputs_tolerance_scales_with_output_magnitude() -> None:
    x = torch.randn(4, 3)

    def big(b: torch.Tensor) -> torch.Tensor:
        return b * 1e4

    def big_noisy(b: torch.Tensor) -> torch.Tensor:
        return b * 1e4 + 0.01

    assert verify_outputs(big, big_noisy, x, tolerance=1e-4).passed
    strict = verify_outputs(big, big_noisy, x, tolerance=1e-4, rtol=0.0)
    assert not strict.passed
    assert strict.tolerance == pytest.approx(1e-4)


def test_verify_outputs_wrong_shape_raises(cnn: torch.nn.Module) -> None:
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ExportVerificationError, match="batch size 8"):
        verify_outputs(cnn, lambda b: cnn(b[:1]), x, batch_sizes=(1, 8))


def test_verify_outputs_candidate_crash_raises(cnn: torch.nn.Module) -> None:
    def broken(b: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(ExportVerificationError, match="boom"):
        verify_outputs(cnn, broken, torch.randn(2, 1, 8, 8))


# --- TorchScript -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["trace", "script"])
@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_export_torchscript_verified_and_stored(
    store: ModelStore,
    small_data: digits.DigitsData,
    cnn: torch.nn.Module,
    mlp: torch.nn.Module,
    method: str,
    arch: str,
) -> None:
    model = cnn if arch == "cnn" else mlp
    ref = save(store, model, small_data)
    manifest = export_torchscript(store, ref, method=method)  # type: ignore[arg-type]

    artifact = manifest.artifacts["torchscript"]
    assert (artifact.format, artifact.file, artifact.method) == ("torchscript", "model.ts", method)
    assert artifact.options == {"freeze": True, "optimize": True}
    v = artifact.verification
    assert v is not None and v.passed
    assert v.max_abs_diff <= v.tolerance
    assert v.batch_sizes == [1, 8, 32]
    assert v.latency_ms > 0 and v.reference_latency_ms > 0
    assert store.manifest(ref).artifacts["torchscript"] == artifact  # persisted
    store.verify(ref)  # the new file is checksummed

    loaded = torch.jit.load(str(store.artifact_path(ref, "torchscript")))
    x = small_data.x_test[:7]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-4)


def test_to_torchscript_returns_frozen_optimized_module(cnn: torch.nn.Module) -> None:
    x = torch.randn(3, 1, 8, 8)
    module = to_torchscript(cnn, x, "trace", freeze=True, optimize=True)
    assert isinstance(module, torch.jit.ScriptModule)
    assert cnn.training is False
    with torch.inference_mode():
        torch.testing.assert_close(module(x), cnn(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ExportError, match="Unknown TorchScript method"):
        to_torchscript(cnn, x, "compile")  # type: ignore[arg-type]


def test_failed_verification_stores_nothing(
    store: ModelStore,
    small_data: digits.DigitsData,
    mlp: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A candidate that differs from eager: error names diff and tolerance; no trace left."""
    ref = save(store, mlp, small_data)
    before_files = artifact_files(store, ref)
    before = store.manifest(ref)
    real = verify_module.verify_outputs

    def off_by_one(reference, candidate, inputs, **kw):  # type: ignore[no-untyped-def]
        return real(reference, lambda b: candidate(b) + 1.0, inputs, **kw)

    monkeypatch.setattr(ts_module, "verify_outputs", off_by_one)
    with pytest.raises(ExportVerificationError) as info:
        export_torchscript(store, ref, method="trace")
    assert "max abs diff 1" in str(info.value)
    assert "tolerance" in str(info.value)
    assert info.value.details["max_abs_diff"] == pytest.approx(1.0, abs=1e-4)
    assert artifact_files(store, ref) == before_files
    assert store.manifest(ref) == before


def test_export_without_examples_uses_input_spec(store: ModelStore, mlp: torch.nn.Module) -> None:
    store.save(mlp, "noex", input_spec=digits.input_spec())
    v = export_torchscript(store, "noex", method="script").artifacts["torchscript"].verification
    assert v is not None and v.passed


def test_export_needs_something_to_verify_with(store: ModelStore, mlp: torch.nn.Module) -> None:
    store.save(mlp, "blind")
    with pytest.raises(ExportError, match="nothing to export and verify with"):
        export_torchscript(store, "blind")
    manifest = export_torchscript(store, "blind", inputs=torch.randn(10, 1, 8, 8))
    assert manifest.artifacts["torchscript"].verification is not None


def test_whole_pickle_export_needs_trust(
    store: ModelStore, small_data: digits.DigitsData, mlp: torch.nn.Module
) -> None:
    store.save(mlp, "pickled", format="whole", examples=small_data.x_test[:16])
    with pytest.raises(UntrustedPickleError):
        export_torchscript(store, "pickled")
    manifest = export_torchscript(store, "pickled", trust_pickle=True)
    assert "torchscript" in manifest.artifacts


def test_negative_tolerance_is_refused(store: ModelStore, small_data, mlp) -> None:  # type: ignore[no-untyped-def]
    ref = save(store, mlp, small_data)
    with pytest.raises(ConfigError):
        export_torchscript(store, ref, tolerance=-1.0)


# --- ONNX ------------------------------------------------------------------------


@pytest.mark.parametrize(("exporter", "opset"), [("dynamo", 18), ("legacy", 17)])
def test_export_onnx_verified_stored_and_dynamic(
    store: ModelStore,
    small_data: digits.DigitsData,
    cnn: torch.nn.Module,
    exporter: str,
    opset: int,
) -> None:
    ref = save(store, cnn, small_data)
    manifest = export_onnx(store, ref, exporter=exporter)  # type: ignore[arg-type]

    artifact = manifest.artifacts["onnx"]
    assert (artifact.format, artifact.file, artifact.method) == ("onnx", "model.onnx", exporter)
    assert artifact.options["opset"] == opset
    v = artifact.verification
    assert v is not None and v.passed and v.max_abs_diff <= v.tolerance
    store.verify(ref)

    path = store.artifact_path(ref, "onnx")
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix == ".data") == []
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    assert [i.name for i in proto.graph.input] == ["input"]

    session = create_session(path, torch.device("cpu"), threads=1)
    with torch.inference_mode():
        for n in (1, 7, 32):
            x = small_data.x_test[:n]
            (out,) = session.run(None, {"input": x.numpy()})
            assert out.shape == (n, 10)
            torch.testing.assert_close(torch.from_numpy(out), cnn(x), atol=1e-4, rtol=1e-4)


def test_onnx_dynamo_export_is_quiet(
    tmp_path: Path, mlp: torch.nn.Module, capfd: pytest.CaptureFixture[str]
) -> None:
    to_onnx(mlp, torch.randn(4, 1, 8, 8), tmp_path / "m.onnx", exporter="dynamo")
    out, err = capfd.readouterr()
    assert out == ""
    assert "torchvision" not in err and "Warning" not in err


def test_unknown_exporter_is_refused(tmp_path: Path, mlp: torch.nn.Module) -> None:
    with pytest.raises(ExportError, match="Unknown ONNX exporter"):
        to_onnx(mlp, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx", exporter="tf")  # type: ignore[arg-type]


# --- data-dependent control flow ---------------------------------------------------


@pytest.fixture
def control_flow_ref(store: ModelStore) -> str:
    """ControlFlowNet with stored examples that take both branches and several loop counts."""
    from torchship.zoo.control_flow import ControlFlowNet, control_flow_input_spec

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    magnitude = torch.rand(32, 1, generator=generator) * 3 + 0.2  # loop runs 1..4 times
    sign = torch.tensor([1.0, -1.0]).repeat(16)[:, None]  # item sums alternate in sign
    examples = torch.rand(32, 8, generator=generator) * magnitude * sign
    return store.save(
        ControlFlowNet(), "branchy", input_spec=control_flow_input_spec(), examples=examples
    ).ref


def test_control_flow_trace_fails_verification_and_stores_nothing(
    store: ModelStore, control_flow_ref: str
) -> None:
    before = store.manifest(control_flow_ref)
    with pytest.raises(ExportVerificationError, match="TorchScript \\(trace\\)") as info:
        export_torchscript(store, control_flow_ref, method="trace")
    assert info.value.details["max_abs_diff"] > info.value.details["tolerance"]
    assert "method='script'" in str(info.value)
    assert store.manifest(control_flow_ref) == before
    assert "model.ts" not in artifact_files(store, control_flow_ref)


def test_control_flow_script_passes(store: ModelStore, control_flow_ref: str) -> None:
    manifest = export_torchscript(store, control_flow_ref, method="script")
    v = manifest.artifacts["torchscript"].verification
    assert v is not None and v.passed and v.max_abs_diff <= v.tolerance


def test_control_flow_onnx_legacy_fails_verification(
    store: ModelStore, control_flow_ref: str
) -> None:
    with pytest.raises(ExportVerificationError, match="ONNX \\(legacy\\)"):
        export_onnx(store, control_flow_ref, exporter="legacy")
    assert "onnx" not in store.manifest(control_flow_ref).artifacts
    assert "model.onnx" not in artifact_files(store, control_flow_ref)


def test_control_flow_onnx_dynamo_refuses_with_a_short_message(
    store: ModelStore, control_flow_ref: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ExportError, match="data-dependent") as info:
        export_onnx(store, control_flow_ref, exporter="dynamo")
    assert not isinstance(info.value, ExportVerificationError)
    assert "\x1b[" not in str(info.value)  # no terminal colour codes
    assert "onnx" not in store.manifest(control_flow_ref).artifacts
    out, err = capfd.readouterr()
    assert out == "" and "def forward" not in err
