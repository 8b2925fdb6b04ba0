"""``torchship optimize``: make optimized versions of a stored model and measure them all."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TypeAlias

from rich.console import Console
from rich.table import Table

from torchship.settings import load_settings

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def register(sub: SubParsers) -> None:
    from torchship.optimize import GROUPS, METHODS

    methods = ", ".join(METHODS)
    groups = "; ".join(f"{g} = {', '.join(ms)}" for g, ms in GROUPS.items() if g != "all")
    p = sub.add_parser(
        "optimize",
        help="quantize, prune, distill, ... a stored model; measure every variant",
        description="Make a new store version (parent recorded) per method, load each back "
        "through the ordinary loader, and measure them all the same way, interleaved: top-1 "
        "on the held-out digits test set and agreement with the parent, file size, p50/p99 "
        "latency at batch 1, items/s at batch 32, speed-up against the fp32 eager parent. "
        "Writes the table as optimize.md, optimize.json and a plot (optimize.png). With "
        "--accuracy-budget the variant with the most items/s at batch 32 whose accuracy "
        "drop is within the budget (and that beats the parent) gets the --tag alias. Exit "
        "status: 0, 1 if a method failed, 2 on bad input or when nothing fits the budget.",
        epilog=f"Methods: {methods}. Groups: all; {groups}.",
    )
    p.add_argument("--model", required=True, metavar="NAME[:VERSION]", help="the parent")
    p.add_argument(
        "--methods",
        required=True,
        nargs="+",
        metavar="METHOD",
        help="methods or groups, space- or comma-separated (see below)",
    )
    p.add_argument("--store", help="model store folder (env TORCHSHIP_STORE; default ./models)")
    p.add_argument(
        "--accuracy-budget",
        type=float,
        metavar="POINTS",
        help="tag the fastest variant losing at most this many points of top-1",
    )
    p.add_argument("--tag", default="optimized", help="alias for the picked variant")
    p.add_argument(
        "--out", type=Path, help="folder for the report (default runs/optimize/NAME-VERSION)"
    )
    p.add_argument("--data", choices=["auto", "digits", "examples"], default="auto")
    p.add_argument(
        "--threads", type=int, help="intra-op threads for every variant (default: cores)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--measure-seconds", type=float, default=5.0, help="timing budget for all variants"
    )
    p.add_argument("--min-rounds", type=int, default=20, help="timing rounds at least")
    p.add_argument("--prune-amount", type=float, default=0.5, metavar="FRACTION")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--distill-epochs", type=int, default=30)
    p.add_argument(
        "--student",
        default="width:0.25",
        help="distillation student: width:F (the teacher at F of its width) or module:Class",
    )
    p.add_argument(
        "--student-kwargs", default="{}", metavar="JSON", help="constructor kwargs of module:Class"
    )
    p.add_argument(
        "--compile-on-cpu",
        action="store_true",
        help="also try torch.compile on the CPU (tens of seconds of compilation)",
    )
    p.add_argument("--trust-pickle", action="store_true", help="the parent is a trusted pickle")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_optimize)


def cmd_optimize(args: argparse.Namespace) -> int:
    from torchship.errors import ConfigError
    from torchship.optimize import (
        NoVariantQualifiesError,
        OptimizeOptions,
        optimize,
        plot_tradeoff,
    )
    from torchship.optimize.report import points
    from torchship.store import ModelStore, parse_ref

    name, version = parse_ref(args.model)  # refuse a bad name before any work
    store = ModelStore(load_settings(store=args.store).store)
    try:
        student_kwargs = json.loads(args.student_kwargs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--student-kwargs is not valid JSON: {exc}") from exc
    if not isinstance(student_kwargs, dict):
        raise ConfigError("--student-kwargs must be a JSON object, e.g. '{\"hidden\": 64}'.")
    options = OptimizeOptions(
        threads=args.threads,
        device=args.device,
        data=args.data,
        measure_seconds=args.measure_seconds,
        min_rounds=args.min_rounds,
        prune_amount=args.prune_amount,
        finetune_epochs=args.finetune_epochs,
        distill_epochs=args.distill_epochs,
        student=args.student,
        student_kwargs=student_kwargs,
        compile_on_cpu=args.compile_on_cpu,
        trust_pickle=args.trust_pickle,
        seed=args.seed,
    )
    out = args.out
    if out is None:
        resolved = store.resolve(name, version)
        out = Path("runs") / "optimize" / f"{name}-{resolved}"
    console.print(f"Optimizing {args.model} in {store.root} ...")
    report = optimize(
        store,
        args.model,
        args.methods,
        options=options,
        accuracy_budget=args.accuracy_budget,
        tag=args.tag,
        progress=lambda msg: console.print(f"  {msg}"),
    )
    print_report(report)
    made = any(row.measured for row in report.rows if row is not report.parent_row)
    if made or args.out is not None:
        report.write(out)
        plot = plot_tradeoff(report, Path(out) / "optimize.png")
        console.print(
            f"Wrote {report.files['markdown']}, {report.files['json']} and {plot}", soft_wrap=True
        )
    else:  # e.g. only CUDA methods on a CPU: an earlier run's report is worth more
        console.print(f"No variant was made, so {out} is left as it was.", soft_wrap=True)
    if args.accuracy_budget is not None:
        if report.picked is None:
            raise NoVariantQualifiesError(
                f"No variant fits an accuracy budget of {points(args.accuracy_budget)}: "
                f"{report.pick_reason}. Nothing was tagged.",
                hint="Raise --accuracy-budget, or try other methods; the table above has "
                "every variant's drop and speed-up.",
            )
        console.print(f"Tagged [bold]{report.picked}[/] as '{report.tag}': {report.pick_reason}.")
    return 1 if any(r.status == "failed" for r in report.rows) else 0


def print_report(report: object) -> None:
    """The report as a rich table, then each row's notes and the global notes."""
    from torchship.optimize import OptimizeReport
    from torchship.optimize.report import COLUMNS

    assert isinstance(report, OptimizeReport)
    table = Table(title=f"torchship optimize: {report.parent}")
    for i, col in enumerate(COLUMNS[:-1]):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in report.rows:
        cells = row.cells()
        if not row.measured:
            cells = [cells[0], cells[1], row.status, *["-"] * 8]
        table.add_row(*cells[:-1])
    console.print(table)
    for line in report.description():
        console.print(f"  {line}", soft_wrap=True)
    for row in report.rows:
        if not row.measured:
            console.print(f"  {row.method}: {row.status}: {row.reason}", soft_wrap=True)
        elif row.notes:
            console.print(f"  {row.method}: {'; '.join(row.notes)}", soft_wrap=True)
