"""TensorBoard event files: the logger other code calls, and ``torchship batch --tensorboard``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchship.cli import main
from torchship.errors import MissingDependencyError
from torchship.monitoring.tensorboard import TensorBoardLogger, read_scalars, read_text
from torchship.store import ModelStore
from torchship.zoo import digits


def test_logger_writes_what_tensorboard_reads(tmp_path: Path) -> None:
    with TensorBoardLogger(tmp_path, "quantize") as tb:
        for step, loss in enumerate([0.9, 0.5, 0.2]):
            tb.scalar("train/loss", loss, step)
        tb.scalars(
            {"acc": 0.97, "size_mb": 1.5, "name": "skipped", "nan": float("nan")}, 3, prefix="eval"
        )
        tb.table(
            "results",
            ["variant", "size_mb", "p50_ms", "note"],
            [["fp32", 1.5, 2.0, "baseline"], ["int8", 0.4, 1.1, "dynamic"]],
        )
        tb.hparams({"method": "dynamic", "bits": 8}, {"hparam/p50_ms": 1.1})
        advance = tb.throughput("batch", done=10)
        advance(5)
        advance(5)
    assert tb.path == tmp_path / "quantize"
    scalars = read_scalars(tb.path)
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([0.9, 0.5, 0.2])
    assert scalars["eval/acc"] == [(3, pytest.approx(0.97))]
    assert "eval/name" not in scalars and "eval/nan" not in scalars
    assert scalars["results/size_mb/int8"] == [(0, pytest.approx(0.4))]
    assert scalars["results/p50_ms/fp32"] == [(0, pytest.approx(2.0))]
    assert [s for s, _ in scalars["batch/items_done"]] == [15, 20]  # resumed at 10
    assert all(v > 0 for _, v in scalars["batch/items_per_s"])
    table = read_text(tb.path)["results"]
    assert "| int8 | 0.4 | 1.1 | dynamic |" in table


def test_missing_tensorboard_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(MissingDependencyError) as err:
        TensorBoardLogger(tmp_path)
    assert "torchship[monitoring]" in str(err.value.hint)


def test_batch_cli_writes_a_tensorboard_run(tmp_path: Path, quick_mlp: torch.nn.Module) -> None:
    data = digits.load_digits_split()
    store = ModelStore(tmp_path / "models")
    store.save(quick_mlp, "digits", input_spec=digits.input_spec(), labels=digits.LABELS)
    inputs = tmp_path / "digits.npy"
    np.save(inputs, data.x_test[:100].numpy())
    out = tmp_path / "preds.csv"
    code = main(
        [
            "batch", "--model", "digits", "--input", str(inputs), "--output", str(out),
            "--store", str(store.root), "--batch-size", "16", "--num-workers", "0",
            "--runtime", "eager", "--tensorboard", str(tmp_path / "tb"),
        ]
    )  # fmt: skip
    assert code == 0 and out.exists()
    (run,) = (tmp_path / "tb").iterdir()
    assert run.name.startswith("batch-digits-v1-")
    scalars = read_scalars(run)
    assert scalars["batch/items_done"][-1] == (100, 100.0)
    assert len(scalars["batch/items_per_s"]) == 7  # one point per batch of 16
    assert scalars["batch/summary/items"] == [(100, 100.0)]
    assert scalars["batch/summary/failures"] == [(100, 0.0)]
    assert scalars["batch/summary/items_per_s"][0][1] > 0
    settings = read_text(run)["batch/settings"]
    assert "| batch_size | 16 |" in settings and "| runtime | eager |" in settings


def test_result_records_become_comparable_scalars(tmp_path: Path) -> None:
    rows = [
        {"method": "fp32", "top1": 0.97, "size_bytes": 1_500_000, "notes": ""},
        {"method": "int8", "top1": 0.96, "size_bytes": 400_000, "notes": "dynamic", "extra": None},
    ]
    with TensorBoardLogger(tmp_path, "optimize") as tb:
        tb.records("optimize", rows, key="method")
    scalars = read_scalars(tb.path)
    assert scalars["optimize/top1/int8"] == [(0, pytest.approx(0.96))]
    assert scalars["optimize/size_bytes/fp32"] == [(0, 1_500_000.0)]
    assert "optimize/notes/int8" not in scalars


def test_printed_benchmark_tables_go_to_tensorboard_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchship.monitoring import tensorboard

    monkeypatch.setattr(tensorboard, "_env_logger", None)
    monkeypatch.delenv(tensorboard.ENV_DIR, raising=False)
    columns = ["server", "p50", "req/s", "vs naive"]
    rows = [["fastapi", "1.23 ms", "1,234", "1.5x"], ["naive", "2.5 ms", "800", "-"]]
    tensorboard.table_from_env("Serving: digits", columns, rows)  # not asked: nothing
    assert tensorboard._env_logger is None
    monkeypatch.setenv(tensorboard.ENV_DIR, str(tmp_path))
    tensorboard.table_from_env("Serving: digits", columns, rows)
    assert tensorboard._env_logger is not None
    tensorboard._env_logger.close()
    (run,) = tmp_path.iterdir()
    scalars = read_scalars(run)
    assert scalars["Serving__digits/p50/fastapi"] == [(0, pytest.approx(1.23))]
    assert scalars["Serving__digits/req_s/fastapi"] == [(0, 1234.0)]
    assert scalars["Serving__digits/vs_naive/fastapi"] == [(0, 1.5)]
    assert "Serving__digits/vs_naive/naive" not in scalars
