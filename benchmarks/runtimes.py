"""Eager vs TorchScript vs ONNX Runtime on this machine, measured the same way for all.

For each model (digits CNN, digits MLP, ResNet-18) the script saves it into a temp
store, exports TorchScript (trace, frozen, optimised at load) and ONNX (dynamo), each
verified against eager, then loads the three through ``torchship.runtime`` and times
them *interleaved* (round-robin, so background noise hits every runtime alike):

* latency at batch 1: p50 and p99 of single calls,
* throughput at batch 32: items/s from the median call,

at each thread count (default: 1 and all cores). Ratios are speedups over eager
(>1 is faster). Weights are random unless ``--trained``: speed does not depend on them.

    python benchmarks/runtimes.py            # about 2-3 min on 2 cores
    python benchmarks/runtimes.py --quick    # under 40 s: fewer rounds, smaller ResNet input
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from _common import console, cpu_count, interleaved, machine_summary, print_table, ratio

from torchship.errors import TorchshipError
from torchship.export import export_onnx, export_torchscript
from torchship.runtime import Predictor, load_predictor, set_threads
from torchship.store import InputSpec, ModelStore
from torchship.zoo import digits

RUNTIMES = ("eager", "torchscript", "onnx")
LATENCY_BATCH = 1
THROUGHPUT_BATCH = 32


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    spec: InputSpec
    examples: torch.Tensor
    weights: str
    verify_batch_sizes: tuple[int, ...] = (1, 8, 32)
    notes: list[str] = field(default_factory=list)


def digits_case(arch: str, trained: bool) -> Case:
    data = digits.load_digits_split()
    if trained:
        result = digits.train(arch, epochs=3, data=data)
        model, weights = result.model, f"trained 3 epochs, acc {result.test_accuracy:.3f}"
    else:
        torch.manual_seed(0)
        model, weights = digits.build(arch).eval(), "random"
    return Case(f"digits-{arch}", model, digits.input_spec(), data.x_test[:64], weights)


def resnet_case(quick: bool) -> Case | str:
    """ResNet-18 from the zoo (random weights), or why it is skipped."""
    try:
        from torchship.zoo import resnet
    except ImportError:
        return "ResNet-18 skipped: torchship.zoo.resnet is not available in this checkout."
    torch.manual_seed(0)
    model = resnet.ResNet18(num_classes=1000).eval()
    spec = resnet.resnet_input_spec()
    size = 112 if quick else spec.shape[-1]
    spec = spec.model_copy(update={"shape": [spec.shape[0], size, size], "size": (size, size)})
    generator = torch.Generator().manual_seed(0)
    examples = torch.randn(4, *spec.shape, generator=generator)
    name = "resnet18" if size == 224 else f"resnet18-{size}px"
    return Case(name, model, spec, examples, "random", verify_batch_sizes=(1, 4))


def export_all(store: ModelStore, case: Case) -> list[str]:
    """Export TorchScript and ONNX; returns the runtimes that can be benchmarked."""
    store.save(case.model, case.name, input_spec=case.spec, examples=case.examples)
    available = ["eager"]
    exports: list[tuple[str, Callable[[], object]]] = [
        ("torchscript", partial(export_torchscript, store, case.name, method="trace")),
        ("onnx", partial(export_onnx, store, case.name, exporter="dynamo")),
    ]
    for runtime, run in exports:
        start = time.monotonic()
        try:
            run(batch_sizes=case.verify_batch_sizes)  # type: ignore[call-arg]
        except TorchshipError as exc:
            case.notes.append(f"{case.name}: {runtime} export failed: {exc}")
            continue
        case.notes.append(
            f"{case.name}: {runtime} export + verify {time.monotonic() - start:.1f} s"
        )
        available.append(runtime)
    return available


def bench_case(
    store: ModelStore, case: Case, runtimes: list[str], threads: int, budget_s: float
) -> list[list[str]]:
    predictors: dict[str, Predictor] = {
        rt: load_predictor(
            store, case.name, runtime=rt, device="cpu", threads=threads, warmup=False
        )  # type: ignore[arg-type]
        for rt in runtimes
    }
    one = predictors["eager"].sample_batch(LATENCY_BATCH)
    many = predictors["eager"].sample_batch(THROUGHPUT_BATCH)
    assert one is not None and many is not None
    names = {rt: p.runtime for rt, p in predictors.items()}
    latency = interleaved(
        {names[rt]: partial(p.predict, one) for rt, p in predictors.items()},
        budget_s=budget_s,
        min_rounds=10,
    )
    throughput = interleaved(
        {names[rt]: partial(p.predict, many) for rt, p in predictors.items()},
        budget_s=budget_s,
        min_rounds=3,
    )
    for p in predictors.values():
        p.close()
    base_lat = latency["eager"].p50
    base_thr = throughput["eager"].items_per_s(THROUGHPUT_BATCH)
    rows = []
    for rt in runtimes:
        name = names[rt]
        lat, thr = latency[name], throughput[name]
        items = thr.items_per_s(THROUGHPUT_BATCH)
        rows.append(
            [
                case.name,
                str(threads),
                name,
                f"{lat.p50:.3f}",
                f"{lat.p99:.3f}",
                ratio(base_lat, lat.p50),
                f"{items:,.0f}",
                ratio(items, base_thr),
                f"{lat.n}/{thr.n}",
            ]
        )
    return rows


def parse_threads(text: str | None, quick: bool) -> list[int]:
    cores = cpu_count()
    if text is None:
        return [cores] if quick or cores == 1 else [1, cores]
    return sorted({max(1, int(t)) for t in text.split(",") if t.strip()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds; under 40 s")
    parser.add_argument("--threads", help="comma list, e.g. 1,4 (default: 1 and all cores)")
    parser.add_argument(
        "--models", default="cnn,mlp,resnet18", help="comma list of cnn,mlp,resnet18"
    )
    parser.add_argument("--trained", action="store_true", help="train the digits models first")
    parser.add_argument("--budget", type=float, help="seconds per measurement phase")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    threads = parse_threads(args.threads, args.quick)
    budget = args.budget or (0.5 if args.quick else 3.0)
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]

    console.print(f"[bold]torchship runtimes benchmark[/] on {machine_summary()}")
    rows: list[list[str]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="torchship-bench-") as root:
        store = ModelStore(Path(root) / "models")
        for key in wanted:
            if key in ("cnn", "mlp"):
                case: Case | str = digits_case(key, args.trained)
            elif key == "resnet18":
                case = resnet_case(args.quick)
            else:
                parser.error(f"unknown model {key!r}")
            if isinstance(case, str):
                notes.append(case)
                continue
            console.print(f"exporting {case.name} ...")
            # Export (and verify) single-threaded: its cost is not what is measured here,
            # and on a busy machine extra torch threads mostly wait for each other.
            set_threads(1)
            runtimes = export_all(store, case)
            for t in threads:
                console.print(f"measuring {case.name} with {t} thread(s) ...")
                rows += bench_case(store, case, runtimes, t, budget)
            notes.append(f"{case.name}: weights {case.weights}")
            notes += case.notes
    print_table(
        "Latency (batch 1) and throughput (batch 32) by runtime",
        [
            "model",
            "threads",
            "runtime",
            "p50 ms",
            "p99 ms",
            "p50 speedup",
            "items/s @32",
            "speedup",
            "runs b1/b32",
        ],
        rows,
        caption="speedup = eager time / runtime time (>1: faster than eager). Interleaved "
        "round-robin runs; p99 of few runs is close to the max.",
    )
    for note in notes:
        console.print(f"  - {note}")
    console.print(f"total {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
