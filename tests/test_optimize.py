"""``torchship optimize``: variants stored, loaded back, measured for real, picked by budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from torchship.cli import main
from torchship.optimize import (
    OptimizeOptions,
    VariantRow,
    measure_variants,
    optimize,
    pick_within_budget,
)
from torchship.optimize.data import digits_data
from torchship.optimize.train import fit
from torchship.runtime import load_predictor
from torchship.store import ModelStore
from torchship.zoo import digits, resnet

QUICK = ["--measure-seconds", "0.2", "--min-rounds", "3", "--threads", "1"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A trained, deliberately wide digits MLP: pruning and int8 make it clearly faster."""
    store = ModelStore(tmp_path_factory.mktemp("optimize") / "models")
    data = digits_data()
    torch.manual_seed(0)
    model = fit(digits.DigitsMLP(hidden=1024, layers=2), data, epochs=2, lr=3e-3)
    split = digits.load_digits_split()
    store.save(
        model,
        "wide",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=split.x_test[:32],
    )
    return store


@pytest.fixture(scope="module")
def cli_run(
    wide_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("report")
    code = main(
        [
            "optimize",
            "--store",
            str(wide_store.root),
            "--model",
            "wide:1",
            "--methods",
            "dynamic-int8,prune-structured",
            "cuda",
            "--prune-amount",
            "0.75",
            "--finetune-epochs",
            "1",
            "--accuracy-budget",
            "100",
            "--out",
            str(out),
            *QUICK,
        ]
    )
    return code, "", out


def test_cli_writes_the_table_and_every_version_loads_and_predicts(
    cli_run: tuple[int, str, Path], wide_store: ModelStore
) -> None:
    code, _, out = cli_run
    assert code == 0
    report = json.loads((out / "optimize.json").read_text())
    markdown = (out / "optimize.md").read_text()
    assert (out / "optimize.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {
        "fp32 eager (parent)",
        "dynamic-int8",
        "prune-structured",
        "cudnn-benchmark",
        "compile",
        "cuda-graphs",
    }
    x = digits.load_digits_split().x_test[:5]
    for method in ("dynamic-int8", "prune-structured"):
        row = rows[method]
        assert row["status"] == "ok" and f"| {method} | {row['ref'].split(':')[1]} |" in markdown
        manifest = wide_store.manifest(row["ref"])
        assert manifest.parent == "wide:1" and method in manifest.tags
        assert manifest.metrics["items_per_s_b32"] == pytest.approx(row["items_per_s"])
        for runtime in ("eager", "auto"):
            with load_predictor(wide_store, row["ref"], runtime=runtime) as predictor:  # type: ignore[arg-type]
                assert predictor.predict(x).shape == (5, 10)
        assert 0 <= row["top1"] <= 1 and row["items_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"]
    if not torch.cuda.is_available():
        for method in ("cudnn-benchmark", "compile", "cuda-graphs"):
            assert rows[method]["status"] == "skipped"
            assert rows[method]["reason"].startswith("no CUDA")
        assert "skipped: no CUDA" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA methods run there")
def test_a_run_that_makes_nothing_keeps_the_earlier_report(
    wide_store: ModelStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Only CUDA methods on a CPU: every row is skipped, and the default report folder
    keeps the last report that measured something."""
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "runs" / "optimize" / "wide-1" / "optimize.md"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("an earlier, useful report")
    args = ["optimize", "--store", str(wide_store.root), "--model", "wide:1"]
    code, out, _ = run(capsys, *args, "--methods", "cuda", *QUICK)
    assert code == 0 and "No variant was made" in out and "skipped" in out
    assert earlier.read_text() == "an earlier, useful report"


def test_budget_tags_the_fastest_variant_within_it(
    cli_run: tuple[int, str, Path], wide_store: ModelStore
) -> None:
    _, _, out = cli_run
    report = json.loads((out / "optimize.json").read_text())
    qualifying = [
        r
        for r in report["rows"]
        if r["status"] == "ok" and r["drop_points"] <= 100 and r["speedup"] > 1
    ]
    best = max(qualifying, key=lambda r: r["items_per_s"])
    assert report["picked"] == best["ref"]
    assert wide_store.aliases("wide")["optimized"] == best["ref"].split(":")[1]


def test_structured_pruning_removes_channels_and_bytes(
    cli_run: tuple[int, str, Path], wide_store: ModelStore
) -> None:
    _, _, out = cli_run
    rows = {r["method"]: r for r in json.loads((out / "optimize.json").read_text())["rows"]}
    pruned, parent = rows["prune-structured"], rows["fp32 eager (parent)"]
    assert pruned["size_bytes"] < parent["size_bytes"] / 3
    original = wide_store.load("wide:1")
    shrunk = wide_store.load(pruned["ref"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(shrunk) < count(original) / 3
    widths = [m.out_features for m in shrunk.modules() if isinstance(m, nn.Linear)]
    assert widths == [256, 256, 10]  # 1024 channels, 75% removed; the output layer kept
    manifest = wide_store.manifest(pruned["ref"])
    assert manifest.architecture is not None
    assert manifest.architecture.target == "torchship.optimize.prune:Shrunk"


def test_measurement_sees_a_broken_variant() -> None:
    """Accuracy and agreement come from real predictions: wrong weights show a drop."""
    torch.manual_seed(0)
    data = digits_data()
    good = fit(digits.DigitsMLP(hidden=64, layers=1), data, epochs=3, lr=3e-3)
    broken = digits.DigitsMLP(hidden=64, layers=1).eval()
    broken.load_state_dict(good.state_dict())
    with torch.no_grad():
        last = broken.net[-1]
        assert isinstance(last, nn.Linear)
        last.weight.copy_(last.weight[torch.randperm(10)])  # scrambled class rows
    results = measure_variants(
        {"good": good, "copy": good, "broken": broken},
        data.x_test,
        data.y_test,
        reference="good",
        budget_s=0.05,
        min_rounds=2,
    )
    assert results["copy"].top1 == results["good"].top1 and results["copy"].agreement == 1.0
    assert results["good"].top1 is not None and results["good"].top1 > 0.8
    assert results["broken"].top1 is not None and results["broken"].top1 < 0.5
    assert results["broken"].agreement < 0.5
    assert all(m.latency_samples >= 2 and m.items_per_s > 0 for m in results.values())


def test_nothing_within_the_budget_is_a_clear_error_and_tags_nothing(
    wide_store: ModelStore, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    before = wide_store.aliases("wide").get("strict")
    code, _, err = run(
        capsys,
        "optimize",
        "--store",
        str(wide_store.root),
        "--model",
        "wide:1",
        "--methods",
        "prune-unstructured",
        "--prune-amount",
        "0.995",
        "--finetune-epochs",
        "0",
        "--accuracy-budget",
        "1",
        "--tag",
        "strict",
        "--out",
        str(tmp_path),
        *QUICK,
    )
    assert code == 2 and "No variant fits an accuracy budget of 1 point:" in err
    assert "every variant drops more than 1 point " in err and "Traceback" not in err
    report = json.loads((tmp_path / "optimize.json").read_text())
    assert report["picked"] is None
    assert report["rows"][1]["drop_points"] > 20  # 99.5% of the weights gone, not retrained
    assert wide_store.aliases("wide").get("strict") == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "wide", "--methods", "dynamic-int8,quantum"], "Unknown optimization method"),
        (["--model", "../../etc", "--methods", "dynamic-int8"], "Invalid model name"),
        (["--model", "wide:../1", "--methods", "dynamic-int8"], "Invalid version or alias"),
        (["--model", "wide", "--methods", "bf16", "--tag", "../x"], "Invalid alias"),
        (["--model", "wide", "--methods", "bf16", "--prune-amount", "2"], "prune_amount"),
        (["--model", "wide", "--methods", "bf16", "--accuracy-budget", "-1"], "budget"),
        (["--model", "nope", "--methods", "bf16"], "No model named 'nope'"),
    ],
)
def test_bad_input_is_refused_before_any_work(
    wide_store: ModelStore,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    versions = wide_store.versions("wide")
    code, _, err = run(
        capsys, "optimize", "--store", str(wide_store.root), "--out", str(tmp_path), *args
    )
    assert code == 2 and message in err and "Traceback" not in err
    assert wide_store.versions("wide") == versions


def test_pick_is_the_fastest_within_budget_and_faster_than_the_parent() -> None:
    def row(method: str, drop: float, speedup: float) -> VariantRow:
        return VariantRow(
            method, "x", "ok", ref=f"m:{method}", drop_points=drop, speedup=speedup,
            items_per_s=1000 * speedup,
        )  # fmt: skip

    parent = VariantRow("parent", "parent", "parent", ref="m:1", drop_points=0, speedup=1.0)
    rows = [parent, row("a", 0.5, 2.0), row("b", 1.5, 5.0), row("c", 0.0, 0.9)]
    picked, why = pick_within_budget(rows, 1.0)
    assert picked is not None and picked.method == "a" and "2.00x" in why
    picked, _ = pick_within_budget(rows, 2.0)
    assert picked is not None and picked.method == "b"
    picked, why = pick_within_budget([parent, row("c", 0.0, 0.9)], 1.0)
    assert picked is None and "none is faster than the parent" in why
    picked, why = pick_within_budget([parent, row("tie", 0.0, 1.02)], 1.0)  # noise, not a win
    assert picked is None and "1.05x or more" in why
    slow_alone = row("batched", 0.0, 1.5)
    slow_alone.latency_speedup = 0.8
    picked, why = pick_within_budget([parent, slow_alone], 1.0)
    assert picked is slow_alone and "slower than the parent on single requests (0.80x" in why


def test_static_ort_distill_and_bf16_versions_load_and_agree(
    wide_store: ModelStore, tmp_path: Path
) -> None:
    report = optimize(
        wide_store,
        "wide:1",
        ["static-int8", "ort-static-int8", "distill", "bf16"],
        options=OptimizeOptions(
            threads=1,
            measure_seconds=0.1,
            min_rounds=2,
            student="torchship.zoo.digits:DigitsMLP",
            student_kwargs={"hidden": 32, "layers": 1},
            distill_epochs=3,
        ),
    )
    x = digits.load_digits_split().x_test[:64]
    with load_predictor(wide_store, "wide:1", runtime="eager") as parent:
        expected = parent.predict(x).argmax(1)
    for method in ("static-int8", "ort-static-int8", "distill", "bf16"):
        row = report.row(method)
        assert row.status == "ok", row.reason
        assert row.ref is not None and wide_store.manifest(row.ref).parent == "wide:1"
        with load_predictor(wide_store, row.ref) as predictor:
            agreement = (predictor.predict(x).argmax(1) == expected).float().mean()
        assert agreement >= (0.7 if method == "distill" else 0.9), method
    assert report.row("static-int8").size_bytes < report.parent_row.size_bytes / 3  # type: ignore[operator]
    assert "bf16" in " ".join(report.notes)


def test_unlabelled_models_use_agreement_and_skip_distillation(tmp_path: Path) -> None:
    """A model of another input shape: stored examples, drop = disagreement with parent."""
    store = ModelStore(tmp_path / "models")
    torch.manual_seed(0)
    model = resnet.ResNet18(num_classes=10, width=8).eval()
    store.save(model, "tiny-resnet", examples=torch.randn(16, 3, 32, 32))
    report = optimize(
        store,
        "tiny-resnet",
        ["prune-structured", "distill", "dynamic-int8"],
        options=OptimizeOptions(threads=1, measure_seconds=0.1, min_rounds=2),
    )
    assert not report.labelled and report.parent_row.top1 is None
    pruned = report.row("prune-structured")
    assert pruned.status == "ok" and "not fine-tuned" in " ".join(pruned.notes)
    assert pruned.agreement is not None
    assert pruned.drop_points == pytest.approx((1 - pruned.agreement) * 100)
    assert report.row("distill").status == "skipped"
    assert "labelled training data" in report.row("distill").reason
    assert report.row("dynamic-int8").status == "ok"


def test_cuda_wrappers_store_the_weights_and_run_eagerly_without_cuda(tmp_path: Path) -> None:
    """A version made on a GPU machine still loads and predicts on a CPU-only one."""
    from torchship.optimize._wrap import arch_spec
    from torchship.optimize.cuda import CudaOptimized
    from torchship.store.serialization import architecture_of

    store = ModelStore(tmp_path / "models")
    torch.manual_seed(0)
    model = digits.DigitsCNN().eval()
    x = torch.randn(4, 1, 8, 8)
    for mode in ("cudnn-benchmark", "compile", "cuda-graphs"):
        wrapped = CudaOptimized(arch_spec(architecture_of(model)), mode, _module=model)
        saved = store.save(wrapped, "cnn", examples=x)
        loaded = store.load(saved.ref, device="cpu")
        assert isinstance(loaded, CudaOptimized) and loaded.mode == mode
        with torch.inference_mode():
            assert torch.equal(loaded(x), model(x))


class _Unscriptable(nn.Module):
    """Neither torch.fx (a data-dependent branch) nor TorchScript (try/except) takes
    ``forward``; eager mode runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            scale = 2.0 if bool(x.sum() > 0) else 1.0
        except RuntimeError:
            scale = 0.0
        return self.fc(x) * scale


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch.save, quantized
def test_int8_runs_compiled_keeps_control_flow_and_reloads_fresh_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int8 wrappers run through TorchScript where it compiles (branches and loops
    kept, as scripting does), fall back to eager where it does not, and a version loaded
    from the store uses the stored weights, not those it was first compiled with."""
    from torchship.export.torchscript import to_torchscript
    from torchship.optimize import quantize
    from torchship.optimize._wrap import arch_spec
    from torchship.store.serialization import architecture_of
    from torchship.zoo.control_flow import ControlFlowNet

    torch.manual_seed(0)
    net = ControlFlowNet().eval()
    base = arch_spec(architecture_of(net))
    q = quantize.quantize_dynamic_int8(net, base, torch.randn(4, 8))
    positive, negative = torch.full((3, 8), 0.9), torch.full((3, 8), -2.5)
    with torch.inference_mode():
        compiled = [q(positive), q(negative)]  # the first call compiles
        assert q.scripted()
        eager = [q.model(positive), q.model(negative)]
    for got, want in zip(compiled, eager, strict=True):
        assert torch.equal(got, want)
    traced = to_torchscript(q, positive, "trace")  # a trace records the eager int8 ops
    assert torch.equal(traced(positive), compiled[0])
    assert not torch.allclose(compiled[0][0], compiled[1][0])  # two branches taken

    store = ModelStore(tmp_path / "models")
    saved = store.save(q, "cf", examples=positive)
    loaded = store.load(saved.ref, device="cpu")
    assert isinstance(loaded, quantize.DynamicInt8)
    with torch.inference_mode():
        assert torch.equal(loaded(negative), compiled[1])
        # compiled now, then new weights: the next call must see them
        other = quantize.quantize_dynamic_int8(ControlFlowNet().eval(), base, positive)
        loaded.load_state_dict(other.state_dict())
        assert torch.equal(loaded(negative), other.model(negative))

    # loaded through a parent module (an int8 version inside another wrapper) ...
    parent = nn.Sequential(loaded)
    parent.load_state_dict(nn.Sequential(q).state_dict())
    with torch.inference_mode():
        assert torch.equal(loaded(negative), compiled[1])
    # ... or while the first compile is under way: the next call compiles again
    fresh = quantize.DynamicInt8(**q.init_kwargs).eval()
    fresh.load_state_dict(q.state_dict())
    real_script = quantize.script_quantized

    def load_while_compiling(model: nn.Module) -> Any:
        out = real_script(model)
        fresh.load_state_dict(other.state_dict())
        return out

    monkeypatch.setattr(quantize, "script_quantized", load_while_compiling)
    with torch.inference_mode():
        fresh(negative)
        monkeypatch.setattr(quantize, "script_quantized", real_script)
        assert torch.equal(fresh(negative), other.model(negative))
    # a whole-module pickle leaves the compiled copy behind and compiles again
    torch.save(loaded, tmp_path / "whole.pt")
    unpickled = torch.load(tmp_path / "whole.pt", weights_only=False)
    with torch.inference_mode():
        assert torch.equal(unpickled(negative), loaded(negative)) and unpickled.scripted()

    odd = _Unscriptable().eval()
    q_odd = quantize.quantize_dynamic_int8(odd, arch_spec(architecture_of(odd)), positive)
    with torch.inference_mode():
        assert not q_odd.scripted()
        assert torch.allclose(q_odd(positive), odd(positive), atol=0.05)
