"""The torchship CLI, in-process, against a temp store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomllib

from torchship.cli import main
from torchship.store import ModelStore
from torchship.zoo import digits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("cli") / "models"
    assert main(["train-demo", "--store", str(root), "--no-export"]) == 0
    return str(root)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_demo_is_idempotent_with_if_missing(
    cli_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "train-demo", "--store", cli_store, "--if-missing")
    assert code == 0 and "already in" in out
    code, out, _ = run(capsys, "models", "list", "--store", cli_store)
    assert code == 0 and "digits" in out and "production" in out


def test_show_verify_tag_untag(cli_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "models", "show", "digits:production", "--store", cli_store, "--json"
    )
    manifest = json.loads(out)
    assert manifest["metrics"]["test_accuracy"] >= 0.97
    assert manifest["labels"] == digits.LABELS
    code, out, _ = run(capsys, "models", "show", "digits", "--store", cli_store)
    assert code == 0 and "weights.safetensors" in out
    assert run(capsys, "models", "verify", "digits:1", "--store", cli_store)[0] == 0
    code, out, _ = run(capsys, "models", "tag", "digits:1", "stable", "--store", cli_store)
    assert code == 0 and "digits:stable -> 1" in out
    code, _, err = run(capsys, "models", "untag", "digits:1", "stable", "--store", cli_store)
    assert code == 2 and "torchship models untag digits stable" in err  # the hint says how
    assert run(capsys, "models", "untag", "digits", "stable", "--store", cli_store)[0] == 0


def test_errors_are_one_clear_line_and_exit_2(
    cli_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "models", "show", "digits:42", "--store", cli_store)
    assert code == 2 and "no version or alias '42'" in err and "hint" in err
    code, _, err = run(capsys, "models", "show", "../etc", "--store", cli_store)
    assert code == 2 and "Invalid model name" in err
    code, _, err = run(capsys, "models", "delete", "digits:1", "--store", cli_store)
    assert code == 2 and "aliased as production" in err and "--force" in err
    assert "Traceback" not in err


def test_export_then_predict_files(
    cli_store: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    digits_data: digits.DigitsData,
) -> None:
    code, out, _ = run(capsys, "export", "digits", "--format", "onnx", "--store", cli_store)
    assert code == 0 and "verified at batch sizes" in out
    code, out, _ = run(
        capsys,
        "export",
        "digits",
        "--format",
        "torchscript",
        "--method",
        "script",
        "--store",
        cli_store,
    )
    assert code == 0 and "model.ts" in out

    npy = tmp_path / "three.npy"
    np.save(npy, digits_data.x_test[:3].numpy())
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((ROOT / "data" / "sample.jpg").read_bytes()[:300])
    files = [ROOT / "data" / "sample.jpg", truncated, ROOT / "data" / "test.jpg", npy]
    code, out, _ = run(
        capsys,
        *("predict", "--model", "digits", "--store", cli_store, "--json"),
        *map(str, files),
    )
    assert code == 1  # one file could not be read: named, and the others answered
    lines = [json.loads(line) for line in out.splitlines()]
    answered = {r["file"]: r["top_k"][0]["label"] for r in lines if "top_k" in r}
    assert answered == {
        str(files[0]): "2",
        str(files[2]): "3",
        **{f"{npy}[{i}]": str(int(digits_data.y_test[i])) for i in range(3)},
    }  # one row per item: a .npy may hold a batch
    (error,) = [r for r in lines if "error" in r]
    assert error["file"] == str(truncated) and "truncated" in error["error"]
    code, out, _ = run(
        capsys,
        "predict",
        "--model",
        "digits",
        "--store",
        cli_store,
        "--runtime",
        "onnx",
        str(ROOT / "data" / "digit_4_0.png"),
    )
    assert code == 0 and "onnxruntime" in out and " 4 " in out


def _train_quick_mlp(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    """One more (unaliased) version in the store, trained for a single epoch."""
    args = ["train-demo", "--store", store, "--no-export", "--arch", "mlp", "--alias", ""]
    assert main([*args, "--epochs", "1"]) == 0
    capsys.readouterr()


def test_delete_version(cli_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    _train_quick_mlp(cli_store, capsys)
    code, out, _ = run(capsys, "models", "delete", "digits:2", "--store", cli_store)
    assert code == 0 and "deleted digits:2" in out


def test_requirements_txt_matches_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = set(pyproject["project"]["dependencies"])
    deps |= set(pyproject["project"]["optional-dependencies"]["train"])  # the lessons train
    reqs = {
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert reqs == deps
    assert "torch==2.13.0" in deps
    assert not any(d.startswith("torchvision") for d in deps)


def test_promote_rollback_history(cli_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    _train_quick_mlp(cli_store, capsys)
    versions = json.loads(
        run(capsys, "models", "show", "digits:latest", "--json", "--store", cli_store)[1]
    )["version"]
    code, out, _ = run(
        capsys,
        "models",
        "promote",
        f"digits:{versions}",
        "--reason",
        "try the MLP",
        "--store",
        cli_store,
    )
    assert code == 0 and "-> production" in out
    code, out, _ = run(
        capsys, "models", "rollback", "digits", "--reason", "too slow", "--store", cli_store
    )
    assert code == 0 and f"production {versions} -> 1" in out
    code, out, _ = run(capsys, "models", "history", "digits", "--store", cli_store)
    assert code == 0 and "too slow" in out and "rollback" in out
    code, out, _ = run(capsys, "models", "list", "--store", cli_store)
    assert "archived" in out


def test_export_refuses_an_opset_it_would_not_write(
    cli_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dynamo exporter writes opset 18+ whatever it is asked: asking for 13 is an
    error naming --exporter legacy, not a file whose manifest claims 13."""
    args = ("export", "digits", "--format", "onnx", "--store", cli_store)
    code, _, err = run(capsys, *args, "--opset", "13")
    assert code == 2 and "wrote opset 18, not the 13" in err and "legacy" in err
    code, _, err = run(capsys, *args, "--opset", "99")
    assert code == 2 and "Opset 99" in err
    code, _, _ = run(capsys, *args, "--opset", "13", "--exporter", "legacy")
    assert code == 0
    manifest = ModelStore(cli_store).manifest("digits")
    assert manifest.artifacts["onnx"].options["opset"] == 13
    onnx_file = ModelStore(cli_store).path("digits", manifest.version) / "model.onnx"
    from torchship.export.onnx import written_opset

    assert written_opset(onnx_file) == 13
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it before any export
        main([*args, "--tolerance", "-1"])
    assert exit_.value.code == 2 and "must be a number >= 0" in capsys.readouterr().err
