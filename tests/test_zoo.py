"""Reference models: digits training quality, ResNet-18's shape, control flow vs. tracing."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from torchship.zoo import ControlFlowNet, DigitsCNN, DigitsMLP, ResNet18, digits
from torchship.zoo.control_flow import control_flow_input_spec
from torchship.zoo.resnet import resnet_input_spec


@pytest.fixture(scope="module")
def trained(digits_data: digits.DigitsData) -> dict[str, digits.TrainResult]:
    """Both digits models, trained once with the default (tuned) settings."""
    return {arch: digits.train(arch, data=digits_data) for arch in ("cnn", "mlp")}


# --- digits -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_digits_models_reach_97_percent(
    trained: dict[str, digits.TrainResult], digits_data: digits.DigitsData, arch: str
) -> None:
    result = trained[arch]
    print(f"{arch}: test accuracy {result.test_accuracy:.4f} in {result.seconds:.1f} s")
    assert result.test_accuracy >= 0.97
    assert result.test_accuracy == digits.accuracy(
        result.model, digits_data.x_test, digits_data.y_test
    )
    assert not result.model.training


def test_digits_models_rebuild_from_init_kwargs(trained: dict[str, digits.TrainResult]) -> None:
    for result, cls in ((trained["cnn"], DigitsCNN), (trained["mlp"], DigitsMLP)):
        model = result.model
        assert isinstance(model, cls)
        clone = cls(**model.init_kwargs)
        clone.load_state_dict(model.state_dict())
        clone.eval()
        x = torch.randn(3, 1, 8, 8)
        torch.testing.assert_close(clone(x), model(x))


def test_training_is_deterministic_and_restores_threads(digits_data: digits.DigitsData) -> None:
    threads = torch.get_num_threads()
    first = digits.train("mlp", epochs=2, data=digits_data, threads=1).model.state_dict()
    second = digits.train("mlp", epochs=2, data=digits_data, threads=1).model.state_dict()
    assert torch.get_num_threads() == threads
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_random_affine_keeps_shape_and_background(digits_data: digits.DigitsData) -> None:
    x = digits_data.x_train[:32]
    out = digits.random_affine(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    background = -digits.MEAN / digits.STD
    assert out.min() >= background - 1e-4
    assert out.amax(dim=(1, 2, 3)).sub((1 - digits.MEAN) / digits.STD).abs().max() < 1e-4
    blank = torch.full((2, 1, 8, 8), background)
    torch.testing.assert_close(digits.random_affine(blank, torch.Generator()), blank)


def test_unknown_arch_is_rejected() -> None:
    with pytest.raises(ValueError, match="'cnn' or 'mlp'"):
        digits.build("transformer")


# --- ResNet-18 --------------------------------------------------------------------------


def test_resnet18_output_shape_and_size() -> None:
    torch.manual_seed(0)
    model = ResNet18().eval()
    assert model.init_kwargs == {"num_classes": 1000, "width": 64}
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # as torchvision's
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    spec = resnet_input_spec()
    assert spec.shape == [3, 224, 224] and spec.fit == "center_crop" and spec.color == "RGB"
    assert spec.mean == [0.485, 0.456, 0.406] and spec.std == [0.229, 0.224, 0.225]


def test_resnet18_is_configurable_and_rebuilds() -> None:
    torch.manual_seed(0)
    model = ResNet18(num_classes=10, width=8).eval()
    clone = ResNet18(**model.init_kwargs).eval()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert model(x).shape == (2, 10)
        torch.testing.assert_close(clone(x), model(x))
    names = set(model.state_dict())
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var"} <= names
    assert {"fc.weight", "fc.bias"} <= names


# --- control flow ---------------------------------------------------------------------


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(4, 8, generator=g) * 0.5 + 0.1  # positive sum, one refinement step
    return [base, -base, base * 6, -base * 6, base[:1], torch.zeros(2, 8), torch.randn(3, 8)]


def test_trace_silently_diverges_but_script_matches_eager() -> None:
    torch.manual_seed(0)
    model = ControlFlowNet().eval()
    example = _inputs()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch 2.x also deprecates torch.jit itself
        traced = torch.jit.trace(model, example)
        scripted = torch.jit.script(model)
    # Tracing does notice the Python bool/int taken from a tensor, but only warns.
    assert any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
    diverged = 0
    with torch.inference_mode():
        for x in _inputs():
            eager = model(x)
            torch.testing.assert_close(scripted(x), eager)
            if not torch.allclose(traced(x), eager, atol=1e-5):
                diverged += 1
        torch.testing.assert_close(traced(example), model(example))  # right on its example
        assert not torch.allclose(traced(-example), model(-example), atol=1e-3)  # branch
        assert not torch.allclose(traced(example * 6), model(example * 6), atol=1e-3)  # loop
    assert diverged >= 3


def test_control_flow_net_rebuilds_and_has_a_spec() -> None:
    model = ControlFlowNet(features=5, num_classes=3, max_steps=2).eval()
    clone = ControlFlowNet(**model.init_kwargs).eval()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 5)
    torch.testing.assert_close(clone(x), model(x))
    assert model(x).shape == (2, 3)
    assert control_flow_input_spec(5).shape == [5]


def test_digits_without_scikit_learn_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """scikit-learn is the ``train`` extra (a server never loads it): without it, loading
    the data says which extra to install instead of an ImportError."""
    from torchship.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingDependencyError) as missing:
        digits.load_digits_split()
    assert "scikit-learn" in str(missing.value) and "torchship[train]" in missing.value.hint
