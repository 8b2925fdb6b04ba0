"""Inference optimization, measured: the ``torchship optimize`` table for the reference models.

For each model the script trains it (digits) or builds it (ResNet-18, random weights),
saves it into a temp store and runs :func:`torchship.optimize.optimize`: one new store
version per method, each loaded back through ``load_predictor`` and measured with the
others *interleaved* (round-robin, rotating order): top-1 on the held-out digits test
set and agreement with the parent, weights file size, p50/p99 latency at batch 1,
items/s at batch 32 and the speed-up against the fp32 eager parent.

* ``cnn``: the digits CNN with every method; the distillation student is a small MLP
  (``DigitsMLP(hidden=256, layers=1)``), and the same MLP trained on labels alone is
  reported beside it as a control;
* ``mlp``: the zoo's Linear-heavy digits MLP (512 wide), quantization, ONNX Runtime,
  pruning and precision;
* ``mlp-wide``: the same MLP at 1024 x 3, where int8 matrix multiplies dominate more;
* ``resnet18``: ResNet-18, random weights, 224x224 (112 with ``--quick``), its stored
  examples as data (no labels: the drop is disagreement with the parent).

Targets (ratios, printed as PASS/MISS): dynamic int8 on the MLP >= 1.8x items/s at batch
32 with < 1 point drop; the distilled student >= 3x the teacher's items/s within 1.5
points; ONNX Runtime >= 1.4x eager items/s on ResNet-18.

    python benchmarks/optimize.py                  # ~6-8 min on 2 cores
    python benchmarks/optimize.py --quick          # ~3-4 min
    python benchmarks/optimize.py --models mlp --threads 1,2 --out optimize-results.md
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from _common import console, cpu_count, machine_summary, markdown_table, print_table
from rich.table import Table

from torchship.optimize import OptimizeOptions, OptimizeReport, optimize, remeasure
from torchship.optimize.data import digits_data
from torchship.optimize.train import fit, top1
from torchship.store import ModelStore
from torchship.zoo import digits, resnet

STUDENT = {"hidden": 256, "layers": 1}
CPU_METHODS = ["quantize", "ort", "prune", "precision", "cuda"]


@dataclass
class Case:
    name: str
    methods: list[str]
    build: Callable[[ModelStore], str]  # saves the parent, returns its ref
    options: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def save_digits(store: ModelStore, name: str, model: torch.nn.Module, acc: float) -> str:
    split = digits.load_digits_split()
    return store.save(
        model,
        name,
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        metrics={"test_accuracy": acc},
        examples=split.x_test[:32],
    ).ref


def cnn_case() -> Case:
    notes: list[str] = []

    def build(store: ModelStore) -> str:
        result = digits.train("cnn")
        notes.append(f"digits-cnn: trained {result.epochs} epochs, {result.seconds:.1f} s")
        notes.append(
            f"digits-cnn: control, DigitsMLP({STUDENT}) trained 40 epochs on labels alone "
            f"(no teacher): top-1 {control_student():.2%}"
        )
        return save_digits(store, "digits-cnn", result.model, result.test_accuracy)

    options = {
        "student": "torchship.zoo.digits:DigitsMLP",
        "student_kwargs": STUDENT,
        "distill_epochs": 40,
    }
    return Case("digits-cnn", [*CPU_METHODS, "distill"], build, options, notes)


def control_student() -> float:
    """The distillation student's architecture trained without the teacher."""
    data = digits_data()
    torch.manual_seed(0)
    model = fit(digits.DigitsMLP(**STUDENT), data, epochs=40, lr=3e-3)
    assert data.y_test is not None
    return top1(model, data.x_test, data.y_test)


def mlp_case(wide: bool) -> Case:
    name = "digits-mlp-wide" if wide else "digits-mlp"

    def build(store: ModelStore) -> str:
        if wide:
            torch.manual_seed(0)
            model = fit(digits.DigitsMLP(hidden=1024, layers=3), digits_data(), epochs=30, lr=2e-3)
            acc = top1(model, *digits_split())
        else:
            result = digits.train("mlp")
            model, acc = result.model, result.test_accuracy
        return save_digits(store, name, model, acc)

    return Case(name, ["quantize", "ort", "prune", "precision"], build)


def digits_split() -> tuple[torch.Tensor, torch.Tensor]:
    split = digits.load_digits_split()
    return split.x_test, split.y_test


def resnet_case(quick: bool) -> Case:
    size = 112 if quick else 224

    def build(store: ModelStore) -> str:
        from _common import synthetic_photo

        torch.manual_seed(0)
        model = resnet.ResNet18(num_classes=1000).eval()
        spec = resnet.resnet_input_spec()
        spec = spec.model_copy(update={"shape": [3, size, size], "size": (size, size)})
        mean = np.array(resnet.IMAGENET_MEAN, dtype=np.float32)
        std = np.array(resnet.IMAGENET_STD, dtype=np.float32)
        photos = []
        for seed in range(64):
            pixels = np.asarray(synthetic_photo(seed, (size, size)), dtype=np.float32) / 255
            photos.append(torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy()))
        return store.save(model, "resnet18", input_spec=spec, examples=torch.stack(photos)).ref

    return Case(
        f"resnet18-{size}px",
        [
            "onnxruntime",
            "ort-static-int8",
            "static-int8",
            "dynamic-int8",
            "prune-structured",
            "bf16",
            "cuda",
        ],
        build,
        options={"min_rounds": 3 if quick else 5},
        notes=[
            f"resnet18: random weights, 64 synthetic photos ({size}x{size}) as stored "
            "examples: calibration and the agreement test set; pruning is not fine-tuned "
            "(no labels)"
        ],
    )


@dataclass
class Target:
    what: str
    measured: str
    passed: bool | None  # None: not measured in this run


def targets(reports: dict[tuple[str, int], OptimizeReport]) -> list[Target]:
    found = []
    for (case, threads), report in sorted(reports.items()):
        rows = {r.method: r for r in report.rows}
        if case == "digits-mlp" and (row := rows.get("dynamic-int8")) is not None:
            ok = row.status == "ok" and row.speedup is not None and row.drop_points is not None
            found.append(
                Target(
                    f"digits MLP, {threads} thread(s): dynamic int8 >= 1.8x items/s @32, drop < 1 pt",
                    f"{row.speedup:.2f}x, drop {row.drop_points:+.2f} pts"
                    if ok
                    else f"{row.status}: {row.reason}",
                    ok and row.speedup >= 1.8 and row.drop_points < 1.0,  # type: ignore[operator]
                )
            )
        if case == "digits-cnn" and (row := rows.get("distill")) is not None:
            ok = row.status == "ok" and row.speedup is not None and row.drop_points is not None
            found.append(
                Target(
                    f"digits CNN, {threads} thread(s): distilled student >= 3x teacher, within 1.5 pts",
                    f"{row.speedup:.2f}x, drop {row.drop_points:+.2f} pts"
                    if ok
                    else f"{row.status}: {row.reason}",
                    ok and row.speedup >= 3.0 and row.drop_points <= 1.5,  # type: ignore[operator]
                )
            )
        if case.startswith("resnet18") and (row := rows.get("onnxruntime")) is not None:
            ok = row.status == "ok" and row.speedup is not None
            found.append(
                Target(
                    f"{case}, {threads} thread(s): ONNX Runtime (fp32) >= 1.4x eager items/s @32",
                    f"{row.speedup:.2f}x (batch-1 p50: {row.latency_speedup:.2f}x)"
                    if ok
                    else f"{row.status}: {row.reason}",
                    ok and row.speedup >= 1.4,  # type: ignore[operator]
                )
            )
    return found


COLUMNS = ["method", "version", "top-1", "drop pts", "agree", "size", "p50 ms b1",
           "p99 ms b1", "items/s b32", "x b32", "x b1", "make s"]  # fmt: skip


def compact_rows(report: OptimizeReport) -> list[list[str]]:
    rows = []
    for row in report.rows:
        cells = row.cells()
        if not row.measured:
            rows.append([cells[0], "-", row.status, *["-"] * 9])
        else:
            rows.append([*cells[:-1], f"{row.seconds_to_make or 0:.1f}"])
    return rows


def show(report: OptimizeReport, title: str) -> list[str]:
    """Print the report's table and notes; return them as Markdown lines."""
    rows = compact_rows(report)
    table = Table(title=title)
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    from torchship.monitoring.tensorboard import table_from_env

    table_from_env(title, COLUMNS, rows)  # TORCHSHIP_TENSORBOARD=DIR: also a TensorBoard run
    lines = report.description()[1:]
    lines += [f"{r.method}: {r.status}: {r.reason}" for r in report.rows if not r.measured]
    lines += [f"{r.method}: {'; '.join(r.notes)}" for r in report.rows if r.measured and r.notes]
    for line in lines:
        console.print(f"  {line}", soft_wrap=True)
    return [
        f"#### {title}",
        "",
        markdown_table(COLUMNS, rows),
        "",
        *[f"- {ln}" for ln in lines],
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter timing, smaller ResNet input")
    parser.add_argument(
        "--models",
        default="cnn,mlp,mlp-wide,resnet18",
        help="comma list of cnn,mlp,mlp-wide,resnet18",
    )
    parser.add_argument("--threads", help="comma list (default: 1 and all cores)")
    parser.add_argument("--measure-seconds", type=float, help="timing budget per model")
    parser.add_argument("--out", type=Path, help="also write the results as Markdown here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    cores = cpu_count()
    thread_list = (
        sorted({int(t) for t in args.threads.split(",")}) if args.threads else sorted({1, cores})
    )
    seconds = args.measure_seconds or (2.0 if args.quick else 8.0)
    builders = {
        "cnn": cnn_case,
        "mlp": lambda: mlp_case(False),
        "mlp-wide": lambda: mlp_case(True),
        "resnet18": lambda: resnet_case(args.quick),
    }
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    for key in wanted:
        if key not in builders:
            parser.error(f"unknown model {key!r}; use {', '.join(builders)}")
    summary = machine_summary()
    console.print(f"[bold]torchship optimize benchmark[/] on {summary}")
    reports: dict[tuple[str, int], OptimizeReport] = {}
    notes: list[str] = []
    markdown: list[str] = [
        f"{summary}; timing budget {seconds:g} s per model and thread count.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="torchship-bench-optimize-") as root:
        store = ModelStore(Path(root) / "models")
        for key in wanted:
            case = builders[key]()
            console.print(f"building {case.name} ...")
            ref = case.build(store)
            first: OptimizeReport | None = None
            for threads in thread_list:
                options = OptimizeOptions(
                    threads=threads,
                    measure_seconds=seconds,
                    **case.options,  # type: ignore[arg-type]
                )
                say = lambda msg: console.print(f"  {msg}")  # noqa: E731
                if first is None:
                    console.print(f"optimizing {case.name} ({threads} thread(s)) ...")
                    report = first = optimize(
                        store, ref, case.methods, options=options, progress=say
                    )
                else:  # the same versions, measured again with another thread count
                    report = remeasure(store, first, options=options, progress=say)
                reports[(case.name, threads)] = report
                markdown += show(report, f"{case.name}, {threads} thread(s)")
            notes += case.notes
    found = targets(reports)
    target_rows = [
        [t.what, t.measured, "-" if t.passed is None else ("PASS" if t.passed else "MISS")]
        for t in found
    ]
    print_table("Targets", ["target", "measured", "verdict"], target_rows)
    notes.append(f"load average at the end: {os.getloadavg()[0]:.1f} (see the caveats in README)")
    for note in notes:
        console.print(f"  - {note}", soft_wrap=True)
    total = time.monotonic() - started
    console.print(f"total {total:.0f} s")
    if args.out:
        markdown += [
            "#### Targets",
            "",
            markdown_table(["target", "measured", "verdict"], target_rows),
            "",
        ]
        markdown += [f"- {n}" for n in notes] + [f"- total {total:.0f} s", ""]
        args.out.write_text("\n".join(markdown))
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
